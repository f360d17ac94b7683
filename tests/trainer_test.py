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


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_model_dir, tmp_path_factory):
    """The tiny config's run (3 steps, evaluated at the start and the end), run once for the module:
    (model directory, run directory, summary). Tests compare interrupted runs with it; none changes it."""
    from sdft_jax.trainer import train

    model_dir = tiny_model_dir("llama")
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    return model_dir, run, train(load_train_config(tiny_config(model_dir, run)))


def test_three_steps_end_to_end(uninterrupted_run, torch_model):
    from sdft_jax.trainer import train

    model_dir, run, summary = uninterrupted_run
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


def test_a_continuous_batching_run_trains_as_the_static_run(uninterrupted_run, tmp_path):
    """rollout.mode = continuous on one slot (each step's two rows one after the other, the slot refilled):
    the same rows for the same key, so the same steps; log-probs and sums only to fp32 order (the rows'
    keys lie in other cache slots)."""
    from sdft_jax.trainer import train

    model_dir, static_run, _ = uninterrupted_run
    run = tmp_path / "run"
    train(load_train_config(tiny_config(model_dir, run, **{"rollout.mode": "continuous", "rollout.slots": 1})))
    static_rows = [r for r in read_metrics(str(static_run)) if "loss" in r]
    rows = [r for r in read_metrics(str(run)) if "loss" in r]
    assert [r["step"] for r in rows] == [r["step"] for r in static_rows] == [1, 2, 3]
    for x, y in zip(static_rows, rows):
        assert y["rollout/mean_length"] == x["rollout/mean_length"] and y["completion_tokens"] == x["completion_tokens"]
        for key in ("loss", "kl", "grad_norm", "teacher_entropy"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    ea, eb = SafetensorsDir(static_run / "export"), SafetensorsDir(run / "export")
    for name in ea.names:
        np.testing.assert_allclose(np.asarray(eb.read(name)), np.asarray(ea.read(name)), atol=1e-6, err_msg=name)


def _cli(*args, env=None, **kwargs):
    """The training CLI as a user runs it: one CPU device (compiled at -O0 like the suite, conftest.py)."""
    return subprocess.run([sys.executable, "-m", "sdft_jax.train", *args], capture_output=True, text=True,
                          env={**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", **(env or {})},
                          timeout=120, **kwargs)


def test_cli_typos_fail_before_compiling(tmp_path):
    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
    start = time.time()
    typo = _cli(f"--config={cfg}", "--config.optim.learnig_rate=1e-3")
    assert typo.returncode != 0 and "learnig_rate" in typo.stderr
    bad = _cli(f"--config={cfg}", "--config.loss.reduction=mean")
    assert bad.returncode == 3 and "config.loss.reduction" in bad.stderr  # errors.CONFIG
    assert time.time() - start < 60  # no model was loaded nor compiled


def test_evaluation_frees_the_samplers_memory(tiny_model_dir, tmp_path):
    """An evaluation's KV cache and rollout weights fit no rollout: freed after it, so that the checkpoint
    save and the train step that follow do not hold them (the run ends with an evaluation)."""
    from sdft_jax.trainer import Trainer

    trainer = Trainer(load_train_config(tiny_config(tiny_model_dir("llama"), tmp_path / "run", **{"train.steps": 1})))
    try:
        summary = trainer.run()
    finally:
        trainer.checkpointer.close()
    assert summary["eval"]["capitals"]["total"] == 2  # the run evaluated, through the sampler
    assert trainer.sampler.compilations > 0
    assert trainer.sampler.kept_cache is None and trainer.sampler.kept_weights is None


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


def test_killed_run_resumes_exactly(uninterrupted_run, tmp_path):
    """Killed (SIGKILL) after a random step and restarted, the run ends as an uninterrupted one would
    (this one saving asynchronously, the uninterrupted one not)."""
    from sdft_jax.trainer import train

    model_dir, straight, _ = uninterrupted_run
    overrides = {"checkpoint.async_save": True}
    kill_after = int(np.random.default_rng().integers(1, 3))  # a random step in 1..2
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
    _same_run(straight, run)


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


class _Killed(BaseException):
    """Stands for a SIGKILL at that point: nothing catches it (what a kill would not clean up, the tests
    leave on disk themselves)."""


def _plant(path, text="half"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _same_run(a, b):
    """Two run directories hold the same metric rows (in order), export and summary."""
    rows_a, rows_b = read_metrics(str(a)), read_metrics(str(b))
    assert [(r["step"], "loss" in r) for r in rows_b] == [(r["step"], "loss" in r) for r in rows_a]
    for x, y in zip(rows_a, rows_b):
        for key in (*_COMPARED, "eval/capitals/accuracy"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), (x["step"], key)
    ea, eb = SafetensorsDir(a / "export"), SafetensorsDir(b / "export")
    assert ea.names == eb.names
    for name in ea.names:
        np.testing.assert_array_equal(np.asarray(ea.read(name)), np.asarray(eb.read(name)), err_msg=name)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {**sb, "export": None} == {**sa, "export": None} and sb["export"] == str(b / "export")


def test_kills_at_every_write_and_a_damaged_checkpoint_resume_to_the_uninterrupted_result(
        uninterrupted_run, tmp_path, monkeypatch, caplog):
    """One run killed in turn during: a checkpoint save (with a torn metrics row; its newest intact
    checkpoint then found damaged), the metrics rewrite of the resume, the export, the summary. Each
    restart resumes; the end is the uninterrupted run's, and nothing a kill left remains."""
    import sdft_jax.cache
    from sdft_jax import trainer
    from sdft_jax.checkpointing import Checkpointer

    model_dir, straight, _ = uninterrupted_run
    run = tmp_path / "run"

    def attempt(*patches):
        with monkeypatch.context() as m:
            for obj, name, value in patches:
                m.setattr(obj, name, value)
            with pytest.raises(_Killed):
                trainer.train(load_train_config(tiny_config(model_dir, run)))

    # 1. Killed while saving step 3: Orbax's temporary directory and a torn row are left; then the newest
    #    complete checkpoint (2) is damaged on disk.
    save = Checkpointer.save

    def killed_save(self, step, *args):
        if step < 3:
            return save(self, step, *args)
        _plant(os.path.join(self.directory, "3.orbax-checkpoint-tmp", "state", "half"))
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 4, "lo')
        raise _Killed

    attempt((Checkpointer, "save", killed_save))
    ckpt = run / "checkpoints" / "2" / "state"
    largest = max((os.path.join(r, f) for r, _, fs in os.walk(ckpt) for f in fs), key=os.path.getsize)
    os.remove(largest)
    rows_before = (run / "metrics.jsonl").read_bytes()

    # 2. Killed during the resume's rewrite of metrics.jsonl (before its rename, the new file half written).
    replace = os.replace

    def killed_replace(src, dst):
        if os.path.basename(dst) == "metrics.jsonl":
            raise _Killed
        replace(src, dst)

    with caplog.at_level("WARNING", logger="sdft_jax.checkpointing"):
        attempt((sdft_jax.cache.os, "replace", killed_replace), (sdft_jax.cache.os, "remove", lambda p: None))
    assert f"checkpoint {run / 'checkpoints' / '2'} does not restore" in caplog.text
    assert "resuming from step 1" in caplog.text
    assert (run / "metrics.jsonl").read_bytes() == rows_before  # every row kept
    assert any(n.startswith(".metrics.jsonl.partial-") for n in os.listdir(run))

    # 3. Killed during the export, which leaves its temporary directory.
    def killed_export(*args, **kwargs):
        _plant(str(run / ".export.partial-abc" / "model.safetensors"))
        raise _Killed

    attempt((trainer, "save_hf", killed_export))
    assert not (run / "export").exists() and not (run / "summary.json").exists()

    # 4. Killed during summary.json (its temporary file written, not yet renamed).
    def killed_summary(src, dst):
        if os.path.basename(dst) == "summary.json":
            raise _Killed
        replace(src, dst)

    attempt((sdft_jax.cache.os, "replace", killed_summary), (sdft_jax.cache.os, "remove", lambda p: None))
    assert (run / "export" / "config.json").exists() and not (run / "summary.json").exists()

    # 5. Started once more, it finishes as the uninterrupted run did.
    summary = trainer.train(load_train_config(tiny_config(model_dir, run)))
    assert summary == json.loads((run / "summary.json").read_text()) and summary["nonfinite_steps"] == 0
    _same_run(straight, run)
    left = [os.path.join(r, n) for r, ds, fs in os.walk(run) for n in ds + fs if ".partial-" in n or "-tmp" in n]
    assert left == []
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "3"]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the 1e39 learning rate
@pytest.mark.parametrize("learning_rate, stopped_at, reason", [
    (1e30, 3, "2 consecutive steps with a non-finite loss or gradient"),  # weights ~1e30: NaN from step 2
    (1e39, 1, "step 1: not saved: non-finite values in params/"),  # an infinite step size: inf weights at once
])
def test_a_diverging_run_stops_and_exports_nothing(tiny_model_dir, tmp_path, learning_rate, stopped_at, reason):
    from sdft_jax.checkpointing import Checkpointer
    from sdft_jax.trainer import DivergedError, train

    run = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir("llama"), run, **{
        "optim.learning_rate": learning_rate, "train.steps": 5, "train.max_nonfinite_steps": 1, "eval.tasks": ""})
    with pytest.raises(DivergedError, match=f"diverged at step {stopped_at}: .*{reason}") as error:
        train(load_train_config(cfg))
    assert error.value.step == stopped_at
    assert not (run / "export").exists() and not (run / "summary.json").exists()
    rows = read_metrics(str(run))
    assert [r["step"] for r in rows] == list(range(1, stopped_at + 1))
    assert error.value.nonfinite_steps == sum(r["skipped_nonfinite"] for r in rows)
    for line in (run / "metrics.jsonl").read_text().splitlines():  # strict JSON, non-finite values spelled out
        row = json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
        assert row["loss"] is not None or row["nonfinite"]["loss"] == "NaN"
    # Every checkpoint left holds finite weights (restore checks), the diverged step's none.
    checkpointer = Checkpointer(str(run))
    assert checkpointer.all_steps() == list(range(1, stopped_at))
    checkpointer.close()


def test_skipped_bad_rows_are_counted_in_the_summary(tiny_model_dir, tmp_path):
    from sdft_jax.trainer import train

    data = tmp_path / "train.jsonl"
    rows = [json.dumps({"question": f"What is {i}?", "demonstration": f"It is {i}."}) for i in range(4)]
    rows[1] = '{"question": "broken \\ud800", "demonstration": "x"}'  # a lone surrogate: no tokenizer takes it
    rows.insert(3, '{"question": 3}')
    data.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir("llama"), run, **{
        "data.task": "jsonl", "data.data_dir": str(data), "data.skip_bad_rows": True, "train.steps": 1,
        "eval.tasks": "", "checkpoint.every": 1, "prompts.max_prompt_tokens": 256})
    summary = train(load_train_config(cfg))
    assert summary["skipped_rows"] == {"jsonl/train": {"invalid_utf8": 1, "wrong_type": 1}}
    assert summary["train_items"] == 3
    assert json.loads((run / "summary.json").read_text())["skipped_rows"] == summary["skipped_rows"]


