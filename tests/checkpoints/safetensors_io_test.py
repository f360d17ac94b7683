"""Memory-mapped safetensors reading, bf16 included; what a model directory's files may point to.
(Malformed headers and indexes: tests/bad_inputs/model_files_test.py.)"""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdft_jax.checkpoints.safetensors_io import INDEX_FILE, SafetensorsDir
from sdft_jax.errors import ModelError


def test_reads_every_dtype_exactly(tmp_path):
    values = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "bf16": (np.arange(5, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16),
        "i64": np.array([1, -2, 3], np.int64),
    }
    save_file(values, str(tmp_path / "model.safetensors"))
    d = SafetensorsDir(tmp_path)
    assert d.names == set(values)
    for name, value in values.items():
        got = d.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(np.asarray(got), value)


def test_corrupt_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes((100).to_bytes(8, "little") + b"{not json" + b" " * 100)
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        SafetensorsDir(tmp_path)


def test_index_listing_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(ModelError, match="shard files that are missing"):
        SafetensorsDir(tmp_path)


def test_empty_and_scalar_tensors(tmp_path):
    save_file({"empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5, np.float32)},
              str(tmp_path / "model.safetensors"))
    d = SafetensorsDir(tmp_path)
    assert d.read("empty").shape == (0, 3) and float(d.read("scalar")) == 2.5


def test_hugging_face_cache_snapshots_may_link_into_their_blobs(tmp_path):
    """The hub cache keeps `snapshots/<revision>/<file>` as symlinks to `../../blobs/<hash>`: allowed; a
    link anywhere else is not, even from a snapshot."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    save_file({"w": np.arange(3, dtype=np.float32)}, str(repo / "blobs" / "0a1b2c"))
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    os.symlink("../../blobs/0a1b2c", snapshot / "model.safetensors")
    np.testing.assert_array_equal(SafetensorsDir(snapshot).read("w"), np.arange(3, dtype=np.float32))
    save_file({"v": np.ones(2, np.float32)}, str(tmp_path / "elsewhere.safetensors"))
    os.symlink(tmp_path / "elsewhere.safetensors", snapshot / "model-extra.safetensors")
    with pytest.raises(ModelError, match="model-extra.safetensors: resolves to .*outside the model directory"):
        SafetensorsDir(snapshot)


def test_index_paths_may_wander_but_must_end_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "sub/../model.safetensors"}}))
    assert SafetensorsDir(tmp_path).entry("w").file == str(tmp_path / "model.safetensors")
