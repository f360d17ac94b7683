"""The benchmarks' shared result row: engine prefixes, speedups over torch, and how it is printed."""

import json

from sdft_jax.bench.harness import engine_prefix, finish_row


def test_engine_prefix():
    assert [engine_prefix(e) for e in ("jax", "jax_scan", "torch")] == ["", "jax_scan_", "torch_"]


def test_finish_row_adds_speedups_when_torch_ran(capsys):
    row = {"rate": 30.0, "jax_scan_rate": 15.0, "torch_rate": 10.0}
    finish_row(row, ["jax", "jax_scan", "torch"], rate="rate", as_json=True, width=10)
    assert (row["speedup_vs_torch"], row["jax_scan_speedup_vs_torch"]) == (3.0, 1.5)
    assert "torch_speedup_vs_torch" not in row and "loadavg_end" in row
    assert json.loads(capsys.readouterr().out) == row


def test_finish_row_without_torch_prints_a_table_then_json(capsys):
    row = {"rate": 30.0}
    finish_row(row, ["jax"], rate="rate", as_json=False, width=6)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  rate: 30.0" and json.loads(lines[-1]) == row and "speedup_vs_torch" not in row
