"""Metric rows in a local run directory: JSONL rows readable after a flush, TensorBoard events, plain values."""

import json
import os

import numpy as np

from sdft_jax.metrics import METRICS_FILE, MetricsWriter, read_metrics


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
