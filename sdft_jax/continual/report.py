"""The continual experiment's report: results.csv, results.md (Stage-1 and Stage-2 tables) and results.png,
and the learning-vs-retention frontier: frontier.png, frontier.csv (per method x LR) and
frontier_seeds.csv (per method x LR x seed).

Everything is read back from the run directories (per-item eval rows), so a report can be rebuilt at
any time. Noise: every accuracy difference comes with a 95% paired bootstrap interval that resamples
*clusters* of eval items sharing a gold answer (the offline tasks ask each trained fact several times
in different words, so items of one fact are not independent). A difference whose interval excludes
0 (a retention whose interval excludes 1) is marked `*` (the intervals: `scores.py`).

The frontier pools a method x LR's seeds: its accuracies are the seeds' mean, its A retention the
seeds' task-A items right after stage 2 over those right after stage 1 (a ratio of means, defined
while any seed learned A), and its intervals the same cluster bootstrap over the seeds' items together
(a resampled fact brings its items of every seed), so they carry the item noise of the seed mean; the
spread between seeds is reported beside them (each seed's point in the plot, their standard deviation
in the CSV). A method's frontier is its points, one per LR, in the plane (A retention, B after stage 2).

Beside them, what each stage trained on (`signal.py`: signal.csv and stage 2's table): KL, teacher
entropy, rollout lengths and stop reasons over its first and last steps.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Any

import numpy as np

from sdft_jax import storage
from sdft_jax.continual.plan import Plan, diverged_path, teacher_eval_dir
from sdft_jax.continual.scores import (BOOTSTRAP_SAMPLES, TaskScores, bootstrap_accuracy, bootstrap_difference,
                                       bootstrap_ratio, pooled, read_scores)
from sdft_jax.continual.signal import signal_markdown, signal_rows

KEEP = 0.8  # the frontier's question: at least this much of task A kept ...
REACH = 0.8  # ... while reaching at least this share of the reference method's best task-B accuracy


@dataclasses.dataclass(frozen=True, kw_only=True)
class Point:
    """A model evaluated on every task of the plan: the base model (stage 0) or a run after a stage."""

    method: str
    learning_rate: float | None
    seed: int | None
    stage: int
    run_dir: str
    scores: dict[str, TaskScores]
    # task B with the demonstration in the prompt (`diagnose_teacher`): for the base point the base model as
    # teacher, for a stage-2 point the stage-1 student as teacher at stage 2's start; None when not measured
    teacher_scores: TaskScores | None = None


def collect(plan: Plan) -> tuple[Point, list[Point]]:
    """(base point, finished run points) read from disk; unfinished runs are left out."""
    def teacher(stage_dir: str) -> TaskScores | None:
        path = os.path.join(teacher_eval_dir(stage_dir), f"{plan.task_b}.jsonl")
        return read_scores(path) if storage.exists(path) else None

    base = Point(method="base", learning_rate=None, seed=None, stage=0, run_dir=plan.base_dir,
                 scores={t: read_scores(os.path.join(plan.base_dir, "eval", f"{t}.jsonl")) for t in plan.eval_tasks},
                 teacher_scores=teacher(plan.base_dir))
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
                            scores={t: read_scores(os.path.join(eval_dir, f"{t}.jsonl")) for t in plan.eval_tasks},
                            teacher_scores=teacher(run_dir) if run.stage == 2 else None))
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


# -- the frontier: task B learned against task A kept, per method x learning rate, seeds pooled -------------

Estimate = tuple[float, float, float]  # a value and its 95% interval (low, high); nan where undefined


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
    """One (method, learning rate, seed) whose two stages have finished."""

    stage1: Point
    stage2: Point


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrontierPoint:
    """A method at one learning rate, its seeds pooled (see the module docstring)."""

    method: str
    learning_rate: float
    seeds: tuple[int, ...]
    a_stage1: Estimate  # task A after stage 1
    b_stage2: Estimate  # task B after stage 2
    retention: Estimate  # task A after stage 2 / after stage 1
    probe_delta: dict[str, Estimate]  # each probe task after stage 2 minus the base model
    seed_b_stage2: tuple[float, ...]  # each seed's own values, in `seeds` order
    seed_retention: tuple[float, ...]


def cells(points: list[Point]) -> list[Cell]:
    """The finished cells, in plan order."""
    stage1 = _stage1_points(points)
    return [Cell(stage1=stage1[p.method, p.learning_rate, p.seed], stage2=p) for p in points
            if p.stage == 2 and (p.method, p.learning_rate, p.seed) in stage1]


def _ratio(after: TaskScores, before: TaskScores) -> float:
    return after.accuracy / before.accuracy if before.accuracy else math.nan


def _seed_sd(values: tuple[float, ...]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def frontier(plan: Plan, base: Point, done: list[Cell]) -> list[FrontierPoint]:
    """One point per method x learning rate (methods in plan order, learning rates ascending)."""
    a, b = plan.task_a, plan.task_b
    groups: dict[tuple[str, float], list[Cell]] = {}
    for cell in done:
        groups.setdefault((cell.stage2.method, cell.stage2.learning_rate), []).append(cell)
    order = list(dict.fromkeys(m for m, _ in groups))
    out = []
    for method, lr in sorted(groups, key=lambda k: (order.index(k[0]), k[1])):
        group = groups[method, lr]
        a1, a2 = pooled([c.stage1.scores[a] for c in group]), pooled([c.stage2.scores[a] for c in group])
        probe = {t: bootstrap_difference(pooled([c.stage2.scores[t] for c in group]),
                                         pooled([base.scores[t]] * len(group))) for t in plan.probe_tasks}
        out.append(FrontierPoint(
            method=method, learning_rate=lr, seeds=tuple(c.stage2.seed for c in group),
            a_stage1=bootstrap_accuracy(a1), b_stage2=bootstrap_accuracy(pooled([c.stage2.scores[b] for c in group])),
            retention=bootstrap_ratio(a2, a1), probe_delta=probe,
            seed_b_stage2=tuple(c.stage2.scores[b].accuracy for c in group),
            seed_retention=tuple(_ratio(c.stage2.scores[a], c.stage1.scores[a]) for c in group)))
    return out


def seed_rows(plan: Plan, base: Point, done: list[Cell]) -> list[dict[str, Any]]:
    """frontier_seeds.csv: per method x LR x seed, A after stage 1, B after stage 2, A retention (with its
    cluster-bootstrap interval), each probe's delta vs the base model, and the teacher-with-demonstration
    accuracies on B where measured (nan where not)."""
    a, b = plan.task_a, plan.task_b
    rows = []
    for cell in done:
        first, second = cell.stage1, cell.stage2
        row: dict[str, Any] = {"method": second.method, "learning_rate": second.learning_rate, "seed": second.seed,
                               f"{a}_stage1": first.scores[a].accuracy, f"{b}_stage1": first.scores[b].accuracy,
                               f"{b}_stage2": second.scores[b].accuracy}
        r, lo, hi = bootstrap_ratio(second.scores[a], first.scores[a])
        row.update({f"{a}_retention": r, f"{a}_retention_lo": lo, f"{a}_retention_hi": hi})
        for t in plan.probe_tasks:
            d, lo, hi = bootstrap_difference(second.scores[t], base.scores[t])
            row.update({f"{t}_delta": d, f"{t}_delta_lo": lo, f"{t}_delta_hi": hi})
        row[f"teacher_stage1_{b}"] = second.teacher_scores.accuracy if second.teacher_scores else math.nan
        row[f"teacher_base_{b}"] = base.teacher_scores.accuracy if base.teacher_scores else math.nan
        rows.append(row)
    return rows


def frontier_rows(plan: Plan, points: list[FrontierPoint]) -> list[dict[str, Any]]:
    """frontier.csv: per method x LR, the pooled estimates with their intervals and the seeds' spread."""
    a, b = plan.task_a, plan.task_b
    rows = []
    for p in points:
        row: dict[str, Any] = {"method": p.method, "learning_rate": p.learning_rate,
                               "seeds": " ".join(map(str, p.seeds)), "n_seeds": len(p.seeds)}
        for name, (value, lo, hi) in ((f"{a}_stage1", p.a_stage1), (f"{b}_stage2", p.b_stage2),
                                      (f"{a}_retention", p.retention),
                                      *((f"{t}_delta", p.probe_delta[t]) for t in plan.probe_tasks)):
            row.update({name: value, f"{name}_lo": lo, f"{name}_hi": hi})
        row[f"{b}_stage2_seed_sd"] = _seed_sd(p.seed_b_stage2)
        row[f"{a}_retention_seed_sd"] = _seed_sd(p.seed_retention)
        rows.append(row)
    return rows


