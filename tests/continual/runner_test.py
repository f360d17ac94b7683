"""The runner end to end on a tiny model: base eval, both stages of two methods, report; restarts skip work."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from sdft_jax.checkpoints.safetensors_io import SafetensorsDir
from sdft_jax.continual import runner
from sdft_jax.continual.plan import make_plan
from sdft_jax.testing.configs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_experiment(model_dir, out_dir, **keys):
    c = ml_collections.ConfigDict()
    c.out_dir = str(out_dir)
    c.task_a, c.task_b, c.probe_tasks = "capitals", "elements", "probe"
    c.methods, c.learning_rates, c.seeds = "sft,sdft_topk", "1e-3", "0"
    c.stage2_teacher, c.stage2_steps, c.compilation_cache = "stage1", 0, False
    train = tiny_config(model_dir, "unused", **{"train.steps": 2, "eval.limit": 3, "checkpoint.every": 2})
    del train["run_dir"]
    c.train = train
    c.update(keys)
    return c


def test_runs_every_stage_and_reports(tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("llama")
    plan = make_plan(tiny_experiment(model_dir, tmp_path))
    md = runner.run_plan(plan, compilation_cache=False)
    assert md == str(tmp_path / "results.md")
    for name in ("results.md", "results.csv", "results.png", "base/summary.json", "base/eval/probe.jsonl"):
        assert (tmp_path / name).exists(), name
    # Stage 1 moved away from the base weights, and stage 2 started from stage 1's export.
    weight = "model.layers.0.mlp.up_proj.weight"
    base = np.asarray(SafetensorsDir(model_dir).read(weight))
    for method in ("sft", "sdft_topk"):
        stage1 = tmp_path / f"{method}_lr0.001_seed0" / "stage1"
        stage2 = tmp_path / f"{method}_lr0.001_seed0" / "stage2"
        first = np.asarray(SafetensorsDir(stage1 / "export").read(weight))
        second = np.asarray(SafetensorsDir(stage2 / "export").read(weight))
        assert np.abs(first - base).max() > 1e-4 and np.abs(second - first).max() > 1e-4
        assert json.loads((stage2 / "config.json").read_text())["init_from"] == str(stage1 / "export")
        # The report's numbers are the runs' own evaluations.
        summary = json.loads((stage2 / "summary.json").read_text())
        row = next(r for r in _csv(tmp_path) if r["method"] == method and r["stage"] == "2")
        for task in plan.eval_tasks:
            assert float(row[f"{task}_accuracy"]) == pytest.approx(summary["eval"][task]["accuracy"])
            assert row[f"{task}_total"] == "3"

    # Started again, nothing trains or evaluates: every part is found finished on disk.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished part ran again")

    monkeypatch.setattr("sdft_jax.trainer.train", refuse)
    monkeypatch.setattr("sdft_jax.eval.runner.evaluate_tasks", refuse)
    before = (tmp_path / "results.csv").read_text()
    runner.run_plan(plan, compilation_cache=False)
    assert (tmp_path / "results.csv").read_text() == before


def test_stage2_without_stage1_export_fails_clearly(tiny_model_dir, tmp_path):
    plan = make_plan(tiny_experiment(tiny_model_dir("llama"), tmp_path, methods="sft"))
    with pytest.raises(FileNotFoundError, match="stage 2 starts from .*stage1/export, which does not exist"):
        runner.run_stage(plan.runs[1])


def _csv(out_dir):
    import csv

    with open(out_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_cli_rejects_a_bad_config_before_compiling(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdft_jax.continual", f"--config={ROOT}/configs/continual.py",
         "--config.methods=sft,sdft_kl", f"--config.out_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert "invalid config: config.methods: unknown method 'sdft_kl'" in proc.stderr
    assert not os.listdir(tmp_path)
