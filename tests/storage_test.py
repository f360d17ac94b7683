"""Local and gs:// files through one API; the gs:// path runs against fsspec's in-memory filesystem."""

import json
import os
import pathlib
from typing import ClassVar

import fsspec
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry

from sdft_jax import storage
from sdft_jax.errors import ModelError


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """gs:// served by a fresh in-memory filesystem (etils.epath's fsspec backend asks fsspec for "gcs");
    the local cache moves to tmp_path. Returns the filesystem class (its `store` holds the objects)."""

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: ClassVar[dict] = {}
        pseudo_dirs: ClassVar[list] = [""]

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            for prefix in ("gs://", "gcs://"):
                path = path.removeprefix(prefix)
            return super()._strip_protocol(path)

    for name in ("gs", "gcs"):
        monkeypatch.setitem(fsspec_registry, name, FakeGCS)
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)  # epath would pick TF's gfile
    monkeypatch.setenv("SDFT_JAX_CACHE", str(tmp_path / "cache"))
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert isinstance(fsspec.filesystem("gcs"), FakeGCS)
    yield FakeGCS
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def listdir(path):
    """The sorted names under a local or gs:// directory, read without the module under test."""
    return sorted(p.name for p in epath.Path(path).iterdir())


def test_is_remote():
    assert storage.is_remote("gs://bucket/run") and not storage.is_remote("/tmp/run")
    assert not storage.is_remote("runs/x")


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("fake_gcs")
    return "gs://bucket/root"


def test_whole_file_operations(root):
    storage.makedirs(os.path.join(root, "sub"))
    assert not storage.exists(os.path.join(root, "a.json"))
    storage.write_json(os.path.join(root, "a.json"), {"x": [1, "é"]})
    storage.write_text(os.path.join(root, "sub", "b.txt"), "line 1\nline 2\n")
    storage.write_bytes(os.path.join(root, "c.bin"), b"\x00\xff")
    assert storage.read_json(os.path.join(root, "a.json")) == {"x": [1, "é"]}
    assert storage.read_text(os.path.join(root, "a.json")) == json.dumps({"x": [1, "é"]}, indent=2)
    assert storage.read_text(os.path.join(root, "sub", "b.txt")) == "line 1\nline 2\n"
    assert storage.read_bytes(os.path.join(root, "c.bin")) == b"\x00\xff"
    assert listdir(root) == ["a.json", "c.bin", "sub"]
    assert epath.Path(root, "sub").is_dir() and not epath.Path(root, "c.bin").is_dir()
    storage.write_text(os.path.join(root, "sub", "b.txt"), "replaced")  # a write replaces the whole file
    assert storage.read_text(os.path.join(root, "sub", "b.txt")) == "replaced"
    storage.rmtree(os.path.join(root, "sub"))
    assert not storage.exists(os.path.join(root, "sub", "b.txt")) and listdir(root) == ["a.json", "c.bin"]
    storage.rmtree(os.path.join(root, "missing"))  # nothing to remove is not an error


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing catches it on the way out."""


def _kill(*args):
    raise _Killed


def test_a_local_write_is_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails midway (or a kill during it) leaves the old file whole; what a kill left under
    the temporary name is never read and `remove_partials` deletes it (anywhere under the run directory)."""
    from sdft_jax import cache

    path = tmp_path / "run" / "summary.json"
    storage.makedirs(path.parent)
    storage.write_json(path, {"steps": 1})
    mode = os.stat(path).st_mode

    with pytest.raises(OSError, match="disk full"):
        with cache.atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(b'{"st')
            raise OSError("disk full")
    assert storage.read_json(path) == {"steps": 1} and os.listdir(path.parent) == ["summary.json"]
    # A kill before the rename: no clean-up runs.
    monkeypatch.setattr(cache.os, "replace", _kill)
    monkeypatch.setattr(cache.os, "remove", lambda p: None)
    with pytest.raises(_Killed):
        storage.write_json(path, {"steps": 2})
    monkeypatch.undo()
    assert storage.read_json(path) == {"steps": 1}
    (partial,) = [n for n in os.listdir(path.parent) if n != "summary.json"]
    assert partial.startswith(".summary.json.partial-") and json.loads((path.parent / partial).read_text())
    nested = tmp_path / "run" / "eval" / "step_000001" / ".capitals.jsonl.partial-x"
    export = tmp_path / "run" / ".export.partial-y"
    nested.parent.mkdir(parents=True)
    nested.write_text("half")
    (export / "sub").mkdir(parents=True)
    kept = tmp_path / "run" / "eval" / "step_000001" / "capitals.jsonl"
    kept.write_text("{}\n")
    assert sorted(storage.remove_partials(tmp_path / "run")) == sorted(
        str(p) for p in (path.parent / partial, nested, export))
    assert sorted(os.listdir(path.parent)) == ["eval", "summary.json"] and kept.exists()
    storage.write_json(path, {"steps": 2})
    assert storage.read_json(path) == {"steps": 2} and os.stat(path).st_mode == mode  # an ordinary file
    assert storage.remove_partials("gs://bucket/run") == []  # an interrupted upload leaves no object


