"""Bad configurations: values, keys, rules between keys, rules that need the model, and the continual plan.

Each case is one bad setting on a valid config; it must be refused as a ConfigError (exit status 3,
`sdft_jax.errors`) whose one-line message names the key as the user writes it (`config.section.key`),
before any weight loads: the value and cross-key rules in `load_train_config`, the rules that need
the model's config.json and the device count in `config.check_fit` / `trainer.preflight`. A sample
runs `python -m sdft_jax.train` itself: one line on stderr, no traceback, the documented status.
"""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import subprocess
import sys

import pytest

from sdft_jax import errors
from sdft_jax.config import ConfigError, TrainConfig, base_config, check_fit, load_train_config
from sdft_jax.continual.plan import make_plan
from sdft_jax.errors import ModelError
from sdft_jax.testing.configs import tiny_config, with_overrides
from sdft_jax.testing.tiny import tiny_config as tiny_model_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_DEVICES = 8  # tests/conftest.py's fake CPU devices


def assert_config_error(error: BaseException, key: str, *words: str) -> None:
    message = str(error)
    assert isinstance(error, ConfigError), f"{type(error).__name__}: {message}"
    assert errors.classify(error).status == errors.CONFIG
    assert f"config.{key}" in message, f"config.{key} not named in {message!r}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "\n" not in message


# (overrides on base_config(), the key the message must name, words it must also hold)
VALUE_CASES = [
    ({"checkpoint.keep": 0}, "checkpoint.keep", ">= 1, got 0"),  # would delete every checkpoint
    ({"checkpoint.every": 0}, "checkpoint.every", ">= 1, got 0"),
    ({"checkpoint.async_save": 1}, "checkpoint.async_save", "true or false"),
    ({"eval.batch_size": 0}, "eval.batch_size", ">= 1, got 0"),
    ({"eval.limit": -1}, "eval.limit", ">= 0, got -1"),  # not 63 of 64 items
    ({"eval.every": -5}, "eval.every", ">= 0"),
    ({"eval.max_new_tokens": -1}, "eval.max_new_tokens", ">= 0"),
    ({"eval.scoring": "paper"}, "eval.scoring", "'project', 'recipe'"),
    ({"eval.tasks": "capitals,nope"}, "eval.tasks", "'nope'"),
    ({"eval.tasks": "capitals,capitals"}, "eval.tasks", "twice"),
    ({"rollout.temperature": -1.0}, "rollout.temperature", ">= 0"),
    ({"rollout.temperature": float("nan")}, "rollout.temperature", "finite"),
    ({"rollout.top_p": 1.5}, "rollout.top_p", "(0, 1]"),
    ({"rollout.top_p": 0.0}, "rollout.top_p", "(0, 1]"),
    ({"rollout.top_k": -1}, "rollout.top_k", ">= 0"),
    ({"rollout.max_new_tokens": 0}, "rollout.max_new_tokens", ">= 1"),
    ({"rollout.samples_per_prompt": 0}, "rollout.samples_per_prompt", ">= 1"),
    ({"rollout.prompt_buckets": "2048,64"}, "rollout.prompt_buckets", "increasing"),
    ({"rollout.batch_buckets": "4,x"}, "rollout.batch_buckets", "integers"),
    ({"rollout.batch_size": -2}, "rollout.batch_size", ">= 0"),
    ({"loss.name": "kl"}, "loss.name", "'topk'"),
    ({"loss.top_k": 0}, "loss.top_k", ">= 1"),
    ({"loss.top_k": True}, "loss.top_k", "an integer, got True"),
    ({"teacher.ema_alpha": 0.0}, "teacher.ema_alpha", "(0.0, 1.0]"),
    ({"teacher.mode": "sync"}, "teacher.sync_every", "mode 'sync'"),
    ({"teacher.mode": "often"}, "teacher.mode", "'often'"),
    ({"optim.learning_rate": 0.0}, "optim.learning_rate", "> 0.0"),
    ({"optim.learning_rate": float("inf")}, "optim.learning_rate", "finite"),
    ({"optim.b1": 1.0}, "optim.b1", "[0.0, 1.0)"),
    ({"optim.schedule": "cosine2"}, "optim.schedule", "'cosine2'"),
    ({"train.steps": -1}, "train.steps", ">= 0"),
    ({"train.steps": 0, "train.epochs": 0.0}, "train.steps", "set one of them"),
    ({"train.epochs": -1.0}, "train.epochs", ">= 0.0"),
    ({"train.prompts_per_step": 0}, "train.prompts_per_step", ">= 1"),
    ({"train.max_nonfinite_steps": -1}, "train.max_nonfinite_steps", ">= 0"),
    ({"train.log_every": 0}, "train.log_every", ">= 1"),
    ({"model.dtype": "float16"}, "model.dtype", "'bfloat16'"),
    ({"model.remat": "some"}, "model.remat", "'dots'"),
    ({"model.name": ""}, "model.name", "got ''"),
    ({"model.query_block": -1}, "model.query_block", ">= 0"),
    ({"model.lora.rank": -1}, "model.lora.rank", ">= 0"),
    ({"model.lora.targets": "q_proj,nope"}, "model.lora.targets", "nope"),
    ({"data.task": "capitalz"}, "data.task", "'capitalz'"),
    ({"data.split": "test"}, "data.split", "'test'"),
    ({"data.task": "tooluse"}, "data.data_dir", "required for task 'tooluse'"),
    ({"data.task": "tooluse_json", "data.data_dir": "/data"}, "data.split", "['eval']"),
    ({"data.offline_num_train": 0}, "data.offline_num_train", "to train on task 'capitals'"),
    ({"data.offline_num_train": -3}, "data.offline_num_train", ">= 0"),
    ({"prompts.max_prompt_tokens": 0}, "prompts.max_prompt_tokens", ">= 1"),
    ({"prompts.teacher_template": "{question} only"}, "prompts.teacher_template", "{demonstration}"),
    ({"prompts.overlong": "cut"}, "prompts.overlong", "'truncate_left'"),
    ({"mesh.data": 0}, "mesh.data", ">= 1"),
    ({"mesh.fsdp": -1}, "mesh", "at most one size may be -1"),
    ({"method": "dpo"}, "method", "'sdft'"),
    ({"seed": -1}, "seed", "[0, 4294967295]"),
    ({"export": "yes"}, "export", "true or false"),
    ({"run_dir": ""}, "run_dir", "got ''"),
    ({"run_dir": 3}, "run_dir", "must be a string"),
    ({"distributed.process_id": -1}, "distributed.process_id", ">= 0"),
]

