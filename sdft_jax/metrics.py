"""Per-step metrics to JSONL and TensorBoard (tensorboardX), from the primary process only.

`metrics.jsonl` is append-only: one row per line, flushed as written. A kill can leave only its last
line torn (no newline); readers drop such a line, and a writer cuts it off before appending. Rows
after a resumed run's checkpoint are dropped by `truncate_metrics`, which writes the kept rows to a
temporary file and renames it over the old one, so a kill during it loses nothing.

Every line is strict JSON. A non-finite float (a diverged step's loss) is written as `null`, and the
row's `"nonfinite"` object holds its value as a string (`{"loss": "NaN"}`, `"Infinity"`,
`"-Infinity"`; inside a list value, the list with those strings in place); `read_metrics` puts the
floats back. TensorBoard gets the finite scalars only.

A run directory in a bucket (`gs://`) has no append: rows and event files then go to a local staging
directory, and `flush()` / `close()` upload them whole (the trainer flushes at every checkpoint, so a
resumed run finds the rows up to its checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import math
import uuid
from collections.abc import Callable, Mapping

import numpy as np

from sdft_jax import storage

METRICS_FILE = "metrics.jsonl"
NONFINITE_KEY = "nonfinite"  # a row's map of its non-finite values, as strings


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _is_nonfinite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _spelled(value):
    """`value` with every non-finite float as its JSON5 spelling ("NaN", "Infinity", "-Infinity")."""
    if isinstance(value, list):
        return [_spelled(v) for v in value]
    if _is_nonfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _nulled(value):
    if isinstance(value, list):
        return [_nulled(v) for v in value]
    return None if _is_nonfinite(value) else value


def _has_nonfinite(value) -> bool:
    return any(_has_nonfinite(v) for v in value) if isinstance(value, list) else _is_nonfinite(value)


def _unspelled(value):
    if isinstance(value, list):
        return [_unspelled(v) for v in value]
    return float(value) if isinstance(value, str) else value


def encode_row(row: Mapping[str, object]) -> str:
    """One strict-JSON line (no newline) for a row: non-finite floats as `null`, spelled in `"nonfinite"`."""
    row = {k: _plain(v) for k, v in row.items()}
    nonfinite = {k: _spelled(v) for k, v in row.items() if _has_nonfinite(v)}
    if nonfinite:
        row = {**{k: _nulled(v) for k, v in row.items()}, NONFINITE_KEY: nonfinite}
    return json.dumps(row, allow_nan=False)


def decode_row(line: str) -> dict:
    """The row `encode_row` wrote, its non-finite floats restored."""
    row = json.loads(line)
    for key, spelled in row.pop(NONFINITE_KEY, {}).items():
        row[key] = _unspelled(spelled)
    return row


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
        if os.path.exists(jsonl):
            _cut_torn_line(jsonl)  # a row appended to a torn one would corrupt both
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
        self._jsonl.write(encode_row(row) + "\n")  # one write of a whole line: a kill tears only this line
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if (key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
                        and math.isfinite(value)):
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


def _cut_torn_line(path: str) -> None:
    """Cuts a last line without its newline (what a kill mid-write leaves) off a local JSONL file."""
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        storage.write_bytes(path, data[:data.rfind(b"\n") + 1])  # a rewrite, through a rename


def _complete_lines(path: str) -> tuple[list[str], bool]:
    """The lines of a JSONL file that end in a newline, and whether a torn last line (a kill's leftover,
    without its newline) followed them."""
    *lines, tail = storage.read_text(path).split("\n")
    return lines, tail != ""


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of `{run_dir}/metrics.jsonl`, non-finite values restored, a torn last line left out.

    Raises ValueError naming the file and line for a line that is not JSON (only the last line can be
    torn by a kill; anything else is damage this module did not make).
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [row for _, row in _rows(path, _complete_lines(path)[0])]


def _rows(path: str, lines: list[str]) -> list[tuple[str, dict]]:
    """(line, row) for each non-empty line; a line that is not a row is a ValueError naming file and line."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((line, decode_row(line)))
        except ValueError as e:
            raise ValueError(f"{path}: line {number}: not a metrics row ({e})") from None
    return rows


def truncate_metrics(run_dir: str, keep: Callable[[dict], bool]) -> int:
    """Keeps the rows of `{run_dir}/metrics.jsonl` for which `keep(row)` holds (those a resumed run will
    not write again) and drops a torn last line; returns the number of rows dropped.

    The kept rows are written whole under a temporary name and renamed over the file (uploaded whole to
    a bucket), so a kill during it leaves the old file or the new one. The file is not touched when
    nothing is dropped.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return 0
    lines, torn = _complete_lines(path)
    rows = _rows(path, lines)
    kept = [line for line, row in rows if keep(row)]
    dropped = len(rows) - len(kept)
    if dropped or torn:
        storage.write_text(path, "".join(line + "\n" for line in kept))
    return dropped
