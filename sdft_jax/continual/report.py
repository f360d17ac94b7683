"""The continual experiment's report: results.csv, results.md (Stage-1 and Stage-2 tables) and results.png.

Everything is read back from the run directories (per-item eval rows), so a report can be rebuilt at
any time. Noise: every accuracy difference comes with a 95% paired bootstrap interval that resamples
*clusters* of eval items sharing a gold answer (the offline tasks ask each trained fact several times
in different words, so items of one fact are not independent). A difference whose interval excludes
0 (a retention whose interval excludes 1) is marked `*`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any

import numpy as np

from sdft_jax import storage
from sdft_jax.continual.plan import Plan

BOOTSTRAP_SAMPLES = 2000
MIN_RATIO_CLUSTERS = 3  # a ratio's interval needs the denominator's correct items in this many clusters


@dataclasses.dataclass(frozen=True)
class TaskScores:
    """One model's per-item results on one task."""

    correct: np.ndarray  # [N] bool, ordered by item index
    clusters: np.ndarray  # [N] int, items sharing a gold answer share a cluster

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.correct.size else 0.0


def read_scores(path: str) -> TaskScores:
    """Reads an eval JSONL (rows with index, correct, expected) into TaskScores."""
    rows = []
    for line_no, line in enumerate(storage.read_text(path).split("\n"), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows.append((int(row["index"]), bool(row["correct"]), json.dumps(row["expected"], sort_keys=True)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {line_no}: not an eval row ({e})") from None
    rows.sort()
    labels = {g: i for i, g in enumerate(dict.fromkeys(g for _, _, g in rows))}
    return TaskScores(correct=np.array([c for _, c, _ in rows], bool),
                      clusters=np.array([labels[g] for _, _, g in rows], np.int64))


def _paired(a: TaskScores, b: TaskScores) -> None:
    if a.correct.shape != b.correct.shape or not np.array_equal(a.clusters, b.clusters):
        raise ValueError("paired comparison of evaluations over different items")


def _cluster_resamples(clusters: np.ndarray, rng: np.random.Generator, samples: int) -> np.ndarray:
    """[samples, n_clusters] counts: how often each cluster is drawn in each bootstrap resample."""
    n = int(clusters.max()) + 1 if clusters.size else 0
    return rng.multinomial(n, np.full(n, 1.0 / n), size=samples) if n else np.zeros((samples, 0))


def _cluster_sums(values: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    return np.bincount(clusters, weights=values.astype(np.float64), minlength=int(clusters.max()) + 1)


def bootstrap_difference(after: TaskScores, before: TaskScores, *, samples: int = BOOTSTRAP_SAMPLES,
                         seed: int = 0) -> tuple[float, float, float]:
    """(after - before accuracy, 95% interval low, high) by a paired cluster bootstrap."""
    _paired(after, before)
    counts = _cluster_resamples(after.clusters, np.random.default_rng(seed), samples)
    diff = _cluster_sums(after.correct.astype(float) - before.correct, after.clusters)
    sizes = np.bincount(after.clusters).astype(np.float64)
    boot = (counts @ diff) / (counts @ sizes)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return after.accuracy - before.accuracy, float(lo), float(hi)


def bootstrap_ratio(after: TaskScores, before: TaskScores, *, samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = 0) -> tuple[float, float, float]:
    """(after / before accuracy, 95% interval) by a paired cluster bootstrap; nan when `before` is 0."""
    _paired(after, before)
    if before.correct.sum() == 0:
        return math.nan, math.nan, math.nan
    if len(np.unique(before.clusters[before.correct])) < MIN_RATIO_CLUSTERS:
        # With the correct items of `before` in one or two clusters, every resample that has any gives
        # (nearly) the same ratio: an interval would claim a precision the data does not have.
        return after.accuracy / before.accuracy, math.nan, math.nan
    counts = _cluster_resamples(after.clusters, np.random.default_rng(seed), samples)
    num = counts @ _cluster_sums(after.correct, after.clusters)
    den = counts @ _cluster_sums(before.correct, before.clusters)
    ok = den > 0
    lo, hi = np.percentile(num[ok] / den[ok], [2.5, 97.5])
    return after.accuracy / before.accuracy, float(lo), float(hi)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Point:
    """A model evaluated on every task of the plan: the base model (stage 0) or a run after a stage."""

    method: str
    learning_rate: float | None
    seed: int | None
    stage: int
    run_dir: str
    scores: dict[str, TaskScores]


def collect(plan: Plan) -> tuple[Point, list[Point]]:
    """(base point, finished run points) read from disk; unfinished runs are left out."""
    base = Point(method="base", learning_rate=None, seed=None, stage=0, run_dir=plan.base_dir,
                 scores={t: read_scores(os.path.join(plan.base_dir, "eval", f"{t}.jsonl")) for t in plan.eval_tasks})
    points = []
    for run in plan.runs:
        run_dir = run.config.run_dir
        summary_path = os.path.join(run_dir, "summary.json")
        if not storage.exists(summary_path):
            continue
        # the run's step count as trained (with train.epochs, known only once its data was loaded)
        steps = storage.read_json(summary_path)["steps"]
        eval_dir = os.path.join(run_dir, "eval", f"step_{steps:06d}")
        points.append(Point(method=run.method, learning_rate=run.learning_rate, seed=run.seed, stage=run.stage,
                            run_dir=run_dir,
                            scores={t: read_scores(os.path.join(eval_dir, f"{t}.jsonl")) for t in plan.eval_tasks}))
    return base, points


def _stage1_points(points: list[Point]) -> dict[tuple, Point]:
    """Stage-1 points by (method, learning rate, seed): what each stage-2 point started from."""
    return {(p.method, p.learning_rate, p.seed): p for p in points if p.stage == 1}


def _rows(plan: Plan, base: Point, points: list[Point]) -> list[dict[str, Any]]:
    stage1 = _stage1_points(points)
    rows = []
    for p in [base, *points]:
        row: dict[str, Any] = {"method": p.method, "learning_rate": p.learning_rate, "seed": p.seed,
                               "stage": p.stage}
        for task in plan.eval_tasks:
            s = p.scores[task]
            row[f"{task}_accuracy"] = s.accuracy
            row[f"{task}_correct"] = int(s.correct.sum())
            row[f"{task}_total"] = int(s.correct.size)
            d, lo, hi = bootstrap_difference(s, base.scores[task])
            row.update({f"{task}_delta_vs_base": d, f"{task}_delta_lo": lo, f"{task}_delta_hi": hi})
        first = stage1.get((p.method, p.learning_rate, p.seed))
        if p.stage == 2 and first is not None:
            r, lo, hi = bootstrap_ratio(p.scores[plan.task_a], first.scores[plan.task_a])
            row.update({f"{plan.task_a}_retention": r, f"{plan.task_a}_retention_lo": lo,
                        f"{plan.task_a}_retention_hi": hi})
        row["run_dir"] = p.run_dir
        rows.append(row)
    return rows


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def _interval(value: float, lo: float, hi: float, null: float, percent_points: bool = True) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isnan(lo):
        return f"{100 * value:.0f}% [n/a: too few facts]"
    mark = "*" if lo > null or hi < null else ""
    if percent_points:
        return f"{100 * value:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"
    return f"{100 * value:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]{mark}"


def _method_differences(plan: Plan, points: list[Point], reference: str = "sft") -> list[str]:
    """Markdown rows: each method minus `reference` (same stage, LR and seed) on every task, paired."""
    ref = {(p.stage, p.learning_rate, p.seed): p for p in points if p.method == reference}
    lines = []
    for p in points:
        other = ref.get((p.stage, p.learning_rate, p.seed))
        if p.method == reference or other is None:
            continue
        cells = [str(p.stage), p.method, f"{p.learning_rate:g}", str(p.seed)]
        cells += [_interval(*bootstrap_difference(p.scores[t], other.scores[t]), 0.0) for t in plan.eval_tasks]
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = _table_head(["stage", "method", "lr", "seed", *(f"{t}: method - {reference}" for t in plan.eval_tasks)])
    return ["", f"## Each method against {reference} (same stage, LR and seed; paired over items)", "", head, *lines]


def _markdown(plan: Plan, rows: list[dict[str, Any]], points: list[Point]) -> str:
    a, b, probes = plan.task_a, plan.task_b, plan.probe_tasks
    base = rows[0]
    n = ", ".join(f"{t} {base[f'{t}_total']}" for t in plan.eval_tasks)
    lines = [
        f"# Continual learning: {a} (stage 1) then {b} (stage 2)", "",
        "Base model: " + ", ".join(f"{t} {_pct(base[f'{t}_accuracy'])}% ({base[f'{t}_correct']}/"
                                    f"{base[f'{t}_total']})" for t in plan.eval_tasks) + f". Eval items: {n}.",
        "Accuracies in %. Deltas in percentage points with a 95% paired cluster-bootstrap interval "
        f"({BOOTSTRAP_SAMPLES} resamples of items grouped by gold answer); `*` = the interval excludes 0 "
        "(retention: excludes 100%).", "",
    ]
    old = [b, *probes]  # what stage 1 may make the model forget
    header = ["method", "lr", "seed", a, b, *probes] + [f"{t} delta vs base" for t in old]
    lines += ["## Stage 1 (trained on " + a + ")", "", _table_head(header)]
    for r in rows:
        if r["stage"] == 1:
            cells = [r["method"], f"{r['learning_rate']:g}", str(r["seed"])]
            cells += [_pct(r[f"{t}_accuracy"]) for t in plan.eval_tasks]
            cells += [_interval(r[f"{t}_delta_vs_base"], r[f"{t}_delta_lo"], r[f"{t}_delta_hi"], 0.0) for t in old]
            lines.append("| " + " | ".join(cells) + " |")
    header = ["method", "lr", "seed", a, b, *probes, f"{a} retention (stage 2 / stage 1)"]
    header += [f"{t} delta vs base" for t in probes]
    lines += ["", "## Stage 2 (trained on " + b + ", starting from stage 1)", "", _table_head(header)]
    for r in rows:
        if r["stage"] == 2:
            cells = [r["method"], f"{r['learning_rate']:g}", str(r["seed"])]
            cells += [_pct(r[f"{t}_accuracy"]) for t in plan.eval_tasks]
            key = f"{a}_retention"
            cells.append(_interval(r[key], r[f"{key}_lo"], r[f"{key}_hi"], 1.0, percent_points=False)
                         if key in r else "n/a")
            cells += [_interval(r[f"{t}_delta_vs_base"], r[f"{t}_delta_lo"], r[f"{t}_delta_hi"], 0.0) for t in probes]
            lines.append("| " + " | ".join(cells) + " |")
    lines += _method_differences(plan, points)
    lines += ["", "Plot: `results.png` (each point a method and LR; arrows go from stage 1 to stage 2)."]
    return "\n".join(lines) + "\n"


def _table_head(header: list[str]) -> str:
    return "| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|"


def _plot(plan: Plan, base: Point, points: list[Point]) -> bytes:
    """The PNG of the accuracy plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [plan.task_a, *plan.probe_tasks]  # y axes: old skills; x axis: the stage-2 task
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    methods = list(dict.fromkeys(p.method for p in points))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    stage1 = _stage1_points(points)
    for ax, y_task in zip(axes[0], panels):
        acc = lambda p, t: 100 * p.scores[t].accuracy  # noqa: E731
        ax.scatter([acc(base, plan.task_b)], [acc(base, y_task)], marker="*", s=220, color="black", label="base",
                   zorder=3)
        for p in points:
            c = colors[p.method]
            xy = (acc(p, plan.task_b), acc(p, y_task))
            face = "none" if p.stage == 1 else c
            ax.scatter(*xy, s=60, edgecolors=c, facecolors=face, zorder=3)
            ax.annotate(f"{p.learning_rate:g}", xy, textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
            first = stage1.get((p.method, p.learning_rate, p.seed))
            if p.stage == 2 and first is not None:
                ax.annotate("", xy=xy, xytext=(acc(first, plan.task_b), acc(first, y_task)),
                            arrowprops={"arrowstyle": "->", "color": c, "lw": 1.2})
        for m in methods:
            ax.scatter([], [], color=colors[m], label=m)
        ax.set_xlabel(f"{plan.task_b} accuracy (%) - the stage-2 task")
        ax.set_ylabel(f"{y_task} accuracy (%)" + (" - the stage-1 task" if y_task == plan.task_a else
                                                  " - prior knowledge"))
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle("Hollow: after stage 1; filled: after stage 2; labels: learning rate")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


def write_report(plan: Plan) -> str:
    """Writes results.csv, results.md and results.png into the plan's out_dir (local or remote); returns
    results.md's path."""
    base, points = collect(plan)
    rows = _rows(plan, base, points)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(os.path.join(plan.out_dir, "results.csv"), table.getvalue())
    md = os.path.join(plan.out_dir, "results.md")
    storage.write_text(md, _markdown(plan, rows, points))
    storage.write_bytes(os.path.join(plan.out_dir, "results.png"), _plot(plan, base, points))
    return md
