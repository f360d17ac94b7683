"""The top_k bench at a small size: every engine times the same rows and selects what `jax.lax.top_k` selects."""

import json
import re

import pytest

from sdft_jax.bench import top_k


def test_every_engine_runs_and_equals_lax_top_k(capsys):
    engines = ",".join(top_k.ENGINES)
    assert top_k.main(["--rows", "3", "--vocab", "3000", "--k", "5", "--runs", "1", "--engines", engines, "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["bench"], row["rows"], row["vocab"], row["k"]) == ("top_k", 3, 3000, 5)
    for engine in top_k.ENGINES:
        assert row[f"{engine}_ms"] > 0 and row[f"{engine}_same"] is True, engine
    assert row["speedup_vs_lax"] == pytest.approx(row["lax_ms"] / row["top_k_ms"], rel=0.01)


@pytest.mark.parametrize("argv, message", [
    (["--engines", "top_k"], "--engines: 'lax' and any of"),
    (["--engines", "lax,heap"], "--engines: 'lax' and any of"),
    (["--k", "0"], r"--k must be in \[1, --vocab\]"),
    (["--vocab", "10", "--k", "11"], r"--k must be in \[1, --vocab\]")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        top_k.main(argv)
    assert re.search(message, capsys.readouterr().err)
