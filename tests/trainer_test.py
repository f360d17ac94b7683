"""The training loop end to end on a tiny model: rollout, step, eval, checkpoint, export, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sdft_jax.checkpoints.safetensors_io import SafetensorsDir
from sdft_jax.config import load_train_config
from sdft_jax.metrics import read_metrics
from sdft_jax.testing.configs import tiny_config


def test_three_steps_end_to_end(tiny_model_dir, tmp_path, torch_model):
    from sdft_jax.trainer import train

    model_dir = tiny_model_dir("llama")
    summary = train(load_train_config(tiny_config(model_dir, tmp_path / "run")))
    run = tmp_path / "run"
    rows = read_metrics(str(run))
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3]
    for r in rows:
        if "loss" in r:
            assert np.isfinite(r["loss"]) and r["completion_tokens"] > 0 and r["skipped_nonfinite"] == 0
            assert 0 < r["rollout/mean_length"] <= 8
    assert "eval/capitals/accuracy" in rows[0] and rows[0]["step"] == 0  # evaluated before training
    assert summary["eval"]["capitals"]["total"] == 2
    assert os.path.exists(run / "eval" / "step_000003" / "capitals.jsonl")
    assert sorted(os.listdir(run / "checkpoints"))[-1] == "3"
    # The export loads in transformers and differs from the starting weights.
    ref = torch_model(str(run / "export"))
    assert ref.config.model_type == "llama"
    before, after = SafetensorsDir(model_dir), SafetensorsDir(run / "export")
    name = "model.layers.0.mlp.up_proj.weight"
    assert np.abs(np.asarray(before.read(name)) - np.asarray(after.read(name))).max() > 1e-4
    # Started again, a finished run returns its summary without training.
    again = train(load_train_config(tiny_config(model_dir, run)))
    assert again == json.loads((run / "summary.json").read_text())
    assert len([r for r in read_metrics(str(run)) if "loss" in r]) == 3


def _cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "sdft_jax.train", *args], capture_output=True, text=True,
                          env={**os.environ, "XLA_FLAGS": "", **(env or {})}, timeout=120, **kwargs)


def test_cli_typos_fail_before_compiling(tmp_path):
    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
    start = time.time()
    typo = _cli(f"--config={cfg}", "--config.optim.learnig_rate=1e-3")
    assert typo.returncode != 0 and "learnig_rate" in typo.stderr
    bad = _cli(f"--config={cfg}", "--config.loss.reduction=mean")
    assert bad.returncode == 2 and "config.loss.reduction" in bad.stderr
    assert time.time() - start < 60  # no model was loaded nor compiled


def test_teacher_starts_from_another_model(tiny_model_dir, tmp_path):
    """teacher_init_from: the student starts from one model, the teacher from another of the same shape."""
    from sdft_jax.trainer import Trainer

    student_dir, teacher_dir = tiny_model_dir("llama"), tiny_model_dir("llama", seed=1)
    trainer = Trainer(load_train_config(tiny_config(student_dir, tmp_path / "run", teacher_init_from=teacher_dir)))
    try:
        names = ["model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"]
        student, teacher = SafetensorsDir(student_dir), SafetensorsDir(teacher_dir)
        assert not np.allclose(student.read(names[0]), teacher.read(names[0]))
        np.testing.assert_array_equal(np.asarray(trainer.state.teacher["embed"][...]), teacher.read(names[0]))
        np.testing.assert_array_equal(np.asarray(trainer.state.params["embed"][...]), student.read(names[0]))
    finally:
        trainer.checkpointer.close()
    for key, value in (("model.lora.rank", 4), ("method", "sft")):
        c = tiny_config(student_dir, tmp_path / "bad", teacher_init_from=teacher_dir, **{key: value})
        if value == "sft":
            c.loss.name = "sft"
        with pytest.raises(ValueError, match="teacher_init_from needs method 'sdft' with full fine-tuning"):
            load_train_config(c)


_COMPARED = ("loss", "kl", "grad_norm", "teacher_entropy", "rollout/mean_length", "completion_tokens")


def test_killed_run_resumes_exactly(tiny_model_dir, tmp_path):
    """Killed (SIGKILL) after a random step and restarted, the run ends as an uninterrupted one would."""
    from sdft_jax.trainer import train

    model_dir = tiny_model_dir("llama")
    overrides = {"train.steps": 5, "eval.tasks": "", "checkpoint.async_save": True}
    train(load_train_config(tiny_config(model_dir, tmp_path / "straight", **overrides)))

    kill_after = int(np.random.default_rng().integers(1, 5))  # a random step in 1..4
    run = tmp_path / "killed"
    script = ("import sys; sys.path.insert(0, {root!r})\n"
              "from sdft_jax.testing.configs import tiny_config\n"
              "from sdft_jax.config import load_train_config\n"
              "from sdft_jax.trainer import train\n"
              "train(load_train_config(tiny_config({m!r}, {r!r}, **{o!r})))\n").format(
        root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), m=model_dir, r=str(run), o=overrides)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(r["step"] >= kill_after for r in read_metrics(str(run)) if "loss" in r):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"the run ended before step {kill_after}: {proc.stderr.read()!r}"
    assert not os.path.exists(run / "summary.json")

    train(load_train_config(tiny_config(model_dir, run, **overrides)))
    straight = {r["step"]: r for r in read_metrics(str(tmp_path / "straight")) if "loss" in r}
    resumed = {r["step"]: r for r in read_metrics(str(run)) if "loss" in r}
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in straight:
        for key in _COMPARED:
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-6, abs=1e-7), (step, key)
    a, b = SafetensorsDir(tmp_path / "straight" / "export"), SafetensorsDir(run / "export")
    for name in a.names:
        np.testing.assert_array_equal(np.asarray(a.read(name)), np.asarray(b.read(name)), err_msg=name)


def test_config_fingerprint_ignores_the_process_id_only(tmp_path):
    from sdft_jax.trainer import config_fingerprint

    def fingerprint(**overrides):
        return config_fingerprint(load_train_config(tiny_config("/m", tmp_path, **overrides)))

    base = fingerprint(**{"distributed.process_id": 0, "distributed.num_processes": 2})
    assert fingerprint(**{"distributed.process_id": 1, "distributed.num_processes": 2}) == base
    assert fingerprint(**{"distributed.process_id": 1, "distributed.num_processes": 2,
                          "optim.learning_rate": 2e-3}) != base


def test_moe_lora_run_on_an_expert_mesh_exports_the_layout_it_loaded(tiny_model_dir, tmp_path, torch_model):
    """Qwen3-MoE with fused experts, LoRA on attention and every expert, 8 devices as data 2 x expert 4:
    the run trains (router metrics logged), and its export keeps the fused layout, with the adapters
    folded in, and loads in transformers."""
    from sdft_jax.trainer import train

    model_dir = tiny_model_dir("qwen3_moe", expert_layout="fused")
    overrides = {"mesh.tensor": 1, "mesh.expert": 4, "train.prompts_per_step": 8, "train.steps": 2,
                 "model.lora.rank": 4, "model.lora.targets": "q_proj,v_proj,experts_gate_proj,experts_up_proj,"
                                                           "experts_down_proj",
                 "checkpoint.every": 2}
    train(load_train_config(tiny_config(model_dir, tmp_path / "run", **overrides)))
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(1.0 <= r["router/max_over_mean_load"] <= 4 / 2 for r in rows)  # at most E / k
    export = SafetensorsDir(tmp_path / "run" / "export")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert name in export.names and not any(".experts.0." in n for n in export.names)
    before = np.asarray(SafetensorsDir(model_dir).read(name))
    assert np.abs(np.asarray(export.read(name)) - before).max() > 0  # the experts' adapters folded in
    assert torch_model(str(tmp_path / "run" / "export")).config.model_type == "qwen3_moe"
