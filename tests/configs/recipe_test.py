"""Every config under configs/recipe/ validates, and runs 2 training steps on CPU with its model swapped for
a tiny random one of the same family (on the upstream data layout, training splits written here)."""

import pathlib
import runpy

import datasets
import pytest

from sdft_jax.config import load_train_config, to_dict
from sdft_jax.testing.configs import with_overrides

RECIPE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "recipe"
# (file, variant, the model family its real model is)
TRAINER_CASES = [
    ("train_tooluse.py", "", "qwen3_5_moe"),
    ("debug.py", "", "qwen3_5_moe"),
    ("ablation.py", "topk_static", "qwen2"),
    ("ablation.py", "topk_ema", "qwen2"),
    ("ablation.py", "full_kl_static", "qwen2"),
    ("ablation.py", "full_kl_ema", "qwen2"),
    ("ablation.py", "sft", "qwen2"),
    ("parity_qwen3_4b.py", "", "qwen3"),
    ("parity_qwen3_4b.py", "lora", "qwen3"),
]
EXPERIMENT_CASES = [("continual.py", "", "qwen3_5_moe"), ("continual.py", "table", "qwen3_5_moe")]
# Runs of 2 steps: every file, and within a file one variant per distinct code path (model family x method x
# loss x teacher x LoRA), to keep the suite's time down: the ablation's variants differ only in loss and teacher
# mode, each covered; continual.py:table is continual.py's runs at two more learning rates.
RUN_CASES = [TRAINER_CASES[i] for i in (0, 1, 2, 5, 6, 8)] + [EXPERIMENT_CASES[0]]


def _get_config(name: str, variant: str):
    get = runpy.run_path(str(RECIPE / name))["get_config"]
    return get(variant) if variant else get()


def test_every_recipe_file_is_covered():
    assert {p.name for p in RECIPE.glob("*.py")} == {name for name, _, _ in TRAINER_CASES + EXPERIMENT_CASES}


@pytest.mark.parametrize("name, variant, family", TRAINER_CASES)
def test_recipe_config_validates_and_shards_its_state(name, variant, family):
    cfg = load_train_config(_get_config(name, variant))
    assert cfg.mesh.fsdp != 1 and cfg.mesh.data == 1  # state sharded, never replicated
    assert cfg.eval.scoring == "recipe" or not cfg.eval.tasks
    if cfg.method == "sdft":
        assert cfg.loss.top_k == 20 and cfg.rollout.temperature == 1.0


@pytest.mark.parametrize("name, variant, family", EXPERIMENT_CASES)
def test_recipe_experiment_validates(name, variant, family):
    from sdft_jax.continual.plan import make_plan

    plan = make_plan(_get_config(name, variant))
    sft = [r.config for r in plan.runs if r.method == "sft"]
    sdft = [r for r in plan.runs if r.method == "sdft_topk"]
    assert all(c.data.keep_system and c.optim.schedule == "linear" for c in sft)
    assert all(not r.config.data.keep_system and r.config.data.thinking_format for r in sdft)
    assert {r.config.teacher.source for r in sdft if r.stage == 2} == {"base"}
    assert len(plan.runs) == 4 * (3 if variant == "table" else 1)


# --- 2 steps with a tiny model ------------------------------------------------------------------------------

DEMONSTRATION = "<reasoning>\nAdd them.\n</reasoning>\n<answer>\nC\n</answer>"


@pytest.fixture(scope="module")
def upstream_train_data(tmp_path_factory) -> pathlib.Path:
    """The upstream layout with short training splits of both tasks (the real ones are not distributed)."""
    root = tmp_path_factory.mktemp("self-distillation")
    tool_rows = [{"prompt": f"Question: item {i}?", "golden_response": ["Action: get", "Action Input: {}"],
                  "golden_answer": [{"Action": "get", "Action_Input": "{}"}]} for i in range(4)]
    science_rows = [{"messages": [{"role": "system", "content": "Pick one."},
                                  {"role": "user", "content": f"{i}+1? A: 1 B: 2 C: {i + 1}"}],
                     "output_text": DEMONSTRATION} for i in range(4)]
    datasets.Dataset.from_list(tool_rows).save_to_disk(str(root / "tooluse_data" / "train_data"))
    datasets.Dataset.from_list(science_rows).save_to_disk(str(root / "science_data" / "train_data"))
    return root


def _tiny(model_dir: str, data_dir: pathlib.Path, run_dir: pathlib.Path) -> dict:
    """What the 2-step run changes: the model, the sizes, the mesh (8 fake devices: fsdp 2 x tensor 4)."""
    return {"model.name": model_dir, "model.dtype": "float32", "model.param_dtype": "float32", "model.remat": "none",
            "data.data_dir": str(data_dir), "run_dir": str(run_dir), "prompts.max_prompt_tokens": 256,
            "prompts.max_target_tokens": 64, "rollout.max_new_tokens": 4, "loss.chunk_size": 16,
            "loss.vocab_chunk_size": 0, "train.steps": 2, "train.epochs": 0.0, "train.prompts_per_step": 2,
            "train.micro_batch_size": 0, "eval.tasks": "", "eval.at_start": False, "checkpoint.every": 2,
            "checkpoint.async_save": False, "export": False,
            "mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 1, "mesh.tensor": -1}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    made = {}

    def make(family: str) -> str:
        if family not in made:
            from sdft_jax.testing.tiny import write_tiny_model

            made[family] = write_tiny_model(tmp_path_factory.mktemp(family) / "model", family)
        return made[family]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("name, variant, family", RUN_CASES)
def test_recipe_config_runs_two_steps_with_a_tiny_model(name, variant, family, family_model, upstream_train_data,
                                                         tmp_path):
    from sdft_jax.trainer import Trainer

    model_dir = family_model(family)
    if name == "continual.py":  # its SFT stage-1 run: its SDFT runs are train_tooluse.py's path on science data
        from sdft_jax.continual.plan import make_plan  # (stage 2's start: tests/continual/)

        runs = make_plan(_get_config(name, variant)).runs
        configs = [to_dict(r.config) for r in runs if r.stage == 1 and r.method == "sft"]
    else:
        configs = [_get_config(name, variant).to_dict()]
    for i, raw in enumerate(configs):
        cfg = load_train_config(with_overrides(raw, _tiny(model_dir, upstream_train_data, tmp_path / f"run{i}")))
        summary = Trainer(cfg).run()
        assert summary["steps"] == 2 and summary["method"] == cfg.method
        assert (tmp_path / f"run{i}" / "checkpoints").is_dir()
