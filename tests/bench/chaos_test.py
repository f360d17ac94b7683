"""The chaos benchmark's comparison of two finished run directories (no training here)."""

import json
import shutil

import numpy as np
from safetensors.numpy import save_file

from sdft_jax.bench.chaos import compare_runs, plan_kills
from sdft_jax.metrics import encode_row


def _write_run(run, rows, weight):
    (run / "export").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(encode_row(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"steps": 2, "export": str(run / "export"), "nonfinite_steps": 0}))
    save_file({"model.embed_tokens.weight": weight, "lm_head.weight": np.ones((2, 2), np.float32)},
              str(run / "export" / "model.safetensors"))
    (run / "export" / "config.json").write_text('{"model_type": "llama"}')


def test_compare_runs_ignores_timings_and_finds_a_changed_weight_row_or_leftover(tmp_path):
    rows = [{"step": 0, "eval/capitals/accuracy": 0.5, "time/eval_s": 1.0},
            {"step": 1, "loss": 1.25, "kl": float("nan"), "tokens_per_s": 10.0, "sampler/compilations": 2},
            {"step": 2, "loss": 1.0, "kl": 0.5, "tokens_per_s": 11.0, "sampler/compilations": 2}]
    weight = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    _write_run(tmp_path / "ref", rows, weight)

    # Another directory (so another export path), other timings and compile counts, NaN where NaN: identical.
    resumed = [{**rows[0], "time/eval_s": 9.0}, {**rows[1], "tokens_per_s": 3.0, "sampler/compilations": 1}, rows[2]]
    _write_run(tmp_path / "same", resumed, weight.copy())
    assert compare_runs(str(tmp_path / "ref"), str(tmp_path / "same")) is None

    # One weight one ulp away: bit-identical means not identical.
    nudged = weight.copy()
    nudged[1, 2] = np.nextafter(nudged[1, 2], np.float32(2))
    _write_run(tmp_path / "weight", rows, nudged)
    assert compare_runs(str(tmp_path / "ref"), str(tmp_path / "weight")) == (
        "export: model.embed_tokens.weight: 1 bytes differ")

    # A training value of one row changed; a row missing.
    _write_run(tmp_path / "row", [rows[0], {**rows[1], "loss": 1.2500001}, rows[2]], weight)
    assert compare_runs(str(tmp_path / "ref"), str(tmp_path / "row")) == (
        "metrics.jsonl row 2 (step 1): loss = 1.2500001, reference 1.25")
    _write_run(tmp_path / "short", rows[:2], weight)
    assert compare_runs(str(tmp_path / "ref"), str(tmp_path / "short")) == (
        "metrics.jsonl: 2 rows, the reference has 3")

    # Identical, but an interrupted export's temporary directory and a torn row remain.
    shutil.copytree(tmp_path / "same", tmp_path / "left")
    (tmp_path / "left" / ".export.partial-abc").mkdir()
    with open(tmp_path / "left" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert compare_runs(str(tmp_path / "ref"), str(tmp_path / "left")) == (
        "left behind: ['.export.partial-abc', 'metrics.jsonl#torn']")

    # The kills are drawn from the seed: the same seed, the same plan.
    plans = [[plan_kills(t, np.random.default_rng(7), 30.0, 3, 5) for t in ("uniform", "metrics_rewrite")]
             for _ in range(2)]
    assert plans[0] == plans[1] and [k.target for k in plans[0][1]] == ["checkpoint", "rewrite"]