def test_a_streamed_split_counts_what_it_skips_and_resumes_exactly(tiny_model_dir, tmp_path):
    """data.streaming on a JSON Lines file with a bad row and an overlong prompt: the run reads it pass after
    pass (window 3), counts both, and a run resumed from its step-2 checkpoint ends as the uninterrupted one."""
    import shutil

    from sdft_jax.trainer import train

    data = tmp_path / "train.jsonl"
    rows = [json.dumps({"question": f"What is {i}?", "demonstration": f"It is {i}."}) for i in range(6)]
    rows[2] = '{"question": 3}'
    rows[4] = json.dumps({"question": "long " * 600, "demonstration": "x"})  # over max_prompt_tokens
    data.write_text("\n".join(rows) + "\n")
    overrides = {"data.task": "jsonl", "data.data_dir": str(data), "data.skip_bad_rows": True,
                 "data.streaming": True, "data.shuffle_window": 3, "eval.tasks": "", "prompts.max_prompt_tokens": 256}
    model_dir = tiny_model_dir("llama")
    straight = tmp_path / "straight"
    summary = train(load_train_config(tiny_config(model_dir, straight, **overrides)))
    # 3 steps of 2 of the 4 good items: pass 0 whole (its bad row and overlong prompt), then 2 of pass 1
    assert summary["steps"] == 3 and summary["train_items"] is None
    assert summary["skipped_rows"] == {"jsonl/train": {"wrong_type": 1}}
    assert summary["dropped_items"] == {"student_overlong": 1}
    assert [r["epoch"] for r in read_metrics(str(straight)) if "loss" in r] == [0.0, 1.0, 1.0]

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("summary.json", "export", "checkpoints/3"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    assert sorted(os.listdir(resumed / "checkpoints")) == ["2"]  # resumed from step 2, in the second window
    train(load_train_config(tiny_config(model_dir, resumed, **overrides)))
    _same_run(straight, resumed)
