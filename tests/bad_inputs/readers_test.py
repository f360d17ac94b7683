"""Bad inputs to every reader: data rows and files, model directories, safetensors headers and indexes,
GGUF files, predictions files.

Each case builds one bad input and asserts the error's class (and so the command's exit status,
`sdft_jax.errors`) and that its message names the file and the row or tensor. A bad data row is also
read with `skip_bad_rows`: skipped and counted under its reason, the good row kept. A few cases run
through the commands too (`cli.run`): one line on stderr, no traceback, the class's exit status.
(Config and command-line cases: the other files of this folder.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import struct
from collections.abc import Callable
from typing import Any

import datasets
import gguf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from sdft_jax import cli, convert, errors, evaluate
from sdft_jax.checkpoints.gguf import gguf_to_hf
from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.checkpoints.safetensors_io import INDEX_FILE, SafetensorsDir
from sdft_jax.data import offline_tasks, readers
from sdft_jax.data.records import DataError
from sdft_jax.errors import ModelError
from sdft_jax.eval.predictions import read_predictions

from tests.checkpoints.gguf_test import write_gguf_like_llama_cpp


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: `make(tmp_path)` writes it and returns the call that must fail and the words its
    message must contain (the file, and the row or tensor)."""

    id: str
    make: Callable[[pathlib.Path], tuple[Callable[[], Any], list[str]]]
    error: type[Exception]


def check_refused(case: Case, tmp_path: pathlib.Path) -> str:
    call, words = case.make(tmp_path)
    with pytest.raises(case.error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    expected_status = {DataError: errors.DATA, ModelError: errors.MODEL}[case.error]
    assert errors.classify(info.value).status == expected_status
    assert "\n" not in message  # one line
    return message


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


# --- model directories ------------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> pathlib.Path:
    """A fresh copy of the tiny Llama directory, to damage."""
    return pathlib.Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "model"))


def _tensors(d: pathlib.Path) -> dict[str, np.ndarray]:
    st = SafetensorsDir(d)
    return {n: np.asarray(st.read(n)) for n in sorted(st.names)}


def _edit_config(edit: Callable[[dict], Any]) -> Callable:
    def damage(d: pathlib.Path) -> list[str]:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(edit(config)))
        return [str(d / "config.json")]
    return damage


def _garbled_config(d):
    (d / "config.json").write_bytes(b'{"model_type": "llama",')
    return [str(d / "config.json"), "not valid JSON"]


def _no_config(d):
    os.remove(d / "config.json")
    return [str(d), "missing config.json"]


def _no_weights(d):
    os.remove(d / "model.safetensors")
    return [str(d), "no model weights"]


def _pickle_only(d):
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    return [str(d), "pytorch_model.bin", "never unpickles"]


def _sharded(d: pathlib.Path) -> dict[str, str]:
    """Splits the weights into two shards with an index; returns the weight map."""
    tensors = _tensors(d)
    os.remove(d / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(d / file))
        weight_map.update({n: file for n in part})
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def _index_garbled(d):
    _sharded(d)
    (d / INDEX_FILE).write_bytes(b'{"weight_map": {"a": ')
    return [str(d / INDEX_FILE), "not a valid safetensors index"]


def _index_not_utf8(d):
    _sharded(d)
    (d / INDEX_FILE).write_bytes(b'{"weight_map": {"\xff": "x.safetensors"}}')
    return [str(d / INDEX_FILE), "not a valid safetensors index"]


def _index_weight_map_a_list(d):
    _sharded(d)
    (d / INDEX_FILE).write_text('{"weight_map": ["model-00001-of-00002.safetensors"]}')
    return [str(d / INDEX_FILE), "weight_map must be a non-empty object"]


def _index_value_not_a_file_name(d):
    weight_map = _sharded(d)
    weight_map["lm_head.weight"] = 7
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return [str(d / INDEX_FILE), "tensor 'lm_head.weight' is mapped to 7"]