RULE_CASES = [
    ({"method": "sft"}, "loss.name", "method 'sft' needs loss.name = 'sft'"),
    ({"loss.name": "sft"}, "loss.name", "method 'sdft' needs a distillation loss"),
    ({"teacher.source": "base", "teacher.mode": "static"}, "teacher.source", "needs LoRA"),
    ({"init_adapters_from": "runs/a"}, "init_adapters_from", "needs LoRA"),
    ({"teacher_init_from": "m", "method": "sft", "loss.name": "sft"}, "teacher_init_from", "method 'sdft'"),
    ({"rollout.prompt_buckets": "64,128"}, "rollout.prompt_buckets", "prompts.max_prompt_tokens = 2048"),
    ({"mesh.data": 3}, "train.prompts_per_step", "3 batch shards"),
    ({"train.micro_batch_size": 5}, "train.micro_batch_size", "does not divide the 32 batch rows"),
    ({"mesh.data": 4, "rollout.batch_size": 6}, "rollout.batch_size", "4 batch shards"),
    ({"mesh.data": 1, "mesh.tensor": 2}, "loss.vocab_chunk_size", "mesh.tensor = 2"),
    ({"eval.tasks": "capitals,science"}, "data.data_dir", "task 'science' reads its eval split from there"),
]


@pytest.mark.parametrize("overrides, key, words", VALUE_CASES + RULE_CASES,
                         ids=[f"{k}={list(o.values())[-1]!r}" for o, k, _ in VALUE_CASES + RULE_CASES])
def test_a_bad_value_or_rule_names_its_key(overrides, key, words):
    with pytest.raises(Exception) as info:
        load_train_config(with_overrides(base_config().to_dict(), overrides))
    assert_config_error(info.value, key, words)


