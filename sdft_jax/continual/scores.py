"""One model's per-item results on one task (`TaskScores`, read from an eval JSONL) and their 95%
intervals by a cluster bootstrap: an accuracy, a paired difference, a paired ratio (retention), and
several seeds' evaluations of the same items pooled into one.

The bootstrap resamples *clusters* of eval items sharing a gold answer, not items: the offline tasks
ask each trained fact several times in different words, so items of one fact are not independent.
`report.py` builds the continual experiment's tables on these.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from sdft_jax import storage

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


def bootstrap_accuracy(scores: TaskScores, *, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, 95% interval low, high) by a cluster bootstrap."""
    if not scores.correct.size:
        return math.nan, math.nan, math.nan
    counts = _cluster_resamples(scores.clusters, np.random.default_rng(seed), samples)
    sizes = np.bincount(scores.clusters).astype(np.float64)
    boot = (counts @ _cluster_sums(scores.correct, scores.clusters)) / (counts @ sizes)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return scores.accuracy, float(lo), float(hi)


def pooled(scores: list[TaskScores]) -> TaskScores:
    """Several evaluations of the same items (one per seed) as one: a cluster keeps its label, so a
    bootstrap that draws it draws its items of every seed."""
    for other in scores[1:]:
        _paired(other, scores[0])
    return TaskScores(correct=np.concatenate([s.correct for s in scores]),
                      clusters=np.concatenate([s.clusters for s in scores]))


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
