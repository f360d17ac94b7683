"""Per-step metrics to JSONL and TensorBoard (tensorboardX), from the primary process only.

A run directory in a bucket (`gs://`) has no append: rows and event files then go to a local staging
directory, and `flush()` / `close()` upload them whole (the trainer flushes at every checkpoint, so a
resumed run finds the rows up to its checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping

import numpy as np

from sdft_jax import storage

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


class MetricsWriter:
    """Appends `{"step": n, ...}` lines to `{run_dir}/metrics.jsonl` and scalars to TensorBoard."""

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.run_dir = run_dir
        self._staging = tempfile.mkdtemp(prefix="sdft_jax-metrics-") if storage.is_remote(run_dir) else None
        local = self._staging or run_dir
        os.makedirs(local, exist_ok=True)
        jsonl = os.path.join(local, METRICS_FILE)
        remote_jsonl = os.path.join(run_dir, METRICS_FILE)
        if self._staging and storage.exists(remote_jsonl):  # continue the rows of the earlier attempts
            with open(jsonl, "wb") as f:
                f.write(storage.read_bytes(remote_jsonl))
        self._jsonl = open(jsonl, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # Each writer makes its own event file (named by the second it started, plus a random suffix
            # when uploaded), so an upload never replaces an earlier attempt's.
            suffix = f".{uuid.uuid4().hex[:8]}" if self._staging else ""
            self._tb = SummaryWriter(os.path.join(local, "tensorboard"), filename_suffix=suffix)

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))

    def flush(self) -> None:
        """Makes every row written so far readable in the run directory (uploads it for a remote one)."""
        if self.enabled:
            self._publish(close=False)

    def close(self) -> None:
        """Flushes (or uploads) everything, then closes the files; the writer takes no more rows."""
        if not self.enabled:
            return
        self._publish(close=True)
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _publish(self, *, close: bool) -> None:
        """Flushes or closes the JSONL and event files, then uploads the staging directory of a remote run."""
        for file in (self._jsonl, self._tb):
            if file is None:
                continue
            if close:
                file.close()
            else:
                file.flush()
        if self._staging:
            storage.copy_tree(self._staging, self.run_dir)


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of `{run_dir}/metrics.jsonl` (for tests and reports)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).split("\n") if line.strip()]
