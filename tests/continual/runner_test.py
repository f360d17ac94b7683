"""The runner end to end on a tiny model: base eval, both stages of two methods, report; restarts skip work."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sdft_jax.checkpointing import Checkpointer
from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.checkpoints.safetensors_io import SafetensorsDir
from sdft_jax.continual import runner
from sdft_jax.continual.plan import make_plan
from sdft_jax.distill.train_state import student_model
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.testing.configs import tiny_config
from sdft_jax.trainer import Trainer

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


def test_stage2_without_a_finished_stage1_fails_clearly(tiny_model_dir, tmp_path):
    plan = make_plan(tiny_experiment(tiny_model_dir("llama"), tmp_path, methods="sft"))
    with pytest.raises(FileNotFoundError, match=r"stage 2 continues stage 1 \(.*stage1\), which has not finished"):
        runner.run_stage(plan.runs[1])


def _logits(model):
    tokens = jnp.asarray([[5, 17, 3, 40, 9, 22, 31, 8]])
    mask = jnp.ones(tokens.shape, bool)
    return np.asarray(model.logits(model.forward(tokens, positions_from_mask(mask), mask).hidden))


def test_lora_stage2_continues_stage1s_adapters_in_both_teacher_modes(tiny_model_dir, tmp_path):
    """The recipe's stage 2 with LoRA: stage 1's adapters keep training on the unchanged base (nothing
    merged, a fresh optimizer), taught by the student as stage 2 starts or by the base model (the same
    frozen weights with the adapters off)."""
    model_dir = tiny_model_dir("llama")
    base = _logits(load_hf(model_dir))
    for teacher in ("stage1", "base"):
        out = tmp_path / teacher
        if teacher == "base":  # the same stage 1 (and base evaluation): only stage 2 runs again
            shutil.copytree(tmp_path / "stage1", out)
            shutil.rmtree(out / "sdft_topk_lr0.01_seed0" / "stage2")
        c = tiny_experiment(model_dir, out, methods="sdft_topk", learning_rates="1e-2", stage2_teacher=teacher,
                            probe_tasks="")
        c.train.eval.limit = 1
        c.train.train.steps, c.train.train.epochs = 0, 0.5  # 8 facts at 2 per step: 2 steps a stage
        c.train.model.lora.rank = 4
        c.train.teacher.mode = "static"
        plan = make_plan(c)
        runner.run_plan(plan, compilation_cache=False)
        stage1, stage2 = plan.runs
        # Stage 2 as it starts (a Trainer resumes its finished run only in run()).
        trainer = Trainer(stage2.config)
        try:
            state, graphdef = trainer.state, trainer.graphdef
            last, _ = trainer.checkpointer.restore(2, state)  # stage 2's own last step, to compare
            source = Checkpointer(stage1.config.run_dir)
            stage1_last, _ = source.restore(source.latest_step(), state)
            source.close()
        finally:
            trainer.checkpointer.close()
        assert int(state.step) == 0 and source.latest_step() == 2 and trainer.cfg.train.steps == 2
        for start, end_of_stage1 in zip(jax.tree.leaves(state.params), jax.tree.leaves(stage1_last.params)):
            np.testing.assert_array_equal(np.asarray(start), np.asarray(end_of_stage1))
        assert all(not np.asarray(m).any() for m in jax.tree.leaves(state.opt_state) if np.ndim(m))  # fresh Adam
        # The stage-2 student at step 0 is stage 1's exported model; the teacher is that or the base model.
        stage1_model = _logits(load_hf(os.path.join(stage1.config.run_dir, "export")))
        student = _logits(student_model(graphdef, state))
        teacher_logits = _logits(nnx.merge(graphdef, state.teacher, state.frozen))
        np.testing.assert_allclose(student, stage1_model, rtol=0, atol=1e-5)
        assert np.abs(stage1_model - base).max() > 1e-3  # stage 1 learned something: the two teachers differ
        np.testing.assert_allclose(teacher_logits, stage1_model if teacher == "stage1" else base, rtol=0, atol=1e-5)
        # Stage 2 trained those adapters further.
        moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
                 zip(jax.tree.leaves(last.params), jax.tree.leaves(stage1_last.params))]
        assert max(moved) > 1e-4
        recorded = json.loads((out / "sdft_topk_lr0.01_seed0" / "stage2" / "config.json").read_text())
        assert recorded["init_adapters_from"] == stage1.config.run_dir and recorded["init_from"] == ""
        assert recorded["teacher"]["source"] == ("base" if teacher == "base" else "student")


def _csv(out_dir):
    import csv

    with open(out_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_cli_rejects_a_bad_config_before_compiling(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdft_jax.continual", f"--config={ROOT}/configs/continual.py",
         "--config.methods=sft,sdft_kl", f"--config.out_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 3  # errors.CONFIG
    assert "invalid config: config.methods: unknown method 'sdft_kl'" in proc.stderr
    assert not os.listdir(tmp_path)


def test_progress_line_says_the_stage_and_the_time_left():
    plan = make_plan(tiny_experiment("unused", "/exp", learning_rates="5e-5"))
    run = plan.runs[3]  # sdft_topk stage 2
    assert runner.progress_line(1, 4, plan.runs[0], []) == (
        "[1/4] sft lr 5e-05 seed 0 stage 1: starting (ETA after the first stage)")
    assert runner.progress_line(4, 4, run, [60.0, 180.0]) == (
        "[4/4] sdft_topk lr 5e-05 seed 0 stage 2: 2 stages trained, 2.0 min each; ETA 2.0 min")
    # 3 stages left (this one included) at an hour each
    assert runner.progress_line(10, 12, run, [3600.0]).endswith("1 stage trained, 60.0 min each; ETA 3.0 h")
    assert runner.progress_line(2, 4, run, [], skipped="finished before").endswith("stage 2: finished before, skipped")
    assert runner.progress_line(2, 4, run, [], skipped="stage 1 diverged").endswith("stage 2: stage 1 diverged, skipped")


def test_run_plan_prints_a_line_per_stage_with_the_eta_of_the_stages_trained(tmp_path, monkeypatch):
    plan = make_plan(tiny_experiment("unused", tmp_path))
    stage1 = plan.runs[0].config.run_dir
    os.makedirs(stage1)
    with open(os.path.join(stage1, "summary.json"), "w") as f:
        f.write("{}")  # finished before: skipped, and not counted in the ETA
    clock = [0.0]
    durations = iter([0.0, 60.0, 180.0, 120.0])  # run_stage itself skips the finished stage 1

    def fake_stage(run):
        clock[0] += next(durations)

    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(runner, "evaluate_base", lambda plan: {})
    monkeypatch.setattr(runner, "run_stage", fake_stage)
    monkeypatch.setattr(runner, "write_report", lambda plan: "results.md")
    lines = []
    runner.run_plan(plan, compilation_cache=False, progress=lines.append)
    assert lines == ["[1/4] sft lr 0.001 seed 0 stage 1: finished before, skipped",
                     "[2/4] sft lr 0.001 seed 0 stage 2: starting (ETA after the first stage)",
                     "[3/4] sdft_topk lr 0.001 seed 0 stage 1: 1 stage trained, 1.0 min each; ETA 2.0 min",
                     "[4/4] sdft_topk lr 0.001 seed 0 stage 2: 2 stages trained, 2.0 min each; ETA 2.0 min"]


def test_run_plan_measures_the_teachers_before_stage2_when_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "evaluate_base", lambda plan: calls.append("base eval"))
    monkeypatch.setattr(runner, "run_stage", lambda run: calls.append(f"{run.method} stage {run.stage}"))
    monkeypatch.setattr(runner, "write_report", lambda plan: "results.md")
    monkeypatch.setattr(runner.teacher_eval, "evaluate_base_teacher", lambda plan: calls.append("base teacher"))
    monkeypatch.setattr(runner.teacher_eval, "evaluate_stage1_teacher",
                        lambda plan, run: calls.append(f"{run.method} stage-1 teacher"))
    for diagnose in (False, True):
        calls.clear()
        plan = make_plan(tiny_experiment("unused", tmp_path, diagnose_teacher=diagnose))
        runner.run_plan(plan, compilation_cache=False, progress=lambda line: None)
        stages = ["sft stage 1", "sft stage 2", "sdft_topk stage 1"]
        assert calls == (["base eval", "base teacher", *stages, "sdft_topk stage-1 teacher", "sdft_topk stage 2"]
                         if diagnose else ["base eval", *stages, "sdft_topk stage 2"])


def test_a_diverging_stage_is_recorded_and_the_plan_goes_on(tiny_model_dir, tmp_path, caplog):
    """SFT at a learning rate of 1e39 diverges in stage 1: recorded, its stage 2 skipped, SDFT at 1e-3 still
    runs; the report lists the divergence; a restart trains nothing."""
    from sdft_jax.continual.plan import diverged_path

    exp = tiny_experiment(tiny_model_dir("llama"), tmp_path, learning_rates="1e-3",
                          method_learning_rates=ml_collections.ConfigDict({"sft": "1e39"}))
    exp.train.train.max_nonfinite_steps = 0
    plan = make_plan(exp)
    lines = []
    md = runner.run_plan(plan, compilation_cache=False, progress=lines.append)
    sft1, sft2, sdft1, sdft2 = (r.config.run_dir for r in plan.runs)
    record = json.loads(open(diverged_path(sft1)).read())
    # step 1's update makes the weights infinite; step 2's loss is not finite: stopped there
    assert record["step"] == 2 and record["nonfinite_steps"] == 1 and "diverged at step 2" in record["message"]
    assert not os.path.exists(os.path.join(sft1, "export")) and not os.path.exists(sft2)
    assert all(os.path.exists(os.path.join(d, "summary.json")) for d in (sdft1, sdft2))
    assert lines[1] == "[2/4] sft lr 1e+39 seed 0 stage 2: stage 1 diverged, skipped"
    text = open(md).read()
    assert "## Diverged" in text and "| sft | 1e+39 | 0 | 1 | 2 | 1 |" in text

    lines.clear()
    runner.run_plan(plan, compilation_cache=False, progress=lines.append)
    assert [line.split(": ", 1)[1] for line in lines] == ["diverged before, skipped", "stage 1 diverged, skipped",
                                                         "finished before, skipped", "finished before, skipped"]
