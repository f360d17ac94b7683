"""Readers for the upstream Self-Distillation data layout and for generic JSONL.

Layout under a user-given `data_dir` (the upstream `data/` folder, spec section 6):

  tooluse_data/{train_data,eval_data}/   `datasets.save_to_disk` Arrow stream shards (ToolAlpaca)
  tooluse_data/eval_data.json            the older 68-item JSON list of the tool-use test set
  science_data/{train_data,eval_data}/   Arrow stream shards (SciKnowEval Chemistry L3)

Every row is validated; a bad row raises a `DataError` naming file, row and field, or (with
`skip_bad_rows`) is skipped and counted. Besides its fields, a row is refused for what would fail
later, far from the file: more than `max_row_chars` characters, nesting deeper than `MAX_ROW_DEPTH`
(or too deep to parse), a lone surrogate from a broken `\\u` escape (no tokenizer can encode it).
A damaged file always raises: its rows cannot be counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pyarrow as pa
import pyarrow.ipc as ipc

from sdft_jax.data import records as rec
from sdft_jax.data.records import DataError, ReadResult, Record, SkipCounter
from sdft_jax.validation import check_int, check_literals

TASKS = ("tooluse", "science", "tooluse_json", "jsonl")
SPLITS = ("train", "eval")
DEFAULT_MAX_ROW_CHARS = 1_000_000
# No row of any source nests deeper than a few levels (a tool call's arguments inside a list of calls).
MAX_ROW_DEPTH = 32

# The science system prompt under `thinking_format` (spec section 6).
THINKING_SYSTEM_PROMPT = (
    "Given a question and four options, please select the right answer. Think step by step, then output "
    "ONLY the letter (A, B, C, or D) as your final answer."
)

# Every Arrow IPC stream written to completion ends with this marker; a file cut at a message boundary
# reads without error in pyarrow, so its absence is how such a truncation is caught.
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"

_SCIENCE_DEMO = re.compile(r"\s*<reasoning>(.*)</reasoning>\s*<answer>\s*(.*?)\s*</answer>\s*", re.DOTALL)

Purpose = Literal["sdft", "sft"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadConfig:
    """How rows become records.

    Attributes:
      skip_bad_rows: skip and count bad rows instead of raising on the first one.
      thinking_format: rewrite science demonstrations and system prompts for thinking models.
      purpose: which thinking-format demonstration to build: "sdft" (teacher context) or "sft" (target).
      keep_system: keep the science train system turn (the official code); the recipe drops it.
      max_row_chars: rows with more characters than this (all string fields together) are bad rows.
    """

    skip_bad_rows: bool = False
    thinking_format: bool = False
    purpose: Purpose = "sdft"
    keep_system: bool = False
    max_row_chars: int = DEFAULT_MAX_ROW_CHARS

    def __post_init__(self):
        check_literals(self)
        check_int(f"{type(self).__name__}.max_row_chars", self.max_row_chars, minimum=1)


def convert_science_demonstration(text: str, purpose: Purpose) -> str:
    """`<reasoning>R</reasoning><answer>X</answer>` in the thinking-model form of spec section 6.

    "sdft" gives `R\\n\\nThe answer is X.`; "sft" gives `<think>\\nR\\n</think>\\n\\nThe answer is X.`.
    Raises ValueError if `text` is not in the reasoning/answer form.
    """
    m = _SCIENCE_DEMO.fullmatch(text)
    if m is None:
        raise ValueError("expected '<reasoning>...</reasoning><answer>...</answer>'")
    reasoning, answer = m.group(1).strip(), m.group(2)
    if not answer:
        raise ValueError("empty <answer>")
    if purpose == "sft":
        return f"<think>\n{reasoning}\n</think>\n\nThe answer is {answer}."
    return f"{reasoning}\n\nThe answer is {answer}."


# ---------------------------------------------------------------------------------------------------
# Row validation


_UNSET = object()


class _Row:
    """A row being validated: field access that raises `DataError`s naming source, row and field."""

    def __init__(self, data: Any, source: str, index: int, label: str):
        self.source, self.index, self.label = source, index, label
        if not isinstance(data, dict):
            raise self.error(None, f"expected an object, got {type(data).__name__}", rec.WRONG_TYPE)
        self.data = data

    def error(self, field: str | None, detail: str, reason: str) -> DataError:
        return DataError(self.source, detail, row=self.label, field=field, reason=reason)

    def get(self, field: str, kind: type, *, required: bool = True) -> Any:
        value = self.data.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing", rec.MISSING_FIELD)
            return None
        return self.check(field, value, kind)

    def check(self, field: str, value: Any, kind: type) -> Any:
        if not isinstance(value, kind):
            raise self.error(field, f"expected {kind.__name__}, got {type(value).__name__}", rec.WRONG_TYPE)
        return value

    def text(self, field: str, value: Any = _UNSET, *, required: bool = True) -> str | None:
        """A non-empty string field of the row (or `value`, read from inside it, named `field`)."""
        if value is _UNSET:
            value = self.data.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing", rec.MISSING_FIELD)
            return None
        self.check(field, value, str)
        if not value.strip():
            raise self.error(field, "empty string", rec.EMPTY_FIELD)
        return value

    def messages(self, field: str) -> list[dict[str, str]]:
        """A chat turn list: [system,] user, each with non-empty string role and content."""
        turns = self.get(field, list)
        out = []
        for i, turn in enumerate(turns):
            name = f"{field}[{i}]"
            self.check(name, turn, dict)
            out.append({"role": self.text(f"{name}.role", turn.get("role")),
                        "content": self.text(f"{name}.content", turn.get("content"))})
        return out


def _lone_surrogate(text: str) -> int | None:
    """The position of the first lone UTF-16 surrogate in `text` (a JSON `"\\ud800"` escape decodes to
    one; it cannot be encoded as UTF-8, so a tokenizer fails on it), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _check_row(data: Any, source: str, label: str, max_row_chars: int) -> None:
    """Refuses a row nested deeper than `MAX_ROW_DEPTH`, larger than `max_row_chars` characters (all
    strings together, keys included), or holding a string that is not valid Unicode text.

    Iterative, so no row can exhaust Python's recursion limit here."""
    chars, surrogate = 0, None
    # (value, its path in the row, its depth, the row's field it is in)
    stack: list[tuple[Any, str, int, str | None]] = [(data, "", 0, None)]
    while stack:
        value, path, depth, field = stack.pop()
        if isinstance(value, str):
            chars += len(value)
            if surrogate is None and (at := _lone_surrogate(value)) is not None:
                surrogate = (path, at, value[at])
            continue
        if not isinstance(value, (dict, list, tuple)):
            continue
        if depth >= MAX_ROW_DEPTH:
            raise DataError(source, f"nested more than {MAX_ROW_DEPTH} levels deep", row=label, field=field,
                            reason=rec.NESTED_TOO_DEEP)
        # Pushed last to first, so that fields are visited (and the first bad one named) in row order.
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                name = f"{path}.{key}" if path else str(key)
                stack += [(item, name, depth + 1, field or name), (key, name, depth + 1, field or name)]
        else:
            stack.extend((value[i], f"{path}[{i}]", depth + 1, field or f"[{i}]")
                         for i in reversed(range(len(value))))
    if chars > max_row_chars:
        raise DataError(source, f"row has {chars:,} characters, more than max_row_chars={max_row_chars:,}",
                        row=label, reason=rec.ROW_TOO_LARGE)
    if surrogate is not None:
        path, at, char = surrogate
        raise DataError(source, f"lone surrogate U+{ord(char):04X} at character {at} (not valid Unicode text; "
                        "a broken \\u escape?)", row=label, field=path or None, reason=rec.INVALID_UTF8)