def _tree(directory):
    os.makedirs(os.path.join(directory, "sub"))
    files = {"config.json": "{}", "model.safetensors": "weights", "sub/tokenizer.json": "tok"}
    for rel, text in files.items():
        with open(os.path.join(directory, rel), "w") as f:
            f.write(text)
    return files


def test_copy_tree_copies_the_marker_last(root, tmp_path, monkeypatch):
    files = _tree(tmp_path / "src")
    copied = []
    copy_file = storage._copy_file
    monkeypatch.setattr(storage, "_copy_file", lambda src, dst: (copied.append(dst), copy_file(src, dst)))
    storage.copy_tree(tmp_path / "src", root, last=["config.json"])
    assert copied[-1] == os.path.join(root, "config.json") and len(copied) == 3
    for rel, text in files.items():
        assert storage.read_text(os.path.join(root, rel)) == text


def test_local_copy_passes_local_paths_through(tmp_path):
    assert storage.local_copy(tmp_path) == str(tmp_path)


def test_local_copy_downloads_once(fake_gcs, tmp_path, monkeypatch):
    files = _tree(tmp_path / "src")
    storage.copy_tree(tmp_path / "src", "gs://bucket/models/m")
    local = storage.local_copy("gs://bucket/models/m/")
    assert local.startswith(str(tmp_path / "cache")) and os.path.basename(local) == "m"
    for rel, text in files.items():
        assert pathlib.Path(local, rel).read_text() == text
    # Remote inputs are immutable: a second call reuses the copy without reading the bucket.
    monkeypatch.setattr(storage, "_download", lambda *a: pytest.fail("downloaded twice"))
    assert storage.local_copy("gs://bucket/models/m") == local
    # A single remote file is copied too (a JSONL data file).
    monkeypatch.undo()
    monkeypatch.setenv("SDFT_JAX_CACHE", str(tmp_path / "cache"))
    single = storage.local_copy("gs://bucket/models/m/sub/tokenizer.json")
    assert os.path.basename(single) == "tokenizer.json" and pathlib.Path(single).read_text() == "tok"
    with pytest.raises(FileNotFoundError, match="gs://bucket/nothing: does not exist"):
        storage.local_copy("gs://bucket/nothing")


def test_local_copy_never_trusts_a_half_download(fake_gcs, tmp_path, monkeypatch):
    _tree(tmp_path / "src")
    storage.copy_tree(tmp_path / "src", "gs://bucket/data")
    copy_file = storage._copy_file
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise ConnectionError("network gone")
        copy_file(src, dst)

    monkeypatch.setattr(storage, "_copy_file", fail_second)
    with pytest.raises(ConnectionError):
        storage.local_copy("gs://bucket/data")
    assert os.listdir(tmp_path / "cache" / "remote") == []  # the partial download was removed
    monkeypatch.setattr(storage, "_copy_file", copy_file)
    local = storage.local_copy("gs://bucket/data")
    assert sorted(os.listdir(local)) == ["config.json", "model.safetensors", "sub"]


# -- the modules that write run, model and data files ------------------------------------------------------


def test_metrics_writer_uploads_on_flush_and_continues_rows(fake_gcs):
    from sdft_jax.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter("gs://bucket/run")
    writer.write(1, {"loss": 0.5})
    assert read_metrics("gs://bucket/run") == []  # nothing uploaded before a flush
    writer.flush()
    assert read_metrics("gs://bucket/run") == [{"step": 1, "loss": 0.5}]
    writer.write(2, {"loss": 0.25})
    writer.close()
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2]
    events = listdir("gs://bucket/run/tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    # A resumed run appends to the rows already in the bucket, and keeps the earlier event file.
    writer = MetricsWriter("gs://bucket/run")
    writer.write(3, {"loss": 0.125})
    writer.close()
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2, 3]
    assert len(listdir("gs://bucket/run/tensorboard")) == 2


def test_jsonl_task_from_a_bucket(fake_gcs, tmp_path):
    from sdft_jax.data.tasks import load_records

    row = json.dumps({"question": "Q?", "demonstration": "A."}) + "\n"
    storage.write_text("gs://bucket/data/train.jsonl", row)
    storage.write_text("gs://bucket/one.jsonl", row + row)
    assert [r.demonstration for r in load_records("jsonl", "train", data_dir="gs://bucket/data")] == ["A."]
    assert len(load_records("jsonl", "train", data_dir="gs://bucket/one.jsonl")) == 2
    assert os.listdir(tmp_path / "cache" / "remote")  # read from the local copy


