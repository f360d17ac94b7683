"""The report: cluster-bootstrap intervals checked by hand, tables and CSV against the per-item files."""

import csv
import json
import math
import os

import numpy as np
import pytest

from sdft_jax.continual.plan import make_plan
from sdft_jax.continual.report import TaskScores, bootstrap_difference, bootstrap_ratio, read_scores, write_report
from tests.continual.plan_test import continual_config


def scores(correct, clusters):
    return TaskScores(correct=np.array(correct, bool), clusters=np.array(clusters))


def test_one_cluster_gives_a_point_interval():
    after, before = scores([1, 1, 0, 1], [0, 0, 0, 0]), scores([0, 1, 0, 0], [0, 0, 0, 0])
    assert bootstrap_difference(after, before) == pytest.approx((0.5, 0.5, 0.5))


def test_ratio_interval_from_three_clusters():
    # before: one correct item in each of 3 clusters; after keeps clusters 0 and 1. A resample's ratio is
    # (draws of 0 and 1) / 3 draws: 0 with p = (1/3)^3 = 3.7% (> 2.5%), 1 with p = (2/3)^3 = 30%.
    before, after = scores([1, 1, 1], [0, 1, 2]), scores([1, 1, 0], [0, 1, 2])
    r, lo, hi = bootstrap_ratio(after, before)
    assert r == pytest.approx(2 / 3) and lo == 0.0 and hi == pytest.approx(1.0)


def test_two_clusters_interval_spans_the_two_cluster_means():
    # Cluster 0 (1 item) gains 1; cluster 1 (3 items) gains 1/3 on average. A resample draws (0,0), (1,1)
    # or one of each (p = 1/4, 1/4, 1/2), so the 2.5th / 97.5th percentiles are the two cluster means.
    after = scores([1, 1, 0, 0], [0, 1, 1, 1])
    before = scores([0, 0, 0, 0], [0, 1, 1, 1])
    d, lo, hi = bootstrap_difference(after, before)
    assert d == pytest.approx(0.5)
    assert (lo, hi) == pytest.approx((1 / 3, 1.0))


def test_ratio_is_nan_without_a_correct_item_before():
    zero = scores([0, 0], [0, 1])
    assert all(math.isnan(x) for x in bootstrap_ratio(scores([1, 0], [0, 1]), zero))


def test_ratio_has_no_interval_when_the_correct_items_are_one_fact():
    before = scores([1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2])
    after = scores([1, 0, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2])
    r, lo, hi = bootstrap_ratio(after, before)
    assert r == pytest.approx(1.0) and math.isnan(lo) and math.isnan(hi)


def test_unpaired_evaluations_are_refused():
    with pytest.raises(ValueError, match="different items"):
        bootstrap_difference(scores([1, 0], [0, 1]), scores([1, 0, 1], [0, 1, 2]))


def test_read_scores_groups_by_gold_and_orders_by_index(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"index": 2, "correct": True, "expected": "Paris"}, {"index": 0, "correct": False, "expected": "Rome"},
            {"index": 1, "correct": True, "expected": "Paris"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = read_scores(str(path))
    np.testing.assert_array_equal(s.correct, [False, True, True])
    np.testing.assert_array_equal(s.clusters, [0, 1, 1])
    path.write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match=r"t.jsonl: line 1: not an eval row"):
        read_scores(str(path))


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