def test_an_unknown_key_or_section_is_named_with_the_valid_ones():
    c = base_config()
    c.checkpoint.unlock()
    c.checkpoint.kep = 3
    with pytest.raises(ConfigError) as info:
        load_train_config(c)
    assert_config_error(info.value, "checkpoint.kep", "valid keys of config.checkpoint: async_save, every, keep")
    with pytest.raises(ConfigError) as info:
        load_train_config({**base_config().to_dict(), "optim": 3})
    assert_config_error(info.value, "optim", "must be a section")


# -- the rules that need the model: config.check_fit, before any weight loads ---------------------------


def tiny(**overrides) -> TrainConfig:
    return load_train_config(tiny_config("unused-model-dir", "runs/unused", **overrides))


@pytest.mark.parametrize("overrides, model_overrides, key, words", [
    ({"loss.top_k": 100_000}, {}, "loss.top_k", "above the model's vocabulary of"),
    ({"loss.name": "reverse_topk", "loss.top_k": 100_000}, {}, "loss.top_k", "vocabulary"),
    ({"mesh.data": 2, "mesh.tensor": 8}, {}, "mesh", "needs 16 devices"),
    ({"mesh.data": 3, "mesh.tensor": -1, "train.prompts_per_step": 3}, {}, "mesh", "a multiple of 3 devices"),
    # -1 resolved: all 8 devices on the batch axis, for 2 prompts a step
    ({"mesh.data": -1, "mesh.tensor": 1}, {}, "train.prompts_per_step", "8 batch shards"),
    ({"mesh.data": 1, "mesh.tensor": 1, "mesh.expert": -1}, {"architecture": "qwen3_moe"}, "train.prompts_per_step",
     "8 batch shards"),
    ({"mesh.data": 1, "mesh.tensor": 1, "mesh.expert": 8, "train.prompts_per_step": 8}, {"architecture": "qwen3_moe"},
     "mesh.expert", "does not divide the model's 4 experts"),
    ({"prompts.max_prompt_tokens": 1024, "rollout.prompt_buckets": "1024"}, {}, "prompts.max_prompt_tokens",
     "above the model's 512 positions"),
])
def test_a_rule_that_needs_the_model_names_its_key(overrides, model_overrides, key, words):
    architecture = model_overrides.pop("architecture", "llama")
    with pytest.raises(ConfigError) as info:
        check_fit(tiny(**overrides), tiny_model_config(architecture, **model_overrides), NUM_DEVICES)
    assert_config_error(info.value, key, words)


def test_the_tiny_config_fits():
    check_fit(tiny(), tiny_model_config("llama"), NUM_DEVICES)
    check_fit(tiny(**{"method": "sft", "loss.name": "sft", "loss.top_k": 100_000}), tiny_model_config("llama"),
              NUM_DEVICES)  # top_k is unused by SFT


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory):
    """A model directory holding only config.json: enough for every check before the weights."""
    def make(name: str, **overrides) -> str:
        path = tmp_path_factory.mktemp(name)
        (path / "config.json").write_text(json.dumps(tiny_model_config("llama", **overrides).to_hf_dict()))
        return str(path)
    return make


def test_preflight_names_the_model_key(config_only_model, tmp_path):
    from sdft_jax.trainer import preflight

    path = config_only_model("student")
    assert preflight(tiny(**{"model.name": path})) == path
    with pytest.raises(ModelError, match=r"^config\.model\.name: model '/nonexistent/model': not a registered name"):
        preflight(tiny(**{"model.name": "/nonexistent/model"}))
    with pytest.raises(ModelError, match=r"^config\.init_from: .*missing config\.json"):
        preflight(tiny(**{"init_from": str(tmp_path)}))  # a directory without config.json
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"^config\.init_from: .*not valid JSON"):
        preflight(tiny(**{"init_from": str(tmp_path)}))
    with pytest.raises(ConfigError) as info:
        preflight(tiny(**{"model.name": path, "loss.top_k": 100_000}))
    assert_config_error(info.value, "loss.top_k", "vocabulary")


