"""Bad data rows and data files: JSONL rows, tool-use JSON and Arrow splits, `datasets` files and
directories, offline task requests.

Each case builds one bad input and asserts the error's class (and so the command's exit status,
`sdft_jax.errors`) and that its message names the file and the row (`refusals.check_refused`). A bad
data row is also read with `skip_bad_rows`: skipped and counted under its reason, the good row kept.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdft_jax import errors
from sdft_jax.data import offline_tasks, readers
from sdft_jax.data.records import DataError

from tests.bad_inputs.refusals import Case, check_refused


# --- data rows ------------------------------------------------------------------------------------------

GOOD = {"question": "Q", "demonstration": "D"}
GOOD_LINE = json.dumps(GOOD).encode()

# (id, the bad JSONL line, the reason it is skipped under, words the message names besides file and row)
BAD_ROWS = [
    ("nested_past_the_parser", b'{"question": "Q", "demonstration": "D", "x": ' + b"[" * 100_000 + b"]" * 100_000
     + b"}", "invalid_json", "nested too deeply"),
    ("nested_past_max_depth", b'{"question": "Q", "demonstration": "D", "x": ' + b"[" * 40 + b"]" * 40 + b"}",
     "nested_too_deep", "field 'x': nested more than 32 levels deep"),
    ("lone_high_surrogate", b'{"question": "Q\\ud800", "demonstration": "D"}', "invalid_utf8",
     "field 'question': lone surrogate U+D800"),
    ("lone_low_surrogate_in_system", b'{"question": "Q", "demonstration": "D", "system": "\\udfff S"}',
     "invalid_utf8", "field 'system': lone surrogate U+DFFF"),
    ("lone_surrogate_in_a_key", b'{"question": "Q", "demonstration": "D", "\\ud801": 1}', "invalid_utf8",
     "lone surrogate U+D801"),
    ("reversed_surrogate_pair", b'{"question": "Q", "demonstration": "\\ude00\\ud83d"}', "invalid_utf8",
     "field 'demonstration': lone surrogate U+DE00"),
    ("number_of_5000_digits", b'{"question": "Q", "demonstration": "D", "n": ' + b"7" * 5000 + b"}",
     "invalid_json", "4300 digits"),
    ("invalid_utf8_bytes", b'{"question": "Q\xc3\x28", "demonstration": "D"}', "invalid_utf8", "invalid UTF-8"),
    ("utf8_encoded_surrogate", b'{"question": "Q\xed\xa0\x80", "demonstration": "D"}', "invalid_utf8",
     "invalid UTF-8"),
    ("cut_json", b'{"question": "Q", "demonstr', "invalid_json", "not JSON"),
    ("a_list", b'["Q", "D"]', "wrong_type", "expected an object, got list"),
    ("missing_question", b'{"demonstration": "D"}', "missing_field", "field 'question': missing"),
    ("number_as_question", b'{"question": 3, "demonstration": "D"}', "wrong_type", "field 'question': expected str"),
    ("blank_demonstration", b'{"question": "Q", "demonstration": " \\n\\t"}', "empty_field",
     "field 'demonstration': empty string"),
    ("over_max_row_chars", json.dumps({"question": "Q" * 300_000, "demonstration": "D"}).encode(), "row_too_large",
     "more than max_row_chars=300,000"),
]


@pytest.mark.parametrize("line, reason, words", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_jsonl_row_is_refused_or_counted(tmp_path, line, reason, words):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(line + b"\n" + GOOD_LINE + b"\n")
    with pytest.raises(DataError) as info:
        readers.read_task(path, "jsonl", "train", max_row_chars=300_000)
    message = str(info.value)
    assert message.startswith(f"{path}: row 0 (line 1): ") and words in message, message
    assert info.value.reason == reason and errors.classify(info.value).status == errors.DATA
    result = readers.read_task(path, "jsonl", "train", max_row_chars=300_000, skip_bad_rows=True)
    assert result.skipped == {reason: 1} and [r.index for r in result.records] == [1]


def test_a_valid_surrogate_pair_is_one_character(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"question": "smile \\ud83d\\ude00", "demonstration": "D"}\n')
    assert readers.read_task(path, "jsonl", "train").records[0].question == "smile \U0001F600"


def _tooluse_json(tmp_path: pathlib.Path, content: bytes) -> tuple[Callable[[], Any], pathlib.Path]:
    path = tmp_path / "tooluse_data" / "eval_data.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return (lambda: readers.read_task(tmp_path, "tooluse_json", "eval")), path


def _tool_row(prompt: str = "P", action_input: str = "{}") -> dict:
    return {"prompt": prompt, "golden_answer": [{"Action": "a", "Action_Input": action_input}]}


def _tooluse_json_case(content: bytes, *words: str) -> Callable:
    def make(tmp_path):
        call, path = _tooluse_json(tmp_path, content)
        return call, [str(path), *words]
    return make


ARROW_SCHEMA = pa.schema([("prompt", pa.string()), ("golden_answer", pa.list_(
    pa.struct([("Action", pa.string()), ("Action_Input", pa.string())])))])


def _arrow_split(tmp_path: pathlib.Path, state: Any = "default", table: pa.Table | None = None) -> pathlib.Path:
    """A `save_to_disk` split of the upstream layout, its `state.json` replaced by `state` (None: removed)."""
    split = tmp_path / "tooluse_data" / "eval_data"
    table = table if table is not None else pa.Table.from_pylist([_tool_row()], schema=ARROW_SCHEMA)
    datasets.Dataset(table).save_to_disk(str(split))
    if state is None:
        os.remove(split / "state.json")
    elif state != "default":
        (split / "state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    return split


def _arrow_case(state: Any, *words: str, file: str = "state.json") -> Callable:
    def make(tmp_path):
        split = _arrow_split(tmp_path, state)
        return (lambda: readers.read_task(tmp_path, "tooluse", "eval")), [str(split / file), *words]
    return make


def _truncated_arrow(tmp_path):
    split = _arrow_split(tmp_path)
    shard = split / "data-00000-of-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-40])
    return (lambda: readers.read_task(tmp_path, "tooluse", "eval")), [str(shard), "truncated Arrow stream"]


def _arrow_bad_row(tmp_path):
    rows = [_tool_row(), _tool_row(action_input="[" * 5000 + "]" * 5000)]
    split = _arrow_split(tmp_path, table=pa.Table.from_pylist(rows, schema=ARROW_SCHEMA))
    shard = split / "data-00000-of-00001.arrow"
    return (lambda: readers.read_task(tmp_path, "tooluse", "eval")), [
        f"{shard}: row 1: field 'golden_answer[0].Action_Input': not JSON (nested too deeply to parse)"]


def _missing_jsonl(tmp_path):
    path = tmp_path / "nope.jsonl"
    return (lambda: readers.read_task(path, "jsonl", "train")), [str(path), "file not found"]


def _blank_jsonl(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n \n\t\n")
    return (lambda: readers.read_task(path, "jsonl", "train")), [str(path), "no rows"]


def _all_rows_bad(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "\\ud800", "demonstration": "D"}\n' + b"[" * 50_000 + b"\n")
    return (lambda: readers.read_task(path, "jsonl", "train", skip_bad_rows=True)), [
        str(path), "all 2 rows are bad", "'invalid_utf8': 1", "'invalid_json': 1"]


def _read_dataset(path: pathlib.Path, split: str = "train", **columns: str) -> Callable[[], Any]:
    return lambda: readers.read_task(path, "dataset", split, columns=readers.Columns(**columns))


def _parquet_missing_column(tmp_path):
    path = tmp_path / "skills.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q", "response": "D"}]), path)
    return _read_dataset(path, question="prompt", demonstration="answer_text"), [
        f"{path}: row 0: field 'answer_text': missing"]


def _parquet_wrong_type(tmp_path):
    path = tmp_path / "skills.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": 1, "d": "D"}, {"q": 2, "d": "D"}]), path)
    return _read_dataset(path, question="q", demonstration="d"), [f"{path}: row 0: field 'q': expected str, got int"]


def _empty_file(name: str) -> Callable:
    def make(tmp_path):
        path = tmp_path / name
        if name.endswith(".parquet"):  # a valid Parquet file of no rows
            pq.write_table(pa.table({"question": pa.array([], pa.string()), "demonstration": pa.array([], pa.string())}),
                           path)
        else:
            path.write_bytes(b"")
        return _read_dataset(path), [str(path), "no rows"]
    return make


def _dataset_jsonl_cut_line(tmp_path):
    path = tmp_path / "skills.jsonl"
    path.write_bytes(GOOD_LINE + b"\n" + b'{"question": "Q", "demonstr' + b"\n")
    return _read_dataset(path), [f"{path}: row 1 (line 2): not JSON"]


def _dataset_dict_without_the_split(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    return _read_dataset(tmp_path / "dd", "eval"), [str(tmp_path / "dd"), "no split 'test' in this DatasetDict",
                                                     "['train']"]


def _name_not_cached(tmp_path):
    return _read_dataset(pathlib.Path("someone/not-cached")), [
        "someone/not-cached: not a file, a folder, or a loadable dataset name (HF_HUB_OFFLINE is set"]


def _unknown_file_type(tmp_path):
    path = tmp_path / "skills.csv"
    path.write_text("question,demonstration\nQ,D\n")
    return _read_dataset(path), [str(path), "unknown file type '.csv'"]


def _saved_split_without_info(tmp_path):
    split = _arrow_split(tmp_path)
    os.remove(split / "dataset_info.json")
    return (lambda: readers.read_task(tmp_path, "tooluse", "eval")), [str(split), "no dataset_info.json"]


DATA_FILES = [
    Case("dataset_parquet_missing_column", _parquet_missing_column, DataError),
    Case("dataset_parquet_column_of_wrong_type", _parquet_wrong_type, DataError),
    Case("dataset_empty_jsonl", _empty_file("empty.jsonl"), DataError),
    Case("dataset_empty_json", _empty_file("empty.json"), DataError),
    Case("dataset_parquet_of_no_rows", _empty_file("empty.parquet"), DataError),
    Case("dataset_jsonl_cut_line", _dataset_jsonl_cut_line, DataError),
    Case("dataset_dict_without_the_split", _dataset_dict_without_the_split, DataError),
    Case("dataset_name_not_in_the_cache", _name_not_cached, DataError),
    Case("dataset_unknown_file_type", _unknown_file_type, DataError),
    Case("saved_split_without_dataset_info", _saved_split_without_info, DataError),
    Case("jsonl_missing", _missing_jsonl, DataError),
    Case("jsonl_only_blank_lines", _blank_jsonl, DataError),
    Case("jsonl_every_row_bad_while_skipping", _all_rows_bad, DataError),
    Case("tooluse_json_nested_past_the_parser", _tooluse_json_case(b"[" * 100_000, "not JSON (nested too deeply"),
         DataError),
    Case("tooluse_json_not_utf8", _tooluse_json_case(b'[{"prompt": "\xff"}]', "invalid UTF-8 at byte 13"), DataError),
    Case("tooluse_json_not_a_list", _tooluse_json_case(b'{"prompt": "P"}', "expected a JSON list"), DataError),
    Case("tooluse_json_lone_surrogate", _tooluse_json_case(
        json.dumps([_tool_row(prompt="\ud800")]).encode(), "row 0: field 'prompt': lone surrogate"), DataError),
    Case("tooluse_json_deep_action_input", _tooluse_json_case(
        json.dumps([_tool_row(action_input="{" * 10_000)]).encode(),
        "row 0: field 'golden_answer[0].Action_Input': not JSON"), DataError),
    Case("arrow_split_missing", lambda tmp_path: (
        (lambda: readers.read_task(tmp_path, "science", "eval")),
        [str(tmp_path / "science_data" / "eval_data"), "no such directory"]), DataError),
    Case("arrow_state_not_json", _arrow_case("{not json", "unreadable datasets state file"), DataError),
    Case("arrow_state_without_files", _arrow_case({"_fingerprint": "x"}, "unreadable datasets state file"),
         DataError),
    Case("arrow_state_shard_outside", _arrow_case({"_data_files": [{"filename": "../../x.arrow"}]},
                                                  "'../../x.arrow', not a file name in this folder"), DataError),
    Case("arrow_state_shard_absolute", _arrow_case({"_data_files": [{"filename": "/etc/passwd"}]},
                                                   "not a file name in this folder"), DataError),
    Case("arrow_state_shard_missing", _arrow_case({"_data_files": [{"filename": "data-9.arrow"}]},
                                                  "Arrow shard missing", file="data-9.arrow"), DataError),
    Case("arrow_shard_truncated", _truncated_arrow, DataError),
    Case("arrow_row_nested_action_input", _arrow_bad_row, DataError),
]


@pytest.mark.parametrize("case", DATA_FILES, ids=lambda c: c.id)
def test_bad_data_file_is_refused(case, tmp_path):
    check_refused(case, tmp_path)


@pytest.mark.parametrize("task, split, options, words", [
    ("riddles", "train", {}, "unknown offline task 'riddles'"),
    ("capitals", "test", {}, "unknown split 'test'"),
    ("probe", "train", {"probe_num_train": 10_000}, "probe_num_train=10000"),
])
def test_bad_offline_task_request_names_the_value(task, split, options, words):
    with pytest.raises(ValueError, match=words):
        offline_tasks.make_task(task, split, offline_tasks.OfflineTaskConfig(**options))
