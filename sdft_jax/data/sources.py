"""Where a task's rows come from: each on-disk or cached form, read into `(index, label, row)` triples.

- A `datasets.save_to_disk` folder (each split of the upstream Self-Distillation layout; a DatasetDict
  folder too): `datasets.load_from_disk`, after checking that its `state.json` names shards inside the
  folder, that they exist, and that each ends with Arrow's end-of-stream marker (a copy cut at a message
  boundary reads without error and would silently lose rows).
- JSON, JSON Lines and Parquet files: `datasets.load_dataset("json" | "parquet", data_files=...)`.
- A dataset name (`owner/name`) already in the local `datasets` cache: `datasets.load_dataset(name)`;
  nothing is downloaded when `HF_HUB_OFFLINE=1`.
- JSON Lines line by line (`jsonl_rows`, the `jsonl` task): one bad line is named and can be skipped,
  where `datasets`' JSON loader (pyarrow's) refuses the whole file. A JSON Lines file that `datasets`
  refuses is read this way too, so its first bad line is named.
- The older JSON-list tool-use test set (`json_list_rows`).

`streaming` reads rows as they are needed (`load_dataset(..., streaming=True)`): no Arrow copy of the
file is written to the `datasets` cache, and a file larger than memory is never held whole.

A row that cannot be decoded is yielded as its `DataError` (the reader raises or counts it); a source
that cannot be read at all raises a `DataError` (reason `bad_file`) naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

from sdft_jax.data import records as rec
from sdft_jax.data.records import DataError

# A row: (index in its source, its label in messages, the row's dict or the DataError it decoded to).
Row = tuple[int, str, Any]

# File builders of `datasets.load_dataset`, by file extension.
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Rows converted from Arrow at a time.
BATCH_ROWS = 1024

# Every Arrow IPC stream written to completion ends with this marker.
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
# What `datasets` and pyarrow raise for a file they cannot read.
_LOAD_ERRORS = (OSError, ValueError, pa.ArrowException, DatasetGenerationError, DatasetNotFoundError)


def _first_line(error: BaseException) -> str:
    """`error`'s message, one line (a DatasetGenerationError's says nothing: its cause's does)."""
    if isinstance(error, DatasetGenerationError) and error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------------------------------------------
# datasets.Dataset / IterableDataset -> rows


def dataset_rows(dataset: datasets.Dataset | datasets.IterableDataset, source: str) -> Iterator[Row]:
    """The rows of a loaded dataset, in order, as plain dicts; a row whose strings are not valid UTF-8
    is yielded as a `DataError` (Arrow does not check UTF-8 on write, so a shard can hold such a row)."""
    index = 0
    batches = dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except _LOAD_ERRORS as e:  # streaming: the file is parsed as it is read
            raise DataError(source, f"unreadable after row {index} ({_first_line(e)})", reason=rec.BAD_FILE) from None
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            rows = [_decode_row(batch, i, source, index + i) for i in range(batch.num_rows)]
        for row in rows:
            yield index, str(index), row
            index += 1


