"""Bad model files: model directories (config, weights, safetensors indexes that escape the
directory, tensors missing, extra or misshaped), safetensors headers, GGUF files.

Each case damages one input and asserts a ModelError (exit status `errors.MODEL`) whose one-line
message names the file and the tensor or field (`refusals.check_refused`); two run through the
commands as well. The tiny Llama directory to damage is the `model_copy` fixture (conftest.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdft_jax import convert, errors, evaluate
from sdft_jax.checkpoints.gguf import gguf_to_hf
from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.checkpoints.safetensors_io import INDEX_FILE, SafetensorsDir
from sdft_jax.errors import ModelError

from tests.bad_inputs.refusals import Case, check_command_refused, check_refused
from tests.checkpoints.gguf_test import write_gguf_like_llama_cpp


# --- model directories ------------------------------------------------------------------------------------


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


# --- through the commands ------------------------------------------------------------------------------------


def _gguf_cli(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + b"\x00" * 60)
    return convert.main, ["gguf", str(path), str(tmp_path / "out")], [str(path), "GGUF magic invalid"]


def _model_cli(tmp_path):
    d = tmp_path / "model"
    _index_escapes_with_dotdot(d)
    return evaluate.main, ["--task", "capitals", "--model", str(d), "--limit", "1"], [
        str(d / INDEX_FILE), "outside the model directory"]


@pytest.mark.parametrize("make", [_gguf_cli, _model_cli], ids=["gguf_bad_magic", "model_index_escape"])
def test_commands_report_one_line_and_the_model_status(make, model_copy, tmp_path, capsys):
    main, argv, words = make(tmp_path)
    check_command_refused(main, argv, errors.MODEL, "bad model", words, capsys)