# ---------------------------------------------------------------------------------------------------
# Row -> Record, per source


def _tool_calls(row: _Row, field: str) -> tuple[dict[str, str], ...]:
    calls = row.get(field, list)
    if not calls:
        raise row.error(field, "empty list of tool calls", rec.EMPTY_FIELD)
    out = []
    for i, call in enumerate(calls):
        name = f"{field}[{i}]"
        row.check(name, call, dict)
        action = row.text(f"{name}.Action", call.get("Action"))
        args = call.get("Action_Input")
        if args is None:
            raise row.error(f"{name}.Action_Input", "missing", rec.MISSING_FIELD)
        row.check(f"{name}.Action_Input", args, str)
        try:
            parsed = json.loads(args)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, an over-long number, deep nesting
            raise row.error(f"{name}.Action_Input", f"not JSON ({_json_error(e)})", rec.INVALID_JSON) from None
        if not isinstance(parsed, dict):
            raise row.error(f"{name}.Action_Input", "not a JSON object", rec.INVALID_VALUE)
        out.append({"Action": action, "Action_Input": args})
    return tuple(out)


def _tooluse_record(row: _Row, split: str, config: ReadConfig) -> Record:
    question = row.text("prompt")
    if split == "train":
        steps = row.get("golden_response", list)
        if not steps:
            raise row.error("golden_response", "empty list", rec.EMPTY_FIELD)
        for i, step in enumerate(steps):
            row.check(f"golden_response[{i}]", step, str)
        demonstration = "\n".join(steps)
        if not demonstration.strip():
            raise row.error("golden_response", "only empty strings", rec.EMPTY_FIELD)
        # Training never scores, so the gold calls are kept only where the row has them.
        gold = _tool_calls(row, "golden_answer") if row.data.get("golden_answer") is not None else None
    else:
        demonstration, gold = None, _tool_calls(row, "golden_answer")
    return Record(task="tooluse", index=row.index, source=row.source,
                  messages=({"role": "user", "content": question},), demonstration=demonstration, gold=gold)