def test_remote_export_is_complete_only_with_its_config(fake_gcs, tiny_model_dir):
    import numpy as np

    from sdft_jax.checkpoints.hf import load_hf, save_hf
    from sdft_jax.checkpoints.registry import resolve_model
    from sdft_jax.checkpoints.safetensors_io import SafetensorsDir

    model_dir = tiny_model_dir("llama")
    model = load_hf(model_dir)
    storage.write_text("gs://bucket/export/model.safetensors", "half an upload")  # interrupted, no config.json
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model("gs://bucket/export")
    save_hf(model, "gs://bucket/export", tokenizer_dir=model_dir)
    assert "tokenizer.json" in listdir("gs://bucket/export")
    with pytest.raises(FileExistsError):
        save_hf(model, "gs://bucket/export")
    local = resolve_model("gs://bucket/export")
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(SafetensorsDir(local).read(name), SafetensorsDir(model_dir).read(name))
    assert load_hf(local).cfg == model.cfg


def test_training_run_in_a_bucket(fake_gcs, tiny_model_dir, tmp_path, monkeypatch):
    from sdft_jax import trainer
    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.checkpoints.registry import resolve_model
    from sdft_jax.config import load_train_config
    from sdft_jax.metrics import read_metrics
    from sdft_jax.testing.configs import tiny_config

    # Orbax writes arrays with TensorStore's own GCS driver, which no fsspec filesystem can stand in for
    # (and its CheckpointManager needs google-cloud-storage for gs://): only the checkpoints stay local.
    checkpointer = trainer.Checkpointer
    monkeypatch.setattr(trainer, "Checkpointer", lambda run_dir, **kw: checkpointer(
        str(tmp_path / "ckpt" / run_dir.removeprefix("gs://")), **kw))
    run = "gs://bucket/run"
    cfg = load_train_config(tiny_config(tiny_model_dir("llama"), run, **{
        "eval.tasks": "capitals", "train.steps": 2, "checkpoint.every": 2}))
    summary = trainer.train(cfg)
    assert storage.read_json(f"{run}/config.json")["run_dir"] == run
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]
    assert storage.read_json(f"{run}/summary.json") == summary and summary["export"] == f"{run}/export"
    assert storage.read_json(f"{run}/eval/step_000002/capitals.summary.json")["total"] == 2
    assert len(storage.read_text(f"{run}/eval/step_000002/capitals.jsonl").splitlines()) == 2
    assert listdir(f"{run}/tensorboard")
    assert load_hf(resolve_model(f"{run}/export")).cfg.num_layers > 0
    # Started again on the same bucket directory, the finished run returns its summary without training.
    monkeypatch.setattr(trainer.Trainer, "_evaluate", lambda *a: pytest.fail("trained or evaluated again"))
    monkeypatch.setattr(trainer, "MetricsWriter", lambda *a, **k: pytest.fail("trained again"))
    assert trainer.train(cfg) == summary


def test_continual_report_in_a_bucket(fake_gcs):
    from sdft_jax.continual import runner
    from sdft_jax.continual.plan import make_plan
    from sdft_jax.continual.report import write_report
    from tests.continual.plan_test import continual_config

    c = continual_config()
    c.out_dir, c.methods = "gs://bucket/exp", "sft"
    plan = make_plan(c)
    runs = [(plan.base_dir, os.path.join(plan.base_dir, "eval"))] + [
        (r.config.run_dir, os.path.join(r.config.run_dir, "eval", f"step_{r.config.train.steps:06d}"))
        for r in plan.runs]
    for k, (run_dir, eval_dir) in enumerate(runs):
        for task in plan.eval_tasks:
            rows = [{"index": i, "correct": i < k + 1, "expected": f"{task}-{i}"} for i in range(4)]
            storage.write_text(f"{eval_dir}/{task}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        storage.write_json(f"{run_dir}/summary.json", {"eval": {}, "steps": plan.base_config.train.steps})
    finished = {"eval": {}, "steps": plan.base_config.train.steps}
    assert runner.evaluate_base(plan) == finished  # found finished in the bucket
    assert runner.run_stage(plan.runs[1]) == finished
    storage.rmtree(f"{plan.runs[1].config.run_dir}/summary.json")
    storage.write_text(f"{plan.runs[0].config.run_dir}/export/model.safetensors", "")  # an unfinished upload
    with pytest.raises(ModelError, match="config.init_from: model 'gs://.*/stage1/export': no config.json there"):
        runner.run_stage(plan.runs[1])  # refused before anything loads
    storage.write_json(f"{plan.runs[1].config.run_dir}/summary.json", finished)
    md = write_report(plan)
    assert md == "gs://bucket/exp/results.md" and "| sft |" in storage.read_text(md)
    table = storage.read_text("gs://bucket/exp/results.csv").splitlines()
    assert len(table) == 1 + len(runs) and table[1].startswith("base,")
    assert storage.read_bytes("gs://bucket/exp/results.png")[:8] == b"\x89PNG\r\n\x1a\n"