def best_at_retention(points: list[FrontierPoint], method: str, keep: float = KEEP) -> FrontierPoint | None:
    """The method's learning rate with the highest task-B accuracy among those keeping >= `keep` of task A
    (point estimates); None when none does."""
    kept = [p for p in points if p.method == method and not math.isnan(p.retention[0]) and p.retention[0] >= keep]
    return max(kept, key=lambda p: p.b_stage2[0], default=None)


def _pct0(x: float) -> str:
    return f"{100 * x:.1f}%"


def frontier_answer(points: list[FrontierPoint], *, reference: str = "sft") -> tuple[str, str]:
    """("yes" | "no" | "not measured", one sentence): is there a setting where an SDFT method reaches at
    least REACH of the reference's best task-B accuracy while keeping at least KEEP of task A? Point
    estimates (their intervals are in the tables)."""
    ref = [p for p in points if p.method == reference]
    sdft = [p for p in points if p.method != reference and p.method.startswith("sdft")]
    if not ref or not sdft:
        missing = f"no {reference} runs" if not ref else "no SDFT runs"
        return "not measured", f"Not measured: {missing} with both stages finished."
    best_ref = max(ref, key=lambda p: p.b_stage2[0])
    target = REACH * best_ref.b_stage2[0]
    best_txt = (f"{reference}'s best task B is {_pct0(best_ref.b_stage2[0])} (lr {best_ref.learning_rate:g}), so "
                f"the bar is {_pct0(target)}")
    hits = [p for p in sdft if not math.isnan(p.retention[0]) and p.retention[0] >= KEEP and p.b_stage2[0] >= target]
    if hits:
        p = max(hits, key=lambda q: q.b_stage2[0])
        return "yes", (f"Yes: {p.method} at lr {p.learning_rate:g} reaches {_pct0(p.b_stage2[0])} on task B and keeps "
                       f"{100 * p.retention[0]:.0f}% of task A; {best_txt}.")
    why = []
    for method in dict.fromkeys(p.method for p in sdft):
        kept = best_at_retention(points, method)
        top = max((p for p in sdft if p.method == method), key=lambda p: p.b_stage2[0])
        kept_txt = (f"at >= {KEEP:.0%} A retention its best task B is {_pct0(kept.b_stage2[0])} (lr "
                    f"{kept.learning_rate:g})" if kept else f"no learning rate keeps {KEEP:.0%} of A")
        ret = "n/a" if math.isnan(top.retention[0]) else f"{100 * top.retention[0]:.0f}%"
        why.append(f"{method}: {kept_txt}; its highest task B, {_pct0(top.b_stage2[0])} (lr "
                   f"{top.learning_rate:g}), keeps {ret} of A")
    return "no", f"No: {best_txt}; " + "; ".join(why) + "."


