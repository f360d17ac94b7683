"""The deltanet bench at a tiny size: every engine runs on the same inputs and gets the same numbers."""

import json

import pytest

from sdft_jax.bench import deltanet


def test_engines_compute_the_same_thing(capsys):
    pytest.importorskip("torch")
    assert deltanet.main(["--tokens", "40", "--heads", "4", "--key-heads", "2", "--head-dim", "8",
                          "--chunk-size", "16", "--runs", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["bench"], row["tokens"], row["heads"], row["key_heads"]) == ("deltanet", 40, 4, 2)
    for prefix in ("", "jax_recurrent_", "torch_"):
        assert row[prefix + "tokens_per_s"] > 0 and row[prefix + "peak_rss_mb"] > 0
        # Rounded to 3 decimals in the row: equal sums of outputs and of gradients.
        assert row[prefix + "out_sum"] == pytest.approx(row["out_sum"], abs=2e-3), prefix
        assert row[prefix + "grad_sum"] == pytest.approx(row["grad_sum"], abs=2e-3), prefix
    assert row["out_sum"] != 0 and row["grad_sum"] != 0
    assert row["speedup_vs_recurrent"] > 0 and row["speedup_vs_torch"] > 0


def test_refuses_heads_not_a_multiple_of_key_heads():
    with pytest.raises(SystemExit, match=r"--heads \(6\) must be a multiple of --key-heads \(4\)"):
        deltanet.main(["--heads", "6", "--key-heads", "4"])
