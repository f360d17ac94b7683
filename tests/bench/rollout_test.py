"""The rollout bench: its command on a tiny model reports both engines, equal tokens, and the budgets it drew."""

import json

import pytest

from sdft_jax.bench.__main__ import main as bench_main
from sdft_jax.bench.rollout import budgets


def test_heavy_tail_budgets_are_mostly_short_with_one_in_ten_at_the_maximum():
    drawn = budgets("heavy-tail", 64, 256, seed=0)
    assert len(drawn) == 64 and drawn == budgets("heavy-tail", 64, 256, seed=0)  # seeded
    assert sum(b == 256 for b in drawn) == 6  # round(64 / 10)
    assert all(8 <= b <= 64 for b in drawn if b != 256)
    assert drawn != budgets("heavy-tail", 64, 256, seed=1)
    assert budgets("fixed", 3, 9, seed=0) == [9, 9, 9]
    assert all(1 <= b <= 9 for b in budgets("uniform", 50, 9, seed=0))


def test_rollout_bench_reports_both_engines_with_the_same_tokens(tiny_model_dir, capsys):
    path = tiny_model_dir("llama")
    assert bench_main(["rollout", "--model", path, "--prompts", "10", "--slots", "4", "--max-new-tokens", "16",
                       "--prompt-len", "2,9", "--lengths", "heavy-tail", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["tokens_equal"] is True and row["rows_differing"] == []
    assert row["useful_new_tokens"] == sum(budgets("heavy-tail", 10, 16, seed=0)) and row["rows_at_max"] == 1
    for name in ("static", "continuous"):
        assert row[f"{name}_new_tokens_per_s"] > 0 and row[f"{name}_seconds"] > 0
    assert row["speedup_vs_static"] == pytest.approx(
        row["continuous_new_tokens_per_s"] / row["static_new_tokens_per_s"], rel=1e-2)
    assert row["static_row_steps"] >= row["useful_new_tokens"]
    assert row["continuous_inserts"] >= 10 / 4 and row["continuous_compilations"] >= 2
    for key in ("cpu", "cpu_count", "loadavg_start", "loadavg_end", "peak_rss_mb"):
        assert key in row
