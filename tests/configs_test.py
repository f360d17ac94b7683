"""Every config file under configs/ (and each variant) validates."""

import pathlib

import pytest

from sdft_jax.config import load_train_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CASES = [("demo.py", ""), ("sdft_tooluse.py", ""), ("sdft_tooluse.py", "full_kl"), ("sdft_tooluse.py", "lora"),
         ("sdft_science.py", ""), ("sdft_science.py", "thinking"), ("sft.py", ""), ("sft.py", "tooluse"), ("sft.py", "science"),
         ("qwen3_8b_tpu.py", ""), ("qwen3_8b_tpu.py", "lora"), ("qwen3_30b_a3b.py", ""),
         ("qwen3_30b_a3b.py", "attention"), ("qwen3_5_35b_a3b.py", ""), ("qwen3_5_35b_a3b.py", "dense_only")]
# Experiment configs (not one trainer config each); their plans are validated in tests/continual/plan_test.py.
EXPERIMENTS = [("continual.py", ""), ("continual.py", "upstream")]


def _get_config(name, variant):
    import runpy

    get = runpy.run_path(str(CONFIGS / name))["get_config"]
    return get(variant) if variant else get()


@pytest.mark.parametrize("name, variant", CASES)
def test_config_validates(name, variant):
    raw = _get_config(name, variant)
    if raw.data.task in ("tooluse", "science") and not raw.data.data_dir:
        with pytest.raises(ValueError, match="config.data.data_dir: data_dir is required"):
            load_train_config(raw)
        raw.data.data_dir = "/data/self-distillation"  # what a user passes with --config.data.data_dir
    cfg = load_train_config(raw)
    if name.startswith("sft"):
        assert cfg.method == "sft" and cfg.loss.name == "sft"
    if variant == "lora":
        assert cfg.model.lora.adapters() is not None and cfg.optim.learning_rate == 5e-4


def test_every_config_file_is_covered():
    assert {p.name for p in CONFIGS.glob("*.py")} == {name for name, _ in CASES + EXPERIMENTS}


@pytest.mark.parametrize("name, variant", EXPERIMENTS)
def test_experiment_config_validates(name, variant):
    from sdft_jax.continual.plan import make_plan

    raw = _get_config(name, variant)
    raw.train.data.data_dir = raw.train.data.data_dir or "/data/self-distillation"
    assert make_plan(raw).runs


def test_unknown_variant_fails():
    with pytest.raises(ValueError, match="unknown variant"):
        _get_config("sdft_tooluse.py", "nope")