def _science_record(row: _Row, split: str, config: ReadConfig) -> Record:
    field = "messages" if split == "train" else "prompt"
    turns = row.messages(field)
    roles = [t["role"] for t in turns]
    if roles not in (["user"], ["system", "user"]):
        raise row.error(field, f"expected roles [system, user], got {roles}", rec.INVALID_VALUE)
    if config.thinking_format and roles[0] == "system":
        turns[0] = {"role": "system", "content": THINKING_SYSTEM_PROMPT}
    if split == "train":
        # The question is messages[1] (the user turn); the recipe drops the system turn, the official
        # code keeps it.
        if not config.keep_system:
            turns = turns[-1:]
        demonstration = row.text("output_text")
        if config.thinking_format:
            try:
                demonstration = convert_science_demonstration(demonstration, config.purpose)
            except ValueError as e:
                raise row.error("output_text", str(e), rec.INVALID_VALUE) from None
        gold = None
        m = _SCIENCE_DEMO.fullmatch(row.data["output_text"])
        if m and m.group(2) in ("A", "B", "C", "D"):
            gold = m.group(2)
    else:
        demonstration = None
        gold = row.text("answer")
        if gold not in ("A", "B", "C", "D"):
            raise row.error("answer", f"expected one letter A-D, got {gold[:20]!r}", rec.INVALID_VALUE)
    return Record(task="science", index=row.index, source=row.source, messages=tuple(turns),
                  demonstration=demonstration, gold=gold)


def _jsonl_record(row: _Row, split: str, config: ReadConfig) -> Record:
    question = row.text("question")
    demonstration = row.text("demonstration")
    system = row.text("system", required=False)
    messages = ({"role": "system", "content": system},) if system is not None else ()
    messages += ({"role": "user", "content": question},)
    return Record(task="jsonl", index=row.index, source=row.source, messages=messages,
                  demonstration=demonstration, gold=None)


_RowParser = Callable[[_Row, str, ReadConfig], Record]


def _collect(rows: Iterator[tuple[int, str, Any]], source: str, split: str, parse: _RowParser,
             config: ReadConfig) -> ReadResult:
    """Parses `(index, label, row)` triples; `label` names the row in errors."""
    counter = SkipCounter(source, skip_bad_rows=config.skip_bad_rows)
    out, seen = [], 0
    for index, label, data in rows:
        seen += 1
        try:
            if isinstance(data, DataError):  # a row the file layer could not decode
                raise data
            _check_row(data, source, label, config.max_row_chars)
            out.append(parse(_Row(data, source, index, label), split, config))
        except DataError as e:
            counter.bad(e)
    counter.warn()
    if not out:
        detail = "no rows" if not seen else f"all {seen} rows are bad: {counter.counts}"
        raise DataError(source, detail, reason=rec.BAD_FILE)
    return ReadResult(records=tuple(out), skipped=counter.counts)


# ---------------------------------------------------------------------------------------------------
# Files -> rows


def _arrow_files(split_dir: str) -> list[str]:
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
        names = sorted(n for n in os.listdir(split_dir) if n.endswith(".arrow"))
    else:
        raise DataError(split_dir, "no such directory: give the upstream Self-Distillation data/ folder",
                        reason=rec.BAD_FILE)
    paths = [os.path.join(split_dir, n) for n in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing or not paths:
        raise DataError(
            missing[0] if missing else split_dir,
            "Arrow shard missing. This split's data file is not distributed with sdft-jax: supply it "
            "(the upstream github.com/idanshen/Self-Distillation data/ folder) at this path.",
            reason=rec.BAD_FILE,
        )
    return paths


def _arrow_rows(paths: list[str]) -> Iterator[tuple[int, str, Any]]:
    index = 0
    for path in paths:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - len(_ARROW_EOS)))
            complete = f.read() == _ARROW_EOS
        if not complete:
            raise DataError(path, "truncated Arrow stream (no end-of-stream marker): re-copy the file",
                            reason=rec.BAD_FILE)
        try:
            reader = ipc.open_stream(pa.memory_map(path))
            batches = list(reader)
        except (pa.ArrowException, OSError) as e:
            raise DataError(path, f"truncated or corrupt Arrow stream ({e})", reason=rec.BAD_FILE) from None
        for batch in batches:
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:
                rows = [_decode_arrow_row(batch, i, path, index + i) for i in range(batch.num_rows)]
            for row in rows:
                yield index, str(index), row
                index += 1


