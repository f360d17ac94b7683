"""What each stage trained on, from its metric rows: the signal that explains a stage that does not learn.

Per finished stage (`metrics.jsonl`), the mean of each training metric over its first and its last
`window` steps: the loss, the full-vocabulary KL(teacher || student) and the teacher's entropy at the
completion tokens (SDFT), the rollouts' mean length and how they stopped (a stop token, or the length
limit), and the share of completion tokens the loss scored (the rest skipped: `loss.skip_first_tokens`,
or masked). A metric a method does not log (SFT has no KL) is left out of its row.

`signal_rows` gives one row per stage (`signal.csv`); `signal_markdown` the report's table of stage 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from sdft_jax.metrics import read_metrics

# (column, metrics.jsonl key) of the averaged metrics; `scored_frac` is computed from two keys.
METRICS = (("loss", "loss"), ("kl", "kl"), ("teacher_entropy", "teacher_entropy"),
           ("mean_length", "rollout/mean_length"), ("stop_token_frac", "rollout/stop_token_frac"),
           ("length_frac", "rollout/length_frac"))
WINDOW = 8


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def stage_signal(run_dir: str, *, window: int = WINDOW) -> dict[str, float]:
    """`{"<column>_first": mean over the first `window` steps, "<column>_last": over the last, ...}` of a
    stage's metric rows (training rows only), plus `steps`; empty when the stage has no metric rows."""
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    if not rows:
        return {}
    out: dict[str, float] = {"steps": len(rows)}
    for part, chosen in (("first", rows[:window]), ("last", rows[-window:])):
        for column, key in METRICS:
            values = [float(r[key]) for r in chosen if key in r]
            if values:
                out[f"{column}_{part}"] = _mean(values)
        scored = [(float(r["scored_tokens"]), float(r["completion_tokens"])) for r in chosen
                  if "scored_tokens" in r and r.get("completion_tokens")]
        if scored:
            out[f"scored_frac_{part}"] = sum(s for s, _ in scored) / sum(c for _, c in scored)
    return out


def signal_rows(points: Sequence[Any], *, window: int = WINDOW) -> list[dict[str, Any]]:
    """One row per trained point (`report.Point`, stage >= 1): method, lr, seed, stage, `stage_signal`."""
    rows = []
    for p in points:
        if p.stage < 1:
            continue
        signal = stage_signal(p.run_dir, window=window)
        if signal:
            rows.append({"method": p.method, "learning_rate": p.learning_rate, "seed": p.seed, "stage": p.stage,
                         **signal, "run_dir": os.fspath(p.run_dir)})
    return rows


def _cell(row: dict[str, Any], column: str, fmt: str) -> str:
    first, last = row.get(f"{column}_first"), row.get(f"{column}_last")
    if first is None or last is None:
        return "n/a"
    return f"{first:{fmt}} -> {last:{fmt}}"


def signal_markdown(rows: Sequence[dict[str, Any]], *, stage: int = 2, window: int = WINDOW) -> list[str]:
    """The report's table of one stage's training signal (first -> last `window` steps, means)."""
    chosen = [r for r in rows if r["stage"] == stage]
    if not chosen:
        return []
    head = ["method", "lr", "seed", "loss", "KL(teacher||student)", "teacher entropy", "rollout length",
            "stopped by a stop token", "stopped at the length limit", "scored tokens"]
    lines = ["", f"## Stage {stage}'s training signal", "",
             f"Means over its first {window} steps -> its last {window} (`signal.csv`: every stage): the loss, the "
             "full-vocabulary KL and the teacher's entropy per completion token (nats), the rollouts' mean length "
             "(tokens) and how they stopped, and the share of completion tokens the loss scored.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in chosen:
        cells = [r["method"], f"{r['learning_rate']:g}", str(r["seed"]), _cell(r, "loss", ".3f"), _cell(r, "kl", ".3f"),
                 _cell(r, "teacher_entropy", ".3f"), _cell(r, "mean_length", ".1f"),
                 _cell(r, "stop_token_frac", ".2f"), _cell(r, "length_frac", ".2f"), _cell(r, "scored_frac", ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