def _decode_row(batch: pa.Table, i: int, source: str, index: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as e:
        return DataError(source, f"invalid UTF-8 ({e})", row=str(index), reason=rec.INVALID_UTF8)


# ---------------------------------------------------------------------------------------------------
# save_to_disk folders


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a `save_to_disk` folder (a Dataset's or a DatasetDict's)."""
    return any(os.path.exists(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json"))


def saved_split_shards(split_dir: str) -> list[str]:
    """The Arrow shards of one `save_to_disk` Dataset folder, checked complete before `datasets` maps
    them (see the module docstring); raises DataError naming the folder, its state file or the shard."""
    state_path = os.path.join(split_dir, "state.json")
    if os.path.exists(state_path):
        try:
            with open(state_path, encoding="utf-8") as f:
                names = [d["filename"] for d in json.load(f)["_data_files"]]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise DataError(state_path, f"unreadable datasets state file ({e!r})", reason=rec.BAD_FILE) from None
        for name in names:
            # A shard is a file of this split's folder: never a path that leads out of it.
            if not isinstance(name, str) or not name or os.path.isabs(name) or os.sep in name or "/" in name:
                raise DataError(state_path, f"_data_files names {name!r}, not a file name in this folder",
                                reason=rec.BAD_FILE)
    elif os.path.isdir(split_dir):
        raise DataError(split_dir, "no state.json: not a datasets.save_to_disk folder", reason=rec.BAD_FILE)
    else:
        raise DataError(split_dir, "no such directory: give the upstream Self-Distillation data/ folder",
                        reason=rec.BAD_FILE)
    if not os.path.exists(os.path.join(split_dir, "dataset_info.json")):
        raise DataError(split_dir, "no dataset_info.json: not a datasets.save_to_disk folder", reason=rec.BAD_FILE)
    paths = [os.path.join(split_dir, n) for n in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing or not paths:
        raise DataError(
            missing[0] if missing else split_dir,
            "Arrow shard missing. This split's data file is not distributed with sdft-jax: supply it "
            "(the upstream github.com/idanshen/Self-Distillation data/ folder) at this path.",
            reason=rec.BAD_FILE,
        )
    for path in paths:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - len(_ARROW_EOS)))
            if f.read() != _ARROW_EOS:
                raise DataError(path, "truncated Arrow stream (no end-of-stream marker): re-copy the file",
                                reason=rec.BAD_FILE)
    return paths


def saved_rows(path: str, split: str | None = None) -> tuple[str, Iterator[Row]]:
    """`(source, rows)` of a `save_to_disk` folder: a Dataset's, or split `split` of a DatasetDict's.
    `source` names the shard when there is one (the upstream layout), else the folder."""
    if os.path.exists(os.path.join(path, "dataset_dict.json")) and not os.path.exists(os.path.join(path, "state.json")):
        try:
            with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
                splits = json.load(f)["splits"]
            if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
                raise TypeError(f"splits is {splits!r}")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise DataError(os.path.join(path, "dataset_dict.json"), f"unreadable DatasetDict file ({e!r})",
                            reason=rec.BAD_FILE) from None
        if split not in splits or os.sep in split or "/" in split:
            raise DataError(path, f"no split {split!r} in this DatasetDict (it has {splits}; see config.data.eval_split)",
                            reason=rec.BAD_FILE)
        path = os.path.join(path, split)
    shards = saved_split_shards(path)
    source = shards[0] if len(shards) == 1 else path
    try:
        dataset = datasets.load_from_disk(path)
    except _LOAD_ERRORS as e:
        raise DataError(source, f"truncated or corrupt Arrow stream ({_first_line(e)})", reason=rec.BAD_FILE) from None
    return source, dataset_rows(dataset, source)


# ---------------------------------------------------------------------------------------------------
# files and names through datasets.load_dataset


def split_file(folder: str, split: str) -> str | None:
    """The file of split `split` in `folder` (`{split}.jsonl`, `.json` or `.parquet`), or None."""
    for ext in FILE_BUILDERS:
        path = os.path.join(folder, split + ext)
        if os.path.isfile(path):
            return path
    return None


def file_rows(path: str, *, streaming: bool, max_row_chars: int) -> tuple[str, Iterator[Row]]:
    """`(path, rows)` of one JSON, JSON Lines or Parquet file, through `datasets.load_dataset`. A JSON
    Lines file that `datasets` refuses is read line by line instead (`jsonl_rows`), which names its bad
    lines (and lets `skip_bad_rows` skip them)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_BUILDERS:
        raise DataError(path, f"unknown file type {ext or '(none)'!r}: expected one of {sorted(FILE_BUILDERS)}",
                        reason=rec.BAD_FILE)
    if not os.path.isfile(path):
        raise DataError(path, "file not found", reason=rec.BAD_FILE)
    if os.path.getsize(path) == 0:
        raise DataError(path, "no rows (empty file)", reason=rec.BAD_FILE)
    if ext == ".parquet":  # datasets fails on a file of no rows with an unrelated message; say it plainly
        try:
            num_rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataError(path, f"not a Parquet file ({_first_line(e)})", reason=rec.BAD_FILE) from None
        if not num_rows:
            raise DataError(path, "no rows (a Parquet file of 0 rows)", reason=rec.BAD_FILE)
    try:
        dataset = datasets.load_dataset(FILE_BUILDERS[ext], data_files=path, split="train", streaming=streaming)
        if streaming and ext == ".jsonl":  # parsed as read: parse it once first, so a bad line is named up front
            for _ in dataset_rows(dataset, path):
                pass
    except (DataError, *_LOAD_ERRORS) as e:
        if ext == ".jsonl":
            return path, jsonl_rows(path, max_row_chars)
        raise DataError(path, f"datasets cannot read it ({_first_line(e)})", reason=rec.BAD_FILE) from None
    return path, dataset_rows(dataset, path)


def named_rows(name: str, split: str, *, streaming: bool) -> tuple[str, Iterator[Row]]:
    """`(name, rows)` of split `split` of a dataset loaded by name (from the local cache when offline)."""
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming)
    except _LOAD_ERRORS as e:
        offline = " (HF_HUB_OFFLINE is set: only datasets already in the local cache load)" if (
            datasets.config.HF_HUB_OFFLINE) else ""
        raise DataError(name, f"not a file, a folder, or a loadable dataset name{offline}: {_first_line(e)}",
                        reason=rec.BAD_FILE) from None
    return name, dataset_rows(dataset, name)