def _decode_arrow_row(batch: pa.RecordBatch, i: int, path: str, index: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as e:
        return DataError(path, f"invalid UTF-8 ({e})", row=str(index), reason=rec.INVALID_UTF8)


def _json_error(error: Exception) -> str:
    """What `json.loads` refused: a syntax error, a number of more than 4,300 digits (ValueError), or
    nesting deeper than the interpreter's recursion limit (RecursionError)."""
    if isinstance(error, RecursionError):
        return "nested too deeply to parse"
    return str(error)


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


def _json_list_rows(path: str) -> Iterator[tuple[int, str, Any]]:
    text = _read_bytes_as_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(path, f"not JSON ({_json_error(e)})", reason=rec.INVALID_JSON) from None
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of rows, got {type(data).__name__}", reason=rec.WRONG_TYPE)
    for i, row in enumerate(data):
        yield i, str(i), row


def _jsonl_rows(path: str, max_row_chars: int) -> Iterator[tuple[int, str, Any]]:
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
                data = json.loads(text)
            except (ValueError, RecursionError) as e:
                data = DataError(path, f"not JSON ({_json_error(e)})", row=where, reason=rec.INVALID_JSON)
            yield i, where, data


# ---------------------------------------------------------------------------------------------------
# Entry points


def read_jsonl(path: str | os.PathLike, *, config: ReadConfig = ReadConfig()) -> ReadResult:
    """Records of a generic JSONL file: `{"question", "demonstration", optional "system"}` per line."""
    path = os.fspath(path)
    return _collect(_jsonl_rows(path, config.max_row_chars), path, "train", _jsonl_record, config)


def read_tooluse_json(path: str | os.PathLike, *, config: ReadConfig = ReadConfig()) -> ReadResult:
    """Records of the older JSON-list tool-use test set (`tooluse_data/eval_data.json`)."""
    path = os.fspath(path)
    return _collect(_json_list_rows(path), path, "eval", _tooluse_record, config)


def read_arrow_split(split_dir: str | os.PathLike, task: str, split: str, *,
                     config: ReadConfig = ReadConfig()) -> ReadResult:
    """Records of one `datasets.save_to_disk` split directory of the tool-use or science task."""
    parsers = {"tooluse": _tooluse_record, "science": _science_record}
    if task not in parsers:
        raise ValueError(f"unknown Arrow task {task!r}; expected one of {sorted(parsers)}")
    split_dir = os.fspath(split_dir)
    paths = _arrow_files(split_dir)
    # Rows are named by the shard they came from only when there is one shard (the upstream layout).
    source = paths[0] if len(paths) == 1 else split_dir
    return _collect(_arrow_rows(paths), source, split, parsers[task], config)


def read_task(
    data_dir: str | os.PathLike,
    task: str,
    split: str,
    *,
    skip_bad_rows: bool = False,
    thinking_format: bool = False,
    purpose: Purpose = "sdft",
    keep_system: bool = False,
    max_row_chars: int = DEFAULT_MAX_ROW_CHARS,
) -> ReadResult:
    """Records of one task split from the upstream layout under `data_dir`.

    Tasks: "tooluse" and "science" (Arrow splits "train" and "eval"), "tooluse_json" (the older
    `tooluse_data/eval_data.json`, split "eval"), and "jsonl" (`data_dir` is the .jsonl file itself,
    or a folder holding `{split}.jsonl`). See `ReadConfig` for the options; `keep_system` concerns the
    science train split only (the science eval prompts always keep their system turn, as both
    reference implementations do).
    """
    config = ReadConfig(skip_bad_rows=skip_bad_rows, thinking_format=thinking_format, purpose=purpose,
                        keep_system=keep_system, max_row_chars=max_row_chars)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    data_dir = os.fspath(data_dir)
    if task in ("tooluse", "science"):
        return read_arrow_split(os.path.join(data_dir, f"{task}_data", f"{split}_data"), task, split,
                                config=config)
    if task == "tooluse_json":
        if split != "eval":
            raise ValueError("tooluse_json has only the 'eval' split")
        return read_tooluse_json(os.path.join(data_dir, "tooluse_data", "eval_data.json"), config=config)
    if task == "jsonl":
        path = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, f"{split}.jsonl")
        return read_jsonl(path, config=config)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