def _index_missing_shard(d):
    _sharded(d)
    os.remove(d / "model-00002-of-00002.safetensors")
    return [str(d / INDEX_FILE), "missing: ['model-00002-of-00002.safetensors']"]


def _index_wrong_shard(d):
    weight_map = _sharded(d)
    name = "model.norm.weight"
    weight_map[name] = next(f for f in set(weight_map.values()) if f != weight_map[name])
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return [str(d / INDEX_FILE), f"tensor {name!r} is mapped to {weight_map[name]}, which does not hold it"]


def _outside_copy(d: pathlib.Path) -> pathlib.Path:
    """Every weight of the model in one valid file OUTSIDE the model directory: loadable, if reached."""
    outside = d.parent / "outside"
    outside.mkdir()
    save_file(_tensors(d), str(outside / "x.safetensors"))
    return outside / "x.safetensors"


def _index_escapes_with_dotdot(d):
    _outside_copy(d)
    tensors = _tensors(d)
    os.remove(d / "model.safetensors")
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": {n: "../outside/x.safetensors" for n in tensors}}))
    return [str(d / INDEX_FILE), "'../outside/x.safetensors', outside the model directory"]


def _index_escapes_with_absolute_path(d):
    target = _outside_copy(d)
    tensors = _tensors(d)
    os.remove(d / "model.safetensors")
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": {n: str(target) for n in tensors}}))
    return [str(d / INDEX_FILE), f"{str(target)!r}, outside the model directory"]


def _index_escapes_through_a_symlink(d):
    target = _outside_copy(d)
    tensors = _tensors(d)
    os.remove(d / "model.safetensors")
    os.symlink(target, d / "x.safetensors")
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": {n: "x.safetensors" for n in tensors}}))
    return [str(d / "x.safetensors"), f"resolves to {target}, outside the model directory"]


def _weights_symlinked_out(d):
    target = _outside_copy(d)
    os.remove(d / "model.safetensors")
    os.symlink(os.path.relpath(target, d), d / "model.safetensors")
    return [str(d / "model.safetensors"), "outside the model directory"]


