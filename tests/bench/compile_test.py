"""The compile bench: its command runs on tiny models and reports every figure per kind and depth."""

import json

import pytest

from sdft_jax.bench.__main__ import main as bench_main
from sdft_jax.bench.compile import model_config


def test_model_configs_differ_in_depth_and_channel_mixer_only():
    a = dict(vocab=300, hidden=32, intermediate=48, experts=4, top_k=2, expert_hidden=16, dense_layers=[0, 5])
    moe, dense = model_config("moe", 3, a), model_config("dense", 3, a)
    assert moe.num_layers == dense.num_layers == 3 and moe.hidden_size == dense.hidden_size == 32
    assert moe.moe.num_experts == 4 and moe.dense_layers == (0,)  # layer 5 is beyond this depth
    assert dense.moe is None and dense.architecture == "qwen3"
    hybrid = model_config("hybrid", 8, a)
    assert hybrid.linear_layers == (0, 1, 2, 4, 5, 6) and hybrid.moe.shared_expert_hidden == 16
    assert hybrid.hidden_size == 32


@pytest.mark.slow
def test_compile_bench_reports_both_kinds_at_each_depth(capsys):
    assert bench_main(["compile", "--layers", "1", "3", "--runs", "1", "--hidden", "32", "--intermediate", "32",
                       "--experts", "4", "--expert-hidden", "16", "--vocab", "300", "--batch", "1",
                       "--prompt-len", "4", "--teacher-prompt-len", "6", "--completion-len", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bench"] == "compile" and row["layers"] == [1, 3] and row["kinds"] == ["moe", "dense"]
    for kind in ("moe", "dense"):
        for figure in ("lower_s", "compile_s", "total_s", "hlo_lines"):
            assert set(row[f"{kind}_{figure}"]) == {"1", "3"}
            assert all(v > 0 for v in row[f"{kind}_{figure}"].values())
        total = row[f"{kind}_total_s"]
        assert row[f"{kind}_ratio"] == pytest.approx(total["3"] / total["1"], rel=1e-2)
