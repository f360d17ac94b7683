"""Tests of sdft_jax/continual/scores.py: per-item scores read back, cluster-bootstrap intervals checked by hand."""

import json
import math

import numpy as np
import pytest

from sdft_jax.continual.scores import (TaskScores, bootstrap_accuracy, bootstrap_difference, bootstrap_ratio, pooled,
                                       read_scores)


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


def test_bootstrap_accuracy_and_pooled_seeds():
    # Two clusters of two items: means 1 and 1/4 pooled over two seeds -> the percentiles are the two means.
    one, two = scores([1, 1, 1, 0], [0, 0, 1, 1]), scores([1, 1, 0, 0], [0, 0, 1, 1])
    both = pooled([one, two])
    np.testing.assert_array_equal(both.clusters, [0, 0, 1, 1, 0, 0, 1, 1])
    assert bootstrap_accuracy(both) == pytest.approx((5 / 8, 1 / 4, 1.0))
    with pytest.raises(ValueError, match="different items"):
        pooled([one, scores([1, 0], [0, 1])])
