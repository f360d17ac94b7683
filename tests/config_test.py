"""The trainer config: the library's own config classes as sections, every error naming its key."""

import dataclasses

import pytest

from sdft_jax.config import (
    ConfigError,
    MeshSection,
    TrainConfig,
    base_config,
    load_train_config,
    to_dict,
)
from sdft_jax.distill.losses import LossConfig
from sdft_jax.distill.train_state import OptimConfig
from sdft_jax.models.lora import PROJECTIONS, LoraConfig
from sdft_jax.sampling.sampler import SamplingConfig
from sdft_jax.testing.configs import tiny_config


def load(**overrides):
    """The default config with dotted-key overrides, validated."""
    c = base_config()
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return load_train_config(c)


def test_defaults_round_trip_through_the_config_dict():
    assert load() == TrainConfig()
    assert to_dict(load())["rollout"]["prompt_buckets"] == SamplingConfig().prompt_buckets


def test_sections_are_the_librarys_own_config_classes():
    cfg = load(**{"optim.learning_rate": 1e-3, "rollout.temperature": 0.5, "rollout.samples_per_prompt": 4,
                  "rollout.prompt_buckets": "64, 4096", "model.lora.rank": 8, "model.lora.targets": "q_proj,v_proj"})
    assert type(cfg.optim) is OptimConfig and cfg.optim.learning_rate == 1e-3
    assert type(cfg.loss) is LossConfig
    sampling = cfg.rollout.sampling()
    assert type(sampling) is SamplingConfig
    assert sampling == SamplingConfig(temperature=0.5, prompt_buckets=(64, 4096))
    assert cfg.rollout.samples_per_prompt == 4
    assert cfg.model.lora.adapters() == LoraConfig(rank=8, alpha=32.0, targets=("q_proj", "v_proj"))
    assert type(cfg.model.lora.adapters()) is LoraConfig
    assert load().model.lora.adapters() is None  # rank 0: full fine-tuning