def _estimate(e: Estimate, *, points: bool = False) -> str:
    value, lo, hi = e
    if math.isnan(value):
        return "n/a"
    fmt = (lambda x: f"{100 * x:+.1f}") if points else (lambda x: f"{100 * x:.1f}")
    return f"{fmt(value)} [{'n/a' if math.isnan(lo) else fmt(lo)}, {'n/a' if math.isnan(hi) else fmt(hi)}]"


def _frontier_markdown(plan: Plan, base: Point, done: list[Cell], points: list[FrontierPoint]) -> list[str]:
    a, b = plan.task_a, plan.task_b
    lines = ["", f"## Frontier: {b} after stage 2 against {a} retention (seeds pooled)", "",
             "Per method x LR: seed means, 95% cluster-bootstrap intervals over the seeds' items together; "
             "`frontier.csv` (also the seeds' standard deviation), `frontier_seeds.csv` (each seed), `frontier.png`.",
             "", _table_head(["method", "lr", "seeds", f"{a} after stage 1", f"{b} after stage 2",
                              f"{a} retention (%)", *(f"{t} delta vs base" for t in plan.probe_tasks)])]
    for p in points:
        cells_ = [p.method, f"{p.learning_rate:g}", " ".join(map(str, p.seeds)), _estimate(p.a_stage1),
                  _estimate(p.b_stage2), _estimate(p.retention), *(_estimate(p.probe_delta[t], points=True)
                                                                   for t in plan.probe_tasks)]
        lines.append("| " + " | ".join(cells_) + " |")
    lines += ["", f"Best {b} at >= {KEEP:.0%} {a} retention (point estimates):", ""]
    for method in dict.fromkeys(p.method for p in points):
        best = best_at_retention(points, method)
        lines.append(f"- {method}: " + (f"{_pct0(best.b_stage2[0])} at lr {best.learning_rate:g} (retention "
                                         f"{100 * best.retention[0]:.0f}%)" if best else
                                         f"none (no learning rate keeps {KEEP:.0%} of {a})"))
    verdict, sentence = frontier_answer(points)
    lines += ["", f"**Does SDFT reach >= {REACH:.0%} of SFT's best {b} while keeping >= {KEEP:.0%} of {a}?** "
              f"({verdict}) {sentence}"]
    measured = [c for c in done if c.stage2.teacher_scores is not None]
    if measured or base.teacher_scores is not None:
        base_teacher = _pct(base.teacher_scores.accuracy) if base.teacher_scores else "n/a"
        lines += ["", f"## The teacher on {b} with the demonstration in its prompt, at stage 2's start", "",
                  f"Base model as teacher: {base_teacher}%. Accuracies in %; the student columns are the "
                  "usual prompt (the question alone).", "",
                  _table_head(["method", "lr", "seed", f"student {b} after stage 1",
                               f"teacher (stage-1 student + demonstration) {b}", f"student {b} after stage 2"])]
        for c in measured:
            lines.append("| " + " | ".join([c.stage2.method, f"{c.stage2.learning_rate:g}", str(c.stage2.seed),
                                            _pct(c.stage1.scores[b].accuracy), _pct(c.stage2.teacher_scores.accuracy),
                                            _pct(c.stage2.scores[b].accuracy)]) + " |")
    return lines