def test_preflight_checks_the_teacher_start_and_the_adapters_run(config_only_model, tmp_path):
    from sdft_jax.trainer import preflight

    student, wider = config_only_model("student2"), config_only_model("wider", hidden_size=128)
    with pytest.raises(ConfigError) as info:
        preflight(tiny(**{"model.name": student, "teacher_init_from": wider}))
    assert_config_error(info.value, "teacher_init_from", "hidden_size 128 vs 64")
    with pytest.raises(ConfigError) as info:
        preflight(tiny(**{"model.name": student, "model.lora.rank": 4, "init_adapters_from": str(tmp_path)}))
    assert_config_error(info.value, "init_adapters_from", "no checkpoints/ there")


# -- the continual plan's own keys ------------------------------------------------------------------------


def continual(**overrides):
    get_config = runpy.run_path(str(ROOT / "configs" / "continual.py"))["get_config"]
    return with_overrides(get_config().to_dict(), overrides)


@pytest.mark.parametrize("overrides, key, words", [
    ({"task_a": "capitalz"}, "task_a", "unknown task 'capitalz'"),
    ({"task_b": "tooluse_json"}, "task_b", "unknown task"),  # eval only: nothing to train on
    ({"probe_tasks": "probe,nope"}, "probe_tasks", "'nope'"),
    ({"task_b": "capitals"}, "task_a", "different tasks"),
    ({"out_dir": ""}, "out_dir", "got ''"),
    ({"compilation_cache": "yes"}, "compilation_cache", "true or false"),
    ({"methods": "sft,dpo"}, "methods", "unknown method 'dpo'"),
    ({"methods": "sft,sft"}, "methods", "twice"),
    ({"learning_rates": "1e-5,-1"}, "learning_rates", "must be > 0"),
    ({"seeds": "0,x"}, "seeds", "not an integer"),
    ({"stage2_teacher": "other"}, "stage2_teacher", "'stage1', 'base'"),
    ({"stage2_steps": -1}, "stage2_steps", ">= 0"),
    ({"train.checkpoint.keep": 0}, "train.checkpoint.keep", ">= 1"),
    ({"train.teacher.source": "base", "train.model.lora.rank": 4, "train.teacher.mode": "static"},
     "train.teacher.source", "stage2_teacher"),
])
def test_a_bad_continual_key_is_named(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        make_plan(continual(**overrides))
    assert_config_error(info.value, key, words)


def test_every_stage_of_a_plan_is_checked_against_the_base_model(config_only_model):
    from sdft_jax.trainer import check_plan_fits

    plan = make_plan(continual(**{"train.model.name": config_only_model("base"), "train.loss.top_k": 100_000,
                                  "methods": "sft,sdft_topk"}))
    with pytest.raises(ConfigError) as info:  # sft ignores top_k; sdft_topk's stages do not
        check_plan_fits(plan.base_config, [run.config for run in plan.runs])
    assert_config_error(info.value, "train.loss.top_k", "vocabulary")


# -- the command itself: one line, no traceback, the documented status -------------------------------------


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "sdft_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, status, line", [
    (["--config=configs/demo.py", "--config.checkpoint.keep=0"], errors.CONFIG,
     "python -m sdft_jax.train: invalid config: config.checkpoint.keep: CheckpointSection.keep must be an integer "
     ">= 1, got 0"),
    (["--config=configs/demo.py", "--bogus"], errors.USAGE,
     "python -m sdft_jax.train: usage error: Unknown command line flag 'bogus' (--help lists the arguments)"),
])
def test_the_train_command_prints_one_line_and_its_status(args, status, line):
    result = run_train(*args)
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (status, line), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_the_train_command_checks_the_model_before_loading_it(config_only_model):
    # The directory has no weights: the error comes from config.json alone, before any would load.
    result = run_train("--config=configs/demo.py", f"--config.model.name={config_only_model('cli')}",
                       "--config.loss.top_k=100000", "--config.run_dir=/nonexistent/never-written")
    assert result.returncode == errors.CONFIG, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "python -m sdft_jax.train: invalid config: config.loss.top_k = 100000: above the model's vocabulary")
    assert "Traceback" not in result.stderr
    result = run_train("--config=configs/demo.py", "--config.model.name=/nonexistent/model", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "ModelError" in result.stderr
