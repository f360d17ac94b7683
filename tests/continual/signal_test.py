"""signal.py: a stage's training signal from its metric rows, by hand (the report's use: report_test.py)."""

import json
import types

import pytest

from sdft_jax.continual.signal import signal_markdown, signal_rows, stage_signal


def _write(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_first_and_last_window_means_by_hand(tmp_path):
    # 4 steps, window 3: first = steps 1-3, last = 2-4. kl 1 2 3 6; lengths 10 10 10 30; steps 1-3 stopped by
    # a stop token, step 4 at the limit; scored 3 of 4 tokens, then 4 of 4 at step 4.
    rows = [{"step": s, "loss": float(s), "kl": [1.0, 2.0, 3.0, 6.0][s - 1], "teacher_entropy": 2.0,
             "rollout/mean_length": 30.0 if s == 4 else 10.0, "rollout/stop_token_frac": 0.0 if s == 4 else 1.0,
             "rollout/length_frac": 1.0 if s == 4 else 0.0, "scored_tokens": 4.0 if s == 4 else 3.0,
             "completion_tokens": 4} for s in range(1, 5)]
    _write(tmp_path / "a", [{"step": 0, "eval/x/accuracy": 0.5}, *rows])  # the eval-only row is left out
    got = stage_signal(str(tmp_path / "a"), window=3)
    assert got == pytest.approx({
        "steps": 4, "loss_first": 2.0, "kl_first": 2.0, "teacher_entropy_first": 2.0, "mean_length_first": 10.0,
        "stop_token_frac_first": 1.0, "length_frac_first": 0.0, "scored_frac_first": 9 / 12,
        "loss_last": 3.0, "kl_last": 11 / 3, "teacher_entropy_last": 2.0, "mean_length_last": 50 / 3,
        "stop_token_frac_last": 2 / 3, "length_frac_last": 1 / 3, "scored_frac_last": 10 / 12})
    assert stage_signal(str(tmp_path / "missing")) == {}


def test_rows_and_the_stage_table(tmp_path):
    _write(tmp_path / "s1", [{"step": 1, "loss": 1.0, "kl": 0.25, "completion_tokens": 0, "scored_tokens": 0.0}])
    _write(tmp_path / "s2", [{"step": 1, "loss": 2.0}])
    point = lambda stage, d: types.SimpleNamespace(method="m", learning_rate=1e-4, seed=3, stage=stage,
                                                   run_dir=str(tmp_path / d))
    rows = signal_rows([point(0, "s1"), point(1, "s1"), point(2, "s2"), point(2, "none")], window=8)
    assert [(r["stage"], r["run_dir"]) for r in rows] == [(1, str(tmp_path / "s1")), (2, str(tmp_path / "s2"))]
    assert "scored_frac_first" not in rows[0]  # no completion tokens: no share
    table = signal_markdown(rows, window=8)
    assert table[1] == "## Stage 2's training signal"
    assert table[-1] == "| m | 0.0001 | 3 | 2.000 -> 2.000 | n/a | n/a | n/a | n/a | n/a | n/a |"
    assert signal_markdown(rows, stage=3) == []