def test_the_learning_rate_schedule_runs_over_the_train_steps():
    cfg = load(**{"train.steps": 10, "optim.learning_rate": 1.0, "optim.warmup_ratio": 0.2})
    schedule = cfg.optim.schedule_fn(cfg.train.steps)
    assert [float(schedule(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(schedule(10)) == pytest.approx(0.0)


@pytest.mark.parametrize("key, value, message", [
    ("loss.top_k", 0, r"config\.loss\.top_k: LossConfig\.top_k"),
    ("loss.name", "kl", r"config\.loss\.name"),
    ("method", "sft", r"config\.loss\.name: .*method 'sft' needs loss\.name"),
    ("teacher.mode", "ema2", r"config\.teacher\.mode"),
    ("teacher.ema_alpha", 2.0, r"config\.teacher\.ema_alpha: TeacherConfig\.ema_alpha"),
    ("train.steps", -1, r"config\.train\.steps: TrainSection\.steps must be an integer >= 0 \(0 = from epochs\)"),
    ("train.steps", 0, r"config\.train\.steps: TrainSection\.steps is 0 and epochs is 0: set one of them"),
    ("train.epochs", -0.5, r"config\.train\.epochs: TrainSection\.epochs must be a finite number >= 0"),
    ("train.max_nonfinite_steps", -1, r"config\.train\.max_nonfinite_steps: TrainSection\.max_nonfinite_steps "
                                      r"must be an integer >= 0"),
    ("model.lora.targets", "qkv", r"config\.model\.lora\.targets: LoraConfig\.targets must be one of"),
    ("model.lora.rank", -1, r"config\.model\.lora\.rank: LoraSection\.rank must be an integer >= 0"),
    ("model.lora.alpha", 0.0, r"config\.model\.lora\.alpha: LoraConfig\.alpha"),
    ("model.query_block", -1, r"config\.model\.query_block"),
    ("optim.warmup_ratio", 1.0, r"config\.optim\.warmup_ratio: OptimConfig\.warmup_ratio"),
    ("optim.learning_rate", 0.0, r"config\.optim\.learning_rate: OptimConfig\.learning_rate"),
    ("optim.schedule", "exponential", r"config\.optim\.schedule"),
    ("rollout.samples_per_prompt", 0, r"config\.rollout\.samples_per_prompt: RolloutConfig\.samples_per_prompt"),
    ("rollout.top_p", 1.5, r"config\.rollout\.top_p: SamplingConfig\."),
    ("rollout.max_new_tokens", 0, r"config\.rollout\.max_new_tokens: SamplingConfig\.max_new_tokens"),
    ("rollout.prompt_buckets", "64,x", r"config\.rollout\.prompt_buckets must be comma-separated integers"),
    ("rollout.prompt_buckets", "128,64", r"config\.rollout\.prompt_buckets: SamplingConfig\.prompt_buckets"),
    ("rollout.mode", "dynamic", r"config\.rollout\.mode must be one of \['static', 'continuous'\], got 'dynamic'"),
    ("rollout.slots", -1, r"config\.rollout\.slots: RolloutConfig\.slots must be an integer >= 0"),
    ("eval.batch_size", 0, r"config\.eval\.batch_size: EvalSection\.batch_size"),
    ("eval.every", -1, r"config\.eval\.every"),
    ("eval.scoring", "paper", r"config\.eval\.scoring must be one of \['project', 'recipe'\], got 'paper'"),
    ("checkpoint.every", 0, r"config\.checkpoint\.every: CheckpointSection\.every"),
    ("checkpoint.keep", 0, r"config\.checkpoint\.keep"),
    ("mesh.fsdp", 0, r"config\.mesh\.fsdp: MeshSection\.fsdp must be an integer >= 1 \(or -1"),
    ("data.offline_num_train", -1, r"config\.data\.offline_num_train"),
    ("data.shuffle_window", 0, r"config\.data\.shuffle_window: DataSection\.shuffle_window must be an integer >= 1"),
    ("data.task", "tooluse", r"config\.data\.data_dir: data_dir is required"),
    ("prompts.overlong", "cut", r"config\.prompts\.overlong"),
    ("seed", -1, r"config\.seed: TrainConfig\.seed"),
])
def test_invalid_values_fail_naming_the_key(key, value, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_train_config(tiny_config("m", tmp_path, **{key: value}))


def test_a_streamed_split_takes_steps_not_epochs(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.train\.epochs: .*no known size to count epochs in: set "
                                          r"train\.steps"):
        load_train_config(tiny_config("m", tmp_path, **{"data.streaming": True, "train.epochs": 1.0}))
    assert load_train_config(tiny_config("m", tmp_path, **{"data.streaming": True})).data.shuffle_window == 10_000


def test_values_of_the_wrong_type_are_named():
    raw = base_config().to_dict()  # a plain dict: no ConfigDict type check before ours
    raw["export"] = 1
    with pytest.raises(ConfigError, match=r"config\.export must be true or false, got 1"):
        load_train_config(raw)
    raw = base_config().to_dict()
    raw["loss"]["top_k"] = True
    with pytest.raises(ConfigError, match=r"config\.loss\.top_k must be an integer, got True"):
        load_train_config(raw)
    raw = base_config().to_dict()
    raw["run_dir"] = 3
    with pytest.raises(ConfigError, match=r"config\.run_dir must be a string, got 3"):
        load_train_config(raw)
    raw = base_config().to_dict()
    raw["rollout"]["prompt_buckets"] = 64
    with pytest.raises(ConfigError, match=r"config\.rollout\.prompt_buckets must be a comma-separated list, got 64"):
        load_train_config(raw)
    raw = base_config().to_dict()
    raw["rollout"]["prompt_buckets"] = [64, 8192]  # a list from a dict-built config
    assert load_train_config(raw).rollout.prompt_buckets == (64, 8192)
    raw = base_config().to_dict()
    raw["optim"]["learning_rate"] = 1  # an int where a float is expected is taken as that float
    assert load_train_config(raw).optim.learning_rate == 1.0


def test_a_rule_between_the_fields_of_a_library_section_names_its_first_key():
    with pytest.raises(ConfigError, match=r"config\.distributed\.process_id: .*process_id 3 is not below"):
        load(**{"distributed.process_id": 3, "distributed.num_processes": 2})


def test_sdft_needs_a_distillation_loss_and_sft_the_sft_loss():
    with pytest.raises(ConfigError, match=r"config\.loss\.name: .*method 'sdft' needs a distillation loss"):
        load(**{"loss.name": "sft"})
    with pytest.raises(ConfigError, match=r"config\.loss\.name: .*method 'sft' needs loss\.name = 'sft'"):
        load(method="sft")
    assert load(method="sft", **{"loss.name": "sft"}).method == "sft"


def test_teacher_init_from_needs_sdft_with_full_fine_tuning():
    assert load(teacher_init_from="/other").teacher_init_from == "/other"
    for overrides in ({"model.lora.rank": 4}, {"method": "sft", "loss.name": "sft"}):
        with pytest.raises(ConfigError, match=r"config\.teacher_init_from: .*needs method 'sdft' with full fine"):
            load(teacher_init_from="/other", **overrides)


def test_base_teacher_and_adapters_from_another_run_need_lora():
    lora = {"model.lora.rank": 4}
    cfg = load(init_adapters_from="/runs/a/stage1", **{"teacher.source": "base", "teacher.mode": "static"}, **lora)
    assert (cfg.init_adapters_from, cfg.teacher.source) == ("/runs/a/stage1", "base")
    with pytest.raises(ConfigError, match=r"config\.init_adapters_from: .*needs LoRA \(model\.lora\.rank > 0\)"):
        load(init_adapters_from="/runs/a/stage1")
    with pytest.raises(ConfigError, match=r"config\.teacher\.source: .*needs LoRA .*set teacher_init_from to the base"):
        load(**{"teacher.source": "base", "teacher.mode": "static"})
    with pytest.raises(ConfigError, match=r"config\.teacher\.source: TeacherConfig\.source='base' .*needs "
                                          r"mode 'static'"):
        load(**{"teacher.source": "base"}, **lora)  # the default mode is ema


def test_epochs_give_the_step_count_from_the_data():
    by_epochs = load(**{"train.steps": 0, "train.epochs": 1.0, "train.prompts_per_step": 4}).train
    assert by_epochs.steps_for(10) == 3  # ceil(10 / 4): the last step completes its batch from epoch 2
    assert by_epochs.steps_for(8) == 2
    assert dataclasses.replace(by_epochs, epochs=2.5).steps_for(10) == 7  # ceil(6.25)
    assert dataclasses.replace(by_epochs, epochs=0.1, prompts_per_step=3).steps_for(30) == 1  # not 1.0000000000000002
    assert load().train.steps_for(10) == 100  # epochs 0: train.steps
    both = load(**{"train.steps": 3, "train.epochs": 1.0, "train.prompts_per_step": 4}).train
    assert both.steps_for(10) == 3  # consistent: accepted
    with pytest.raises(ConfigError, match=r"config\.train\.epochs = 1 gives 2 steps for 8 items at 4 prompts per "
                                          r"step, but config\.train\.steps = 3: set train\.steps = 0"):
        both.steps_for(8)


@pytest.mark.parametrize("tensor", [2, -1])
def test_blocked_vocab_backward_is_refused_on_a_tensor_split_vocabulary(tensor):
    mesh = {"mesh.data": 1, "mesh.tensor": tensor}
    with pytest.raises(ConfigError, match=rf"config\.loss\.vocab_chunk_size: .*= 16384: must be 0 when the "
                                          rf"vocabulary is split over the tensor mesh axis \(mesh\.tensor = {tensor}\)"):
        load(**mesh)
    assert load(**mesh, **{"loss.vocab_chunk_size": 0}).mesh.tensor == tensor
    assert load(**{"mesh.tensor": 1}).loss.vocab_chunk_size == 16384
    # jsd never runs the blocked backward, so its vocab_chunk_size is unused and not refused.
    assert load(**mesh, **{"loss.name": "jsd"}).loss.vocab_chunk_size == 16384


def test_lora_section_at_rank_0_has_no_scale():
    full = load()
    assert full.model.lora.rank == 0 and full.model.lora.adapters() is None
    with pytest.raises(ValueError, match=r"LoraSection\.rank is 0 \(full fine-tuning\)"):
        full.model.lora.scale  # noqa: B018
    adapted = load(**{"model.lora.rank": 8, "model.lora.alpha": 16.0}).model.lora
    assert adapted.scale == 2.0 and adapted.adapters().scale == 2.0


def test_the_largest_prompt_bucket_holds_the_longest_prompt():
    with pytest.raises(ConfigError, match=r"config\.rollout\.prompt_buckets: .*prompts\.max_prompt_tokens = 2048"):
        load(**{"rollout.prompt_buckets": "64,1024"})
    assert load(**{"rollout.prompt_buckets": "64,1024", "prompts.max_prompt_tokens": 1024})
    # SFT samples nothing: the rollout's buckets are unused.
    assert load(method="sft", **{"loss.name": "sft", "rollout.prompt_buckets": "64,1024"})


def test_batch_rows_split_over_the_batch_axes():
    with pytest.raises(ConfigError, match=r"config\.train\.prompts_per_step: .*= 3: 3 batch rows per step \(1 per "
                                          r"prompt\) do not split over the mesh\.data x mesh\.fsdp x mesh\.expert = 2 "
                                          r"batch shards"):
        load(**{"train.prompts_per_step": 3, "mesh.data": 2})
    assert load(**{"train.prompts_per_step": 3, "mesh.data": 2, "rollout.samples_per_prompt": 2})
    assert load(**{"train.prompts_per_step": 3, "mesh.data": 1, "mesh.fsdp": -1})  # known on the devices only
    with pytest.raises(ConfigError, match=r"config\.train\.prompts_per_step: .*6 batch rows"):
        load(**{"train.prompts_per_step": 3, "rollout.samples_per_prompt": 2, "mesh.data": 4})
    # The expert axis splits the batch too (data parallel outside the MoE layers).
    with pytest.raises(ConfigError, match=r"config\.train\.prompts_per_step: .*= 2: 4 batch rows per step \(2 per "
                                          r"prompt\) do not split over the mesh\.data x mesh\.fsdp x "
                                          r"mesh\.expert = 8"):
        load(**{"train.prompts_per_step": 2, "rollout.samples_per_prompt": 2, "mesh.data": 2, "mesh.fsdp": 2,
                "mesh.expert": 2})
    assert load(**{"train.prompts_per_step": 4, "rollout.samples_per_prompt": 2, "mesh.data": 2, "mesh.fsdp": 2,
                   "mesh.expert": 2})
    assert load(**{"train.prompts_per_step": 3, "mesh.data": 1, "mesh.expert": -1})  # known on the devices only



def test_micro_batches_divide_the_step_and_split_over_the_batch_axes():
    assert load(**{"train.micro_batch_size": 4, "train.prompts_per_step": 8, "mesh.data": 4})
    assert load(**{"train.micro_batch_size": 4, "train.prompts_per_step": 2, "rollout.samples_per_prompt": 2,
                   "mesh.data": 2})  # 4 rows: one micro-batch, the whole batch
    with pytest.raises(ConfigError, match=r"config\.train\.micro_batch_size: .*= 3: does not divide the 8 batch "):
        load(**{"train.micro_batch_size": 3, "train.prompts_per_step": 8, "mesh.data": 1})
    with pytest.raises(ConfigError, match=r"config\.train\.micro_batch_size: .*= 16: does not divide the 8 batch"):
        load(**{"train.micro_batch_size": 16, "train.prompts_per_step": 8, "mesh.data": 1})
    with pytest.raises(ConfigError, match=r"config\.train\.micro_batch_size: .*= 2: a micro-batch's rows do not "
                                          r"split over the mesh\.data x mesh\.fsdp x mesh\.expert = 4 batch shards"):
        load(**{"train.micro_batch_size": 2, "train.prompts_per_step": 8, "mesh.data": 2, "mesh.fsdp": 2})
    assert load(**{"train.micro_batch_size": 2, "train.prompts_per_step": 8, "mesh.data": -1})  # known on the devices
    with pytest.raises(ConfigError, match=r"config\.train\.micro_batch_size: .* must be an integer >= 0"):
        load(**{"train.micro_batch_size": -1})


def test_rollout_batch_size_is_the_samplers_largest_batch():
    assert load().rollout.sampling().batch_buckets == SamplingConfig().batch_buckets  # 0: the buckets as they are
    sampling = load(**{"rollout.batch_size": 24, "mesh.data": 1}).rollout.sampling()
    assert sampling.batch_buckets == (1, 2, 4, 8, 16, 24)
    assert load(**{"rollout.batch_size": 1000, "mesh.data": 1}).rollout.sampling().batch_buckets[-2:] == (256, 1000)
    with pytest.raises(ConfigError, match=r"config\.rollout\.batch_size: .*= 6: does not split over the "
                                          r"mesh\.data x mesh\.fsdp x mesh\.expert = 4 batch shards"):
        load(**{"rollout.batch_size": 6, "mesh.data": 4})
    with pytest.raises(ConfigError, match=r"config\.rollout\.batch_size: .* must be an integer >= 0"):
        load(**{"rollout.batch_size": -2})

def test_mesh_sizes():
    with pytest.raises(ConfigError, match=r"config\.mesh: MeshSection: at most one size may be -1"):
        load(**{"mesh.fsdp": -1})
    with pytest.raises(ValueError, match=r"MeshSection\.tensor must be an integer >= 1 \(or -1 = all remaining"):
        MeshSection(tensor=-2)
    with pytest.raises(ConfigError, match=r"config\.mesh\.expert: MeshSection\.expert must be an integer >= 1"):
        load(**{"mesh.expert": 0})
    with pytest.raises(ConfigError, match=r"config\.mesh: MeshSection: at most one size may be -1"):
        load(**{"mesh.expert": -1})  # data is -1 by default
    assert MeshSection(data=2, fsdp=2, expert=2).shape() == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}


def test_direct_construction_checks_the_rules_too():
    with pytest.raises(ValueError, match=r"^TrainConfig\.loss\.vocab_chunk_size = 16384: must be 0"):
        TrainConfig(mesh=MeshSection(tensor=2))
    ok = TrainConfig(mesh=MeshSection(tensor=2), loss=LossConfig(vocab_chunk_size=0))
    assert dataclasses.replace(ok, seed=1).seed == 1


def test_unknown_keys_and_sections_are_named():
    raw = base_config().to_dict()
    raw["model"]["lora"]["ranks"] = 4
    with pytest.raises(ConfigError, match=r"unknown config key config\.model\.lora\.ranks \(valid keys of "
                                          r"config\.model\.lora: alpha, rank, targets\)"):
        load_train_config(raw)
    raw = base_config().to_dict()
    raw["optim"] = 1e-3
    with pytest.raises(ConfigError, match=r"config\.optim must be a section"):
        load_train_config(raw)


def test_lora_targets_parse_from_a_comma_separated_string():
    assert load(**{"model.lora.targets": " q_proj , o_proj,"}).model.lora.targets == ("q_proj", "o_proj")
    assert load().model.lora.targets == tuple(PROJECTIONS)
