"""The report: tables, CSV and the frontier against the per-item files, checked by hand."""

import csv
import json
import math
import os

import numpy as np
import pytest

from sdft_jax.continual.plan import make_plan
from sdft_jax.continual.report import FrontierPoint, best_at_retention, frontier_answer, write_report
from tests.continual.plan_test import continual_config


def _write_eval(directory, task, correct):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{task}.jsonl"), "w") as f:
        for i, c in enumerate(correct):
            f.write(json.dumps({"index": i, "correct": bool(c), "expected": f"{task}-{i}"}) + "\n")


def test_report_tables_and_csv_from_run_directories(tmp_path):
    c = continual_config()
    c.out_dir = str(tmp_path)
    c.methods = "sft,sdft_topk"
    plan = make_plan(c)
    n = 10
    acc = {  # (method, stage) -> correct counts of (capitals, elements, probe), each out of 10
        ("base", 0): (0, 1, 6), ("sft", 1): (8, 1, 2), ("sft", 2): (2, 9, 1),
        ("sdft_topk", 1): (6, 1, 6), ("sdft_topk", 2): (6, 7, 6)}
    for task, k in zip(plan.eval_tasks, acc["base", 0]):
        _write_eval(os.path.join(plan.base_dir, "eval"), task, [1] * k + [0] * (n - k))
    for run in plan.runs:
        d = os.path.join(run.config.run_dir, "eval", f"step_{run.config.train.steps:06d}")
        for task, k in zip(plan.eval_tasks, acc[run.method, run.stage]):
            _write_eval(d, task, [1] * k + [0] * (n - k))
        with open(os.path.join(run.config.run_dir, "summary.json"), "w") as f:
            json.dump({"steps": run.config.train.steps}, f)  # the trainer's summary records the steps run
    md = open(write_report(plan)).read()
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["stage"]) for r in rows] == [("base", "0"), ("sft", "1"), ("sft", "2"),
                                                           ("sdft_topk", "1"), ("sdft_topk", "2")]
    for r in rows:
        for task, k in zip(plan.eval_tasks, acc[r["method"], int(r["stage"])]):
            assert float(r[f"{task}_accuracy"]) == pytest.approx(k / n)
            assert float(r[f"{task}_delta_vs_base"]) == pytest.approx((k - acc["base", 0][plan.eval_tasks.index(task)]) / n)
            assert float(r[f"{task}_delta_lo"]) <= float(r[f"{task}_delta_vs_base"]) <= float(r[f"{task}_delta_hi"])
    sft2 = rows[2]
    assert float(sft2["capitals_retention"]) == pytest.approx(2 / 8)
    assert "Base model: capitals 0.0% (0/10), elements 10.0% (1/10), probe 60.0% (6/10)" in md
    # Stage 1: SFT dropped the probe from 60% to 20% (-40 points, each item its own cluster: significant).
    assert "| sft | 5e-05 | 0 | 80.0 | 10.0 | 20.0 | +0.0 [+0.0, +0.0] | -40.0 [" in md
    assert "| sdft_topk | 5e-05 | 0 | 60.0 | 70.0 | 60.0 | 100% [100, 100] | +0.0 [+0.0, +0.0] |" in md
    # SDFT against SFT after stage 2: capitals 60 vs 20 (+40), elements 70 vs 90 (-20), probe 60 vs 10 (+50).
    assert "| 2 | sdft_topk | 5e-05 | 0 | +40.0 [" in md
    line = next(x for x in md.splitlines() if x.startswith("| 2 | sdft_topk"))
    assert " | -20.0 [" in line and " | +50.0 [" in line
    line = next(x for x in md.splitlines() if x.startswith("| sft | 5e-05 | 0 | 80.0"))
    assert line.endswith("]* |")
    with open(tmp_path / "results.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- the frontier ---------------------------------------------------------------------------------------------

# Gold answers per item: capitals 3 facts (3 clusters), elements 2 facts asked twice (2 clusters), probe 1 fact.
GOLD = {"capitals": ["c0", "c1", "c2"], "elements": ["e0", "e0", "e1", "e1"], "probe": ["p0", "p0"]}
# (method, lr, seed) -> stage -> task -> correct per item
FRONTIER = {
    # learns a little B, keeps 2 of 3 facts of A
    ("sft", 1e-5, 0): {1: {"capitals": [1, 1, 1]},
                       2: {"capitals": [1, 1, 0], "elements": [1, 0, 0, 0], "probe": [1, 1]}},
    ("sft", 1e-5, 1): {1: {"capitals": [1, 1, 1]},
                       2: {"capitals": [1, 1, 0], "elements": [1, 1, 0, 0], "probe": [1, 0]}},
    # learns B, forgets A and the probe
    ("sft", 1e-4, 0): {1: {"capitals": [1, 1, 1]},
                       2: {"capitals": [0, 0, 0], "elements": [1, 1, 1, 1], "probe": [0, 0]}},
    ("sft", 1e-4, 1): {1: {"capitals": [1, 1, 1]},
                       2: {"capitals": [0, 0, 0], "elements": [1, 1, 1, 1], "probe": [0, 0]}},
    # keeps A (learned in 2 facts only: no retention interval), learns no B
    ("sdft_topk", 1e-5, 0): {1: {"capitals": [1, 1, 0]}, 2: {"capitals": [1, 1, 0]}},
    ("sdft_topk", 1e-5, 1): {1: {"capitals": [1, 1, 0]}, 2: {"capitals": [1, 1, 0]}},
    # keeps A, learns B to 75%
    ("sdft_topk", 1e-4, 0): {1: {"capitals": [1, 1, 1]}, 2: {"capitals": [1, 1, 1], "elements": [1, 1, 1, 1]}},
    ("sdft_topk", 1e-4, 1): {1: {"capitals": [1, 1, 1]}, 2: {"capitals": [1, 1, 1], "elements": [1, 1, 0, 0]}},
}
NOTHING = {"capitals": [0, 0, 0], "elements": [0, 0, 0, 0], "probe": [1, 1]}  # the base model; unset entries above


def _write_rows(directory, task, correct):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{task}.jsonl"), "w") as f:
        for i, (c, gold) in enumerate(zip(correct, GOLD[task], strict=True)):
            f.write(json.dumps({"index": i, "correct": bool(c), "expected": gold}) + "\n")


def frontier_plan(tmp_path):
    c = continual_config()
    c.out_dir = str(tmp_path)
    c.methods, c.learning_rates, c.seeds = "sft,sdft_topk", "1e-5,1e-4", "0,1"
    plan = make_plan(c)
    for task in plan.eval_tasks:
        _write_rows(os.path.join(plan.base_dir, "eval"), task, NOTHING[task])
    _write_rows(os.path.join(plan.base_dir, "teacher_eval"), "elements", [1, 0, 0, 0])
    for run in plan.runs:
        given = FRONTIER[run.method, run.learning_rate, run.seed][run.stage]
        d = os.path.join(run.config.run_dir, "eval", f"step_{run.config.train.steps:06d}")
        for task in plan.eval_tasks:
            _write_rows(d, task, given.get(task, NOTHING[task]))
        with open(os.path.join(run.config.run_dir, "summary.json"), "w") as f:
            json.dump({"steps": run.config.train.steps}, f)
    # the stage-1 student as teacher on elements, measured for one cell
    _write_rows(os.path.join(tmp_path, "sdft_topk_lr0.0001_seed0", "stage2", "teacher_eval"), "elements", [1, 1, 0, 1])
    return plan


def test_frontier_table_csv_and_plot_from_run_directories(tmp_path):
    plan = frontier_plan(tmp_path)
    md = open(write_report(plan)).read()
    with open(tmp_path / "frontier.csv") as f:
        front = {(r["method"], float(r["learning_rate"])): r for r in csv.DictReader(f)}
    with open(tmp_path / "frontier_seeds.csv") as f:
        seeds = {(r["method"], float(r["learning_rate"]), int(r["seed"])): r for r in csv.DictReader(f)}
    nan = math.nan
    # By hand (seeds pooled; a bootstrap resample draws whole facts, each with its items of both seeds):
    # sft 1e-5: elements per fact (e0: 1,0 | 1,1 -> 3/4; e1: 0) = 3/8; two clusters: the percentiles are the two
    #   fact means, [0, 3/4]. Retention (2+2+0)/(2+2+2) = 2/3; per resample (n0 + n1) / 3 of 3 draws: 0 with p = 3.7%,
    #   1 with p = 30%: [0, 1]. Probe (one fact): 3/4 - 1, a point interval.
    # sft 1e-4: elements 1 everywhere: [1, 1]; nothing of A kept: 0 [0, 0]; probe -1.
    # sdft_topk 1e-5: A right in 2 facts only: retention 1 with no interval; elements 0 [0, 0].
    # sdft_topk 1e-4: elements per fact (e0: 1; e1: 1,1 | 0,0 -> 1/2) = 3/4 [1/2, 1]; retention 1 [1, 1].
    expected = {  # (method, lr) -> {column: (value, lo, hi)}
        ("sft", 1e-5): {"capitals_stage1": (1, 1, 1), "elements_stage2": (3 / 8, 0, 3 / 4),
                        "capitals_retention": (2 / 3, 0, 1), "probe_delta": (-1 / 4, -1 / 4, -1 / 4)},
        ("sft", 1e-4): {"capitals_stage1": (1, 1, 1), "elements_stage2": (1, 1, 1), "capitals_retention": (0, 0, 0),
                        "probe_delta": (-1, -1, -1)},
        ("sdft_topk", 1e-5): {"capitals_stage1": (2 / 3, 0, 1), "elements_stage2": (0, 0, 0),
                              "capitals_retention": (1, nan, nan), "probe_delta": (0, 0, 0)},
        ("sdft_topk", 1e-4): {"capitals_stage1": (1, 1, 1), "elements_stage2": (3 / 4, 1 / 2, 1),
                              "capitals_retention": (1, 1, 1), "probe_delta": (0, 0, 0)},
    }
    assert list(front) == list(expected)  # methods in plan order, learning rates ascending
    for key, columns in expected.items():
        row = front[key]
        assert (row["seeds"], row["n_seeds"]) == ("0 1", "2")
        for column, values in columns.items():
            got = tuple(float(row[f"{column}{end}"]) for end in ("", "_lo", "_hi"))
            assert got == pytest.approx(values, nan_ok=True), (key, column)
    # The seeds' spread: sft 1e-5's elements 1/4 and 1/2 (sd of two values: |a - b| / sqrt 2); equal retentions.
    assert float(front["sft", 1e-5]["elements_stage2_seed_sd"]) == pytest.approx(0.25 / math.sqrt(2))
    assert float(front["sft", 1e-5]["capitals_retention_seed_sd"]) == pytest.approx(0)
    assert float(front["sdft_topk", 1e-4]["elements_stage2_seed_sd"]) == pytest.approx(0.5 / math.sqrt(2))

    # Per seed: each cell's own numbers; a seed's retention interval from its 3 facts (as the pooled one).
    assert len(seeds) == 8
    for (method, lr, seed), given in FRONTIER.items():
        row = seeds[method, lr, seed]
        a1, a2 = np.mean(given[1]["capitals"]), np.mean(given[2]["capitals"])
        assert float(row["capitals_stage1"]) == pytest.approx(a1)
        assert float(row["elements_stage2"]) == pytest.approx(np.mean(given[2].get("elements", [0])))
        assert float(row["capitals_retention"]) == pytest.approx(a2 / a1)
        assert float(row["probe_delta"]) == pytest.approx(np.mean(given[2].get("probe", [1, 1])) - 1)
        teacher = float(row["teacher_stage1_elements"])
        assert teacher == pytest.approx(0.75) if (method, lr, seed) == ("sdft_topk", 1e-4, 0) else math.isnan(teacher)
        assert float(row["teacher_base_elements"]) == pytest.approx(0.25)
    row = seeds["sft", 1e-5, 0]
    assert (float(row["capitals_retention_lo"]), float(row["capitals_retention_hi"])) == (0.0, pytest.approx(1.0))

    # The summary: sft keeps 80% of A at no LR; sdft_topk's best B at >= 80% retention is 75% (lr 1e-4), short of
    # 80% of sft's best (100% at 1e-4): no.
    assert ("| sft | 1e-05 | 0 1 | 100.0 [100.0, 100.0] | 37.5 [0.0, 75.0] | 66.7 [0.0, 100.0] "
            "| -25.0 [-25.0, -25.0] |") in md
    assert ("| sdft_topk | 1e-05 | 0 1 | 66.7 [0.0, 100.0] | 0.0 [0.0, 0.0] | 100.0 [n/a, n/a] "
            "| +0.0 [+0.0, +0.0] |") in md
    assert "- sft: none (no learning rate keeps 80% of capitals)" in md
    assert "- sdft_topk: 75.0% at lr 0.0001 (retention 100%)" in md
    assert ("(no) No: sft's best task B is 100.0% (lr 0.0001), so the bar is 80.0%; sdft_topk: at >= 80% A "
            "retention its best task B is 75.0% (lr 0.0001); its highest task B, 75.0% (lr 0.0001), keeps 100% "
            "of A.") in md
    # The teacher with the demonstration: the base model's, and the one measured stage-1 student's.
    assert "Base model as teacher: 25.0%." in md
    assert "| sdft_topk | 0.0001 | 0 | 0.0 | 75.0 | 100.0 |" in md
    with open(tmp_path / "frontier.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _point(method, lr, b, retention):
    return FrontierPoint(method=method, learning_rate=lr, seeds=(0,), a_stage1=(1.0, 1.0, 1.0),
                         b_stage2=(b, b, b), retention=(retention, retention, retention), probe_delta={},
                         seed_b_stage2=(b,), seed_retention=(retention,))


def test_frontier_answer_yes_no_and_not_measured():
    sft = [_point("sft", 1e-5, 0.5, 0.9), _point("sft", 1e-4, 0.9, 0.1)]
    # 80% of sft's best (0.9) is 0.72: sdft at 0.75 keeping 85% of A passes; at 0.8 keeping 70% does not.
    high = _point("sdft_topk", 5e-4, 0.8, 0.7)
    verdict, sentence = frontier_answer(sft + [_point("sdft_topk", 1e-4, 0.75, 0.85), high])
    assert verdict == "yes" and sentence.startswith("Yes: sdft_topk at lr 0.0001 reaches 75.0% on task B and keeps 85%")
    verdict, sentence = frontier_answer(sft + [_point("sdft_topk", 1e-4, 0.7, 0.85), high])
    assert verdict == "no" and "its highest task B, 80.0% (lr 0.0005), keeps 70% of A" in sentence
    assert best_at_retention(sft, "sft").learning_rate == 1e-5
    assert frontier_answer(sft) == ("not measured", "Not measured: no SDFT runs with both stages finished.")
    assert frontier_answer([_point("sdft_topk", 1e-4, 0.7, 0.85)])[0] == "not measured"
    # A retention that is undefined (nothing of A learned) never counts as kept.
    assert best_at_retention([_point("sdft_topk", 1e-4, 0.7, math.nan)], "sdft_topk") is None


def test_stage_signal_table_and_csv_from_metric_rows(tmp_path):
    """signal.py: first / last 8 training steps' means of each metric, by hand; SFT rows without KL."""
    from sdft_jax.continual.signal import stage_signal

    plan = frontier_plan(tmp_path)
    cell = tmp_path / "sdft_topk_lr0.0001_seed0" / "stage2"
    # 10 steps: kl = step, teacher entropy 1.0, length 4 then 20 (the last 2 steps), stopped by a stop token
    # except at steps 9-10; 5 of 8 completion tokens scored; an eval-only row (no loss) left out.
    with open(cell / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "eval/elements/accuracy": 0.0}) + "\n")
        for step in range(1, 11):
            late = step > 8
            f.write(json.dumps({"step": step, "loss": 0.5, "kl": float(step), "teacher_entropy": 1.0,
                                "rollout/mean_length": 20.0 if late else 4.0,
                                "rollout/stop_token_frac": 0.0 if late else 1.0,
                                "rollout/length_frac": 1.0 if late else 0.0,
                                "scored_tokens": 5.0, "completion_tokens": 8}) + "\n")
    sft = tmp_path / "sft_lr1e-05_seed0" / "stage2"
    with open(sft / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "loss": float(step), "scored_tokens": 4.0, "completion_tokens": 4}) + "\n")

    signal = stage_signal(str(cell))
    # first 8: kl mean (1..8) = 4.5, length 4, all stopped by a stop token; last 8 (3..10): kl 6.5, length
    # (6 x 4 + 2 x 20) / 8 = 8, stop token 6/8, length limit 2/8
    assert signal == pytest.approx({
        "steps": 10, "loss_first": 0.5, "kl_first": 4.5, "teacher_entropy_first": 1.0, "mean_length_first": 4.0,
        "stop_token_frac_first": 1.0, "length_frac_first": 0.0, "scored_frac_first": 5 / 8, "loss_last": 0.5,
        "kl_last": 6.5, "teacher_entropy_last": 1.0, "mean_length_last": 8.0, "stop_token_frac_last": 0.75,
        "length_frac_last": 0.25, "scored_frac_last": 5 / 8})
    assert stage_signal(str(sft)) == {"steps": 2, "loss_first": 1.5, "scored_frac_first": 1.0, "loss_last": 1.5,
                                      "scored_frac_last": 1.0}
    assert stage_signal(str(tmp_path / "nowhere")) == {}

    md = open(write_report(plan)).read()
    assert "## Stage 2's training signal" in md
    assert ("| sdft_topk | 0.0001 | 0 | 0.500 -> 0.500 | 4.500 -> 6.500 | 1.000 -> 1.000 | 4.0 -> 8.0 "
            "| 1.00 -> 0.75 | 0.00 -> 0.25 | 0.62 -> 0.62 |") in md
    assert "| sft | 1e-05 | 0 | 1.500 -> 1.500 | n/a | n/a | n/a | n/a | n/a | 1.00 -> 1.00 |" in md
    with open(tmp_path / "signal.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["stage"], r["seed"]) for r in rows] == [("sft", "2", "0"), ("sdft_topk", "2", "0")]