def _index_names_a_pickle(d):
    weight_map = _sharded(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    weight_map["lm_head.weight"] = "pytorch_model.bin"
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return [str(d / INDEX_FILE), "'pytorch_model.bin', not a .safetensors file name"]


def _tensor_missing(d):
    tensors = _tensors(d)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    return [str(d), "1 tensors missing", "model.layers.1.mlp.up_proj.weight"]


def _tensor_extra(d):
    tensors = _tensors(d)
    tensors["model.layers.0.cross_attn.q_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    return [str(d), "model.layers.0.cross_attn.q_proj.weight", "not used by the llama architecture"]


def _tensor_wrong_shape(d):
    tensors = _tensors(d)
    name = "model.embed_tokens.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, str(d / "model.safetensors"))
    return [str(d / "model.safetensors"), f"tensor {name} has shape"]


def _tensor_wrong_dtype(d):
    tensors = _tensors(d)
    name = "model.embed_tokens.weight"
    tensors[name] = tensors[name].astype(np.int32)
    save_file(tensors, str(d / "model.safetensors"))
    return [str(d / "model.safetensors"), f"tensor {name} has dtype I32, expected a floating-point one"]


def _weights_truncated(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [str(d / "model.safetensors"), "outside the file", "truncated or corrupt"]


def _model_case(id: str, damage: Callable[[pathlib.Path], list[str]]) -> Case:
    def make(tmp_path):
        d = tmp_path / "model"
        return (lambda: load_hf(d)), damage(d)
    return Case(id, make, ModelError)


MODEL_DIRS = [
    _model_case("config_missing", _no_config),
    _model_case("config_not_json", _garbled_config),
    _model_case("config_a_list", _edit_config(lambda c: [c])),
    _model_case("config_hidden_size_a_string", _edit_config(lambda c: {**c, "hidden_size": "64"})),
    _model_case("config_zero_heads", _edit_config(lambda c: {**c, "num_attention_heads": 0})),
    _model_case("config_negative_layers", _edit_config(lambda c: {**c, "num_hidden_layers": -1})),
    _model_case("config_unknown_model_type", _edit_config(lambda c: {**c, "model_type": "gpt_neox"})),
    _model_case("config_without_model_type", _edit_config(lambda c: {k: v for k, v in c.items()
                                                                      if k != "model_type"})),
    _model_case("no_weights", _no_weights),
    _model_case("pickle_only", _pickle_only),
    _model_case("index_garbled", _index_garbled),
    _model_case("index_not_utf8", _index_not_utf8),
    _model_case("index_weight_map_a_list", _index_weight_map_a_list),
    _model_case("index_value_not_a_file_name", _index_value_not_a_file_name),
    _model_case("index_names_a_pickle", _index_names_a_pickle),
    _model_case("index_missing_shard", _index_missing_shard),
    _model_case("index_maps_a_tensor_to_the_wrong_shard", _index_wrong_shard),
    _model_case("index_escapes_with_dotdot", _index_escapes_with_dotdot),
    _model_case("index_escapes_with_an_absolute_path", _index_escapes_with_absolute_path),
    _model_case("index_escapes_through_a_symlink", _index_escapes_through_a_symlink),
    _model_case("weights_symlinked_outside", _weights_symlinked_out),
    _model_case("tensor_missing", _tensor_missing),
    _model_case("tensor_not_of_the_architecture", _tensor_extra),
    _model_case("tensor_wrong_shape", _tensor_wrong_shape),
    _model_case("tensor_wrong_dtype", _tensor_wrong_dtype),
    _model_case("weights_truncated", _weights_truncated),
]


@pytest.mark.parametrize("case", MODEL_DIRS, ids=lambda c: c.id)
def test_bad_model_directory_is_refused(case, model_copy, tmp_path):
    check_refused(case, tmp_path)


def test_not_a_directory(tmp_path):
    check_refused(Case("not_a_directory", lambda p: ((lambda: load_hf(p / "nope")), [str(p / "nope")]), ModelError),
                  tmp_path)


# --- safetensors headers -----------------------------------------------------------------------------------

F32_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _safetensors(header: dict | bytes, data: bytes = b"\x00" * 8, length: int | None = None) -> Callable:
    """A `model.safetensors` of `header` (a dict, or raw bytes) and `data`: the call that reads it."""
    def make(tmp_path):
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        size = len(raw) if length is None else length
        file = tmp_path / "model.safetensors"
        file.write_bytes(struct.pack("<Q", size) + raw + data)
        return (lambda: SafetensorsDir(tmp_path)), [str(file)]
    return make


def _words(make: Callable, *words: str) -> Callable:
    def wrapped(tmp_path):
        call, found = make(tmp_path)
        return call, [*found, *words]
    return wrapped


def _too_short(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02\x03")
    return (lambda: SafetensorsDir(tmp_path)), [str(tmp_path / "model.safetensors"), "no header"]


def _same_tensor_in_two_files(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / name))
    return (lambda: SafetensorsDir(tmp_path)), [str(tmp_path / "b.safetensors"), "tensor 'w' is also in",
                                                str(tmp_path / "a.safetensors")]


HEADERS = [
    Case("file_shorter_than_the_length", _too_short, ModelError),
    Case("header_length_huge", _words(_safetensors({"w": F32_ENTRY}, length=2**63), "over the safetensors limit"),
         ModelError),
    Case("header_length_past_the_end", _words(_safetensors({"w": F32_ENTRY}, length=10_000), "truncated"),
         ModelError),
    Case("header_not_json", _words(_safetensors(b"{not json"), "corrupt safetensors header"), ModelError),
    Case("header_not_utf8", _words(_safetensors(b'{"\xff": 1}'), "corrupt safetensors header"), ModelError),
    Case("header_nested_past_the_parser", _words(_safetensors(b"[" * 100_000), "corrupt safetensors header"),
         ModelError),
    Case("header_a_list", _words(_safetensors(b"[1, 2]"), "a JSON list, not an object"), ModelError),
    Case("metadata_not_strings", _words(_safetensors({"__metadata__": {"format": 1}, "w": F32_ENTRY}),
                                        "__metadata__"), ModelError),
    Case("entry_not_an_object", _words(_safetensors({"w": [0, 8]}), "tensor 'w'", "not an object"), ModelError),
    Case("entry_without_dtype", _words(_safetensors({"w": {"shape": [2], "data_offsets": [0, 8]}}),
                                       "tensor 'w'", "unsupported dtype None"), ModelError),
    Case("unknown_dtype", _words(_safetensors({"w": {**F32_ENTRY, "dtype": "Q4_K"}}), "tensor 'w'",
                                 "unsupported dtype 'Q4_K'"), ModelError),
    Case("dtype_not_a_string", _words(_safetensors({"w": {**F32_ENTRY, "dtype": ["F32"]}}), "tensor 'w'",
                                      "unsupported dtype"), ModelError),
    Case("shape_negative", _words(_safetensors({"w": {**F32_ENTRY, "shape": [-2]}}), "tensor 'w'", "shape"),
         ModelError),
    Case("shape_a_string", _words(_safetensors({"w": {**F32_ENTRY, "shape": "2"}}), "tensor 'w'", "shape"),
         ModelError),
    Case("shape_of_booleans", _words(_safetensors({"w": {**F32_ENTRY, "shape": [True, True]}}), "tensor 'w'",
                                     "shape"), ModelError),
    Case("offsets_missing", _words(_safetensors({"w": {"dtype": "F32", "shape": [2]}}), "tensor 'w'",
                                   "data_offsets"), ModelError),
    Case("offsets_reversed", _words(_safetensors({"w": {**F32_ENTRY, "data_offsets": [8, 0]}}), "tensor 'w'",
                                    "data_offsets"), ModelError),
    Case("offsets_of_floats", _words(_safetensors({"w": {**F32_ENTRY, "data_offsets": [0.0, 8.0]}}),
                                     "tensor 'w'", "data_offsets"), ModelError),
    Case("offsets_outside_the_file", _words(_safetensors({"w": {**F32_ENTRY, "shape": [200],
                                                                "data_offsets": [0, 800]}}),
                                            "tensor 'w'", "outside the file"), ModelError),
    Case("bytes_do_not_match_the_shape", _words(_safetensors({"w": {**F32_ENTRY, "shape": [3]}}), "tensor 'w'",
                                                "holds 8 bytes, but shape [3] of F32 needs 12"), ModelError),
    Case("tensors_overlap", _words(_safetensors({"a": F32_ENTRY, "b": {**F32_ENTRY, "data_offsets": [4, 12]}},
                                                data=b"\x00" * 12), "tensors 'a' and 'b' overlap"), ModelError),
    Case("same_tensor_in_two_files", _same_tensor_in_two_files, ModelError),
]


@pytest.mark.parametrize("case", HEADERS, ids=lambda c: c.id)
def test_bad_safetensors_header_is_refused(case, tmp_path):
    check_refused(case, tmp_path)


# --- GGUF files --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> bytes:
    """The bytes of a tiny Llama GGUF written as llama.cpp writes it."""
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf_like_llama_cpp(tiny_model_dir("llama", rope_scaling=None), out)
    return out.read_bytes()


def _gguf_case(id: str, damage: Callable[[bytes], bytes] | None = None,
               edit: Callable[[gguf.GGUFReader], Any] | None = None, words: tuple[str, ...] = ()) -> Case:
    """A GGUF file damaged as bytes (`damage`) or in place through a writable reader (`edit`)."""
    def make(tmp_path):
        data = tmp_path.joinpath("source.gguf").read_bytes()
        path = tmp_path / "bad.gguf"
        path.write_bytes(damage(data) if damage else data)
        if edit is not None:
            reader = gguf.GGUFReader(path, "r+")
            edit(reader)
            reader.data.flush()
            del reader
        return (lambda: gguf_to_hf(path, tmp_path / "out")), [str(path), *words]
    return Case(id, make, ModelError)


def _set_offset(tensor: int, to: Callable[[gguf.GGUFReader], int]) -> Callable:
    def edit(reader):
        reader.tensors[tensor].field.parts[-1][0] = to(reader)
    return edit


def _rename_string(field: str, new: bytes) -> Callable:
    def edit(reader):
        reader.fields[field].parts[-1][:] = np.frombuffer(new, np.uint8)
    return edit


def _rename_tensor(new: bytes) -> Callable:
    def edit(reader):
        reader.tensors[0].field.parts[1][:] = np.frombuffer(new, np.uint8)
    return edit


GGUF_FILES = [
    _gguf_case("empty", lambda d: b"", words=("not a readable GGUF file",)),
    _gguf_case("bad_magic", lambda d: b"GGML" + d[4:], words=("GGUF magic invalid",)),
    _gguf_case("unknown_version", lambda d: d[:4] + struct.pack("<I", 99) + d[8:], words=("version 99",)),
    _gguf_case("cut_in_the_header", lambda d: d[:64], words=("truncated or corrupt",)),
    _gguf_case("cut_in_the_metadata", lambda d: d[:2000], words=("truncated or corrupt",)),
    _gguf_case("cut_in_the_tensor_data", lambda d: d[: len(d) // 2], words=("truncated or corrupt",)),
    _gguf_case("last_bytes_missing", lambda d: d[:-3], words=("truncated or corrupt",)),
    _gguf_case("tensor_offset_past_the_end", edit=_set_offset(0, lambda r: 10**9), words=("truncated or corrupt",)),
    _gguf_case("tensor_runs_past_the_end", edit=_set_offset(0, lambda r: r.tensors[-1].data_offset
                                                            - r.data_offset + 64),
               words=("truncated or corrupt",)),
    _gguf_case("tensors_overlap", edit=_set_offset(1, lambda r: r.tensors[0].data_offset - r.data_offset),
               words=("overlap",)),
    _gguf_case("unsupported_architecture", edit=_rename_string("general.architecture", b"gpt_x"),
               words=("architecture 'gpt_x' is not supported",)),
    _gguf_case("tensor_without_an_hf_name", edit=_rename_tensor(b"outpux.weight"),
               words=("tensor 'outpux.weight' has no HF counterpart",)),
]


@pytest.mark.parametrize("case", GGUF_FILES, ids=lambda c: c.id)
def test_bad_gguf_file_is_refused(case, tiny_gguf, tmp_path):
    (tmp_path / "source.gguf").write_bytes(tiny_gguf)
    check_refused(case, tmp_path)
    assert not (tmp_path / "out").exists()


def test_the_undamaged_gguf_converts(tiny_gguf, tmp_path):
    (tmp_path / "t.gguf").write_bytes(tiny_gguf)
    assert gguf_to_hf(tmp_path / "t.gguf", tmp_path / "out") == str(tmp_path / "out")


def test_missing_gguf_file(tmp_path):
    check_refused(Case("missing", lambda p: ((lambda: gguf_to_hf(p / "no.gguf", p / "out")), [str(p / "no.gguf")]),
                       ModelError), tmp_path)


# --- predictions files -------------------------------------------------------------------------------------

# (id, file contents, words besides the file: the row and what is wrong)
BAD_PREDICTIONS = [
    ("index_true", b'{"index": true, "completion": "x"}', "row 0 (line 1): index must be an int in [0, 4), got true"),
    ("index_false_on_line_2", b'{"index": 1, "completion": "x"}\n{"index": false, "completion": "y"}',
     "row 1 (line 2): index must be an int in [0, 4), got false"),
    ("index_a_float", b'{"index": 1.0, "completion": "x"}', "row 0 (line 1): index must be an int"),
    ("index_a_string", b'{"index": "1", "completion": "x"}', "row 0 (line 1): index must be an int"),
    ("index_out_of_range", b'{"index": 4, "completion": "x"}', "row 0 (line 1): index must be an int in [0, 4)"),
    ("index_negative", b'{"index": -1, "completion": "x"}', "row 0 (line 1): index must be an int in [0, 4)"),
    ("index_twice", b'{"index": 2, "completion": "x"}\n\n{"index": 2, "completion": "y"}',
     "row 2 (line 3): index 2 appears twice"),
    ("not_utf8", b'{"index": 0, "completion": "x"}\n{"index": 1, "completion": "caf\xe9"}',
     "row 1 (line 2): invalid UTF-8 at byte 31"),
    ("nested_past_the_parser", b'{"index": 0, "completion": ' + b"[" * 100_000, "row 0 (line 1): need"),
    ("not_json", b"index 0: x", "row 0 (line 1): need"),
    ("a_list", b"[0, \"x\"]", "row 0 (line 1): need"),
    ("no_completion", b'{"index": 0}', "row 0 (line 1): need"),
    ("completion_a_list", b'{"index": 0, "completion": ["x"]}', "row 0 (line 1): completion must be a string"),
    ("truncated_a_string", b'{"index": 0, "completion": "x", "truncated": "no"}',
     "row 0 (line 1): truncated must be true or false"),
]


@pytest.mark.parametrize("content, words", [c[1:] for c in BAD_PREDICTIONS], ids=[c[0] for c in BAD_PREDICTIONS])
def test_bad_predictions_file_is_refused(content, words, tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(content)
    check_refused(Case("", lambda p: ((lambda: read_predictions(path, 4)), [f"{path}: {words}"]), DataError),
                  tmp_path)


def test_missing_predictions_file(tmp_path):
    check_refused(Case("", lambda p: ((lambda: read_predictions(p / "none.jsonl", 4)),
                                      [str(p / "none.jsonl"), "cannot read"]), DataError), tmp_path)


def test_good_predictions_are_read(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b'{"index": 3, "completion": "caf\xc3\xa9"}\n\n{"index": 0, "completion": "", "truncated": true}\n')
    assert read_predictions(path, 4) == {3: ("caf\u00e9", False), 0: ("", True)}


# --- through the commands: one line, no traceback, the class's exit status ----------------------------------


def _predictions_cli(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b'{"index": 0, "completion": "x"}\n{"index": true, "completion": "y"}\n')
    return evaluate.main, ["--task", "capitals", "--predictions", str(path)], [str(path), "row 1 (line 2)"]


def _predictions_not_utf8_cli(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b'{"index": 0, "completion": "\xff"}\n')
    return evaluate.main, ["--task", "capitals", "--predictions", str(path)], [str(path), "row 0 (line 1)"]


def _gguf_cli(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + b"\x00" * 60)
    return convert.main, ["gguf", str(path), str(tmp_path / "out")], [str(path), "GGUF magic invalid"]


def _model_cli(tmp_path):
    d = tmp_path / "model"
    _index_escapes_with_dotdot(d)
    return evaluate.main, ["--task", "capitals", "--model", str(d), "--limit", "1"], [
        str(d / INDEX_FILE), "outside the model directory"]


@pytest.mark.parametrize("make, status, label", [
    (_predictions_cli, errors.DATA, "bad data"),
    (_predictions_not_utf8_cli, errors.DATA, "bad data"),
    (_gguf_cli, errors.MODEL, "bad model"),
    (_model_cli, errors.MODEL, "bad model"),
], ids=["predictions_index_true", "predictions_not_utf8", "gguf_bad_magic", "model_index_escape"])
def test_commands_report_one_line_and_the_class_status(make, status, label, model_copy, tmp_path, capsys):
    main, argv, words = make(tmp_path)
    assert cli.run(main, argv, prog="cmd") == status
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cmd: {label}: ") and "\n" not in err and "Traceback" not in err
    for word in words:
        assert word in err