def diverged_markdown(plan: Plan) -> list[str]:
    """The stages that diverged (their `diverged.json`): no point in the tables or plots, listed here."""
    found = [(run, storage.read_json(diverged_path(run.config.run_dir))) for run in plan.runs
             if storage.exists(diverged_path(run.config.run_dir))]
    if not found:
        return []
    lines = ["", "## Diverged", "", "Stopped by the trainer (too many consecutive non-finite steps, or a non-finite "
             "state), nothing exported; the stage 2 after a diverged stage 1 was not run.", "",
             _table_head(["method", "lr", "seed", "stage", "stopped at step", "non-finite steps"])]
    for run, record in found:
        lines.append("| " + " | ".join([run.method, f"{run.learning_rate:g}", str(run.seed), str(run.stage),
                                        str(record.get("step")), str(record.get("nonfinite_steps"))]) + " |")
    return lines


def _frontier_plot(plan: Plan, points: list[FrontierPoint]) -> bytes:
    """The PNG of the frontier: B after stage 2 against A retention, one point per method x LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = plan.task_a, plan.task_b
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    methods = list(dict.fromkeys(p.method for p in points))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    right = 110.0
    for method in methods:
        mine = [p for p in points if p.method == method and not math.isnan(p.retention[0])]
        c = colors[method]
        for p in mine:
            for r, acc in zip(p.seed_retention, p.seed_b_stage2):  # each seed, faint
                if not math.isnan(r):
                    ax.scatter(100 * r, 100 * acc, s=14, color=c, alpha=0.35, zorder=2)
                    right = max(right, 100 * r + 5)
            x, y = 100 * p.retention[0], 100 * p.b_stage2[0]
            xerr = [[0 if math.isnan(p.retention[1]) else x - 100 * p.retention[1]],
                    [0 if math.isnan(p.retention[2]) else 100 * p.retention[2] - x]]
            yerr = [[y - 100 * p.b_stage2[1]], [100 * p.b_stage2[2] - y]]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", color=c, ms=7, capsize=3, lw=1.2, zorder=3)
            ax.annotate(f"{p.learning_rate:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8,
                        color=c)
            right = max(right, (100 * p.retention[2] if not math.isnan(p.retention[2]) else x) + 5)
        if mine:  # the method's frontier, in learning-rate order
            ax.plot([100 * p.retention[0] for p in mine], [100 * p.b_stage2[0] for p in mine], color=c, lw=1,
                    alpha=0.6, zorder=1)
        ax.scatter([], [], color=c, label=method)
    ax.axvline(100 * KEEP, color="gray", ls="--", lw=0.8)
    ref = [p for p in points if p.method == "sft"]
    if ref:
        ax.axhline(100 * REACH * max(p.b_stage2[0] for p in ref), color="gray", ls=":", lw=0.8,
                   label=f"{REACH:.0%} of sft's best {b}")
    ax.set_xlabel(f"{a} retention (%): after stage 2 / after stage 1")
    ax.set_ylabel(f"{b} accuracy after stage 2 (%)")
    ax.set_xlim(-5, right)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8, loc="best")
    ax.set_title("One point per method x LR (label): seed mean, 95% cluster-bootstrap bars; faint: each seed",
                 fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


def _csv_text(rows: list[dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def write_report(plan: Plan) -> str:
    """Writes results.csv, results.md, results.png, the frontier's files (frontier.csv, frontier_seeds.csv,
    frontier.png) and each stage's training signal (signal.csv, `signal.py`) into the plan's out_dir (local
    or remote); returns results.md's path."""
    base, points = collect(plan)
    rows = _rows(plan, base, points)
    storage.write_text(os.path.join(plan.out_dir, "results.csv"), _csv_text(rows))
    done = cells(points)
    front = frontier(plan, base, done)
    storage.write_text(os.path.join(plan.out_dir, "frontier_seeds.csv"), _csv_text(seed_rows(plan, base, done)))
    storage.write_text(os.path.join(plan.out_dir, "frontier.csv"), _csv_text(frontier_rows(plan, front)))
    storage.write_bytes(os.path.join(plan.out_dir, "frontier.png"), _frontier_plot(plan, front))
    signal = signal_rows(points)
    storage.write_text(os.path.join(plan.out_dir, "signal.csv"), _csv_text(signal) if signal else "")
    md = os.path.join(plan.out_dir, "results.md")
    frontier_md = "\n".join(_frontier_markdown(plan, base, done, front) + signal_markdown(signal)
                            + diverged_markdown(plan)) + "\n"
    storage.write_text(md, _markdown(plan, rows, points) + frontier_md)
    storage.write_bytes(os.path.join(plan.out_dir, "results.png"), _plot(plan, base, points))
    return md