def open_rows(path: str, split: str, *, streaming: bool, max_row_chars: int) -> tuple[str, Iterator[Row]]:
    """`(source, rows)` of split `split` of whatever `path` is: a `save_to_disk` folder, a JSON / JSON
    Lines / Parquet file (the split itself), a folder holding `{split}.jsonl|.json|.parquet`, or a dataset
    name in the local `datasets` cache."""
    if os.path.isfile(path):
        return file_rows(path, streaming=streaming, max_row_chars=max_row_chars)
    if os.path.isdir(path):
        if is_saved_dataset(path):
            return saved_rows(path, split)
        found = split_file(path, split)
        if found is None:
            raise DataError(path, f"holds no {split}.jsonl, {split}.json, {split}.parquet or save_to_disk dataset",
                            reason=rec.BAD_FILE)
        return file_rows(found, streaming=streaming, max_row_chars=max_row_chars)
    return named_rows(path, split, streaming=streaming)


# ---------------------------------------------------------------------------------------------------
# JSON read by hand: line by line, and the older JSON-list test set


def _json_error(error: Exception) -> str:
    """What `json.loads` refused: a syntax error, a number of more than 4,300 digits (ValueError), or
    nesting deeper than the interpreter's recursion limit (RecursionError)."""
    if isinstance(error, RecursionError):
        return "nested too deeply to parse"
    return str(error)


def parse_json(text: str) -> Any:
    """`json.loads(text)`; raises ValueError with a one-line reason."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an over-long number, deep nesting
        raise ValueError(f"not JSON ({_json_error(e)})") from None


def _read_bytes_as_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(path, "file not found", reason=rec.BAD_FILE) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"invalid UTF-8 at byte {e.start} ({e.reason})", reason=rec.INVALID_UTF8) from None


def json_list_rows(path: str) -> Iterator[Row]:
    """The rows of a file holding one JSON list of rows."""
    text = _read_bytes_as_text(path)
    try:
        data = parse_json(text)
    except ValueError as e:
        raise DataError(path, str(e), reason=rec.INVALID_JSON) from None
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of rows, got {type(data).__name__}", reason=rec.WRONG_TYPE)
    for i, row in enumerate(data):
        yield i, str(i), row


def jsonl_rows(path: str, max_row_chars: int) -> Iterator[Row]:
    """The rows of a JSON Lines file, one per non-blank line (indexed by line, labelled with the line
    number), reading at most one line at a time."""
    # A UTF-8 character is at most 4 bytes: reading at most this much per line bounds memory even for a
    # file that is one giant line, and anything longer is over the character limit for sure.
    max_bytes = 4 * max_row_chars + 1
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, "file not found", reason=rec.BAD_FILE) from None
    with f:
        i = -1
        while True:
            raw = f.readline(max_bytes)
            if not raw:
                return
            i += 1
            where = f"{i} (line {i + 1})"
            if len(raw) == max_bytes and not raw.endswith(b"\n"):
                while (rest := f.readline(max_bytes)) and not rest.endswith(b"\n"):
                    pass  # skip the remainder of the oversized line
                yield i, where, DataError(path, f"line longer than {max_bytes:,} bytes (max_row_chars="
                                       f"{max_row_chars:,})", row=where, reason=rec.ROW_TOO_LARGE)
                continue
            if not raw.strip():
                continue  # blank lines are layout, not rows
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, where, DataError(path, f"invalid UTF-8 at byte {e.start} of the line ({e.reason})",
                                       row=where, reason=rec.INVALID_UTF8)
                continue
            try:
                data = parse_json(text)
            except ValueError as e:
                data = DataError(path, str(e), row=where, reason=rec.INVALID_JSON)
            yield i, where, data
