"""Metric rows in a local run directory: JSONL rows readable after a flush, TensorBoard events, plain values,
strict JSON for non-finite values, a torn last line dropped, truncation that a kill cannot half-do."""

import json
import os

import numpy as np
import pytest

from sdft_jax.metrics import METRICS_FILE, MetricsWriter, read_metrics, truncate_metrics


def test_rows_are_plain_json_and_readable_after_flush(tmp_path):
    run = str(tmp_path / "run")
    writer = MetricsWriter(run)
    writer.write(1, {"loss": np.float32(0.5), "tokens": np.int64(7), "lengths": np.array([1, 2]), "ok": True})
    writer.flush()
    assert read_metrics(run) == [{"step": 1, "loss": 0.5, "tokens": 7, "lengths": [1, 2], "ok": True}]
    writer.write(2, {"loss": 0.25})
    writer.close()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert os.listdir(os.path.join(run, "tensorboard"))[0].startswith("events.out.tfevents")
    # A second writer (a resumed run) appends.
    writer = MetricsWriter(run, tensorboard=False)
    writer.write(3, {"loss": 0.125})
    writer.close()
    lines = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "run"), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert not (tmp_path / "run").exists() and read_metrics(str(tmp_path / "run")) == []


def _strict(line: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_nonfinite_values_are_strict_json_and_read_back(tmp_path, monkeypatch):
    import tensorboardX

    scalars = []
    monkeypatch.setattr(tensorboardX.SummaryWriter, "add_scalar", lambda self, key, *a, **k: scalars.append(key))
    run = str(tmp_path / "run")
    writer = MetricsWriter(run)
    writer.write(1, {"loss": np.float32("nan"), "grad_norm": float("inf"), "kl": -np.inf, "ok": 1.5,
                     "lengths": np.array([1.0, np.nan])})
    writer.close()
    line = (tmp_path / "run" / METRICS_FILE).read_text()
    assert _strict(line) == {"step": 1, "loss": None, "grad_norm": None, "kl": None, "ok": 1.5, "lengths": [1.0, None],
                             "nonfinite": {"loss": "NaN", "grad_norm": "Infinity", "kl": "-Infinity",
                                           "lengths": [1.0, "NaN"]}}
    (row,) = read_metrics(run)
    assert np.isnan(row["loss"]) and row["grad_norm"] == np.inf and row["kl"] == -np.inf and row["ok"] == 1.5
    assert row["lengths"][0] == 1.0 and np.isnan(row["lengths"][1]) and "nonfinite" not in row
    assert scalars == ["ok"]  # TensorBoard gets the finite scalars (its writer prints a warning per other one)


def test_a_torn_last_line_is_dropped_by_readers_and_cut_by_writers(tmp_path):
    """A kill during a row's write leaves a last line without its newline."""
    run = str(tmp_path / "run")
    writer = MetricsWriter(run, tensorboard=False)
    writer.write(1, {"loss": 0.5})
    writer.close()
    path = tmp_path / "run" / METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')
    assert read_metrics(run) == [{"step": 1, "loss": 0.5}]
    writer = MetricsWriter(run, tensorboard=False)  # a resumed run appends after the last whole row
    writer.write(2, {"loss": 0.25})
    writer.close()
    assert [_strict(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text(path.read_text() + "garbage\n" + '{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 3: not a metrics row"):
        read_metrics(run)


def _rows(steps):
    return "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in steps)


def test_truncate_keeps_rows_and_replaces_the_file_whole(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    path = run / METRICS_FILE
    path.write_text(_rows([1, 2, 3, 4]) + '{"step": 5, "lo')
    assert truncate_metrics(str(run), keep=lambda r: r["step"] <= 2) == 2
    assert path.read_text() == _rows([1, 2])
    before = os.stat(path).st_ino
    assert truncate_metrics(str(run), keep=lambda r: True) == 0 and os.stat(path).st_ino == before  # untouched
    assert truncate_metrics(str(tmp_path / "none"), keep=lambda r: False) == 0


def test_a_kill_during_the_rewrite_loses_no_row(tmp_path, monkeypatch):
    """Killed before the rename (the rewritten file complete or not), the old file is whole; the
    temporary file is never read and `storage.remove_partials` removes it at the next start."""
    from sdft_jax import cache, storage

    run = tmp_path / "run"
    run.mkdir()
    path = run / METRICS_FILE
    path.write_text(_rows([1, 2, 3]))

    class Killed(BaseException):
        pass

    def killed(src, dst):
        raise Killed

    monkeypatch.setattr(cache.os, "replace", killed)
    monkeypatch.setattr(cache.os, "remove", lambda p: None)  # a kill runs no clean-up
    with pytest.raises(Killed):
        truncate_metrics(str(run), keep=lambda r: r["step"] <= 1)
    monkeypatch.undo()
    assert path.read_text() == _rows([1, 2, 3]) and [r["step"] for r in read_metrics(str(run))] == [1, 2, 3]
    (partial,) = [p for p in os.listdir(run) if p != METRICS_FILE]
    assert partial.startswith(".metrics.jsonl.partial-")
    assert storage.remove_partials(str(run)) == [str(run / partial)] and os.listdir(run) == [METRICS_FILE]
    assert truncate_metrics(str(run), keep=lambda r: r["step"] <= 1) == 2 and path.read_text() == _rows([1])
