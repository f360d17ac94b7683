"""The trainer's configuration: typed sections built from an ml_collections ConfigDict.

Config files under `configs/` return a ConfigDict (data, with a comment per key); `load_train_config`
checks it against these dataclasses before anything is compiled: an unknown key, a missing section or
an invalid value fails with a message naming the key (e.g. `config.loss.top_k`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import ml_collections

from sdft_jax.data.prompts import PromptConfig
from sdft_jax.distill.losses import LossConfig
from sdft_jax.distill.teacher import TeacherConfig
from sdft_jax.distributed import DistributedConfig
from sdft_jax.models.lora import PROJECTIONS, LoraConfig
from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK, check_query_block


def _check_choice(obj, *names: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for name in names:
        allowed = typing.get_args(hints[name])
        if allowed and getattr(obj, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(obj, name)!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    name: str = "smollm2-135m"  # registered name or HF directory
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage of frozen weights (trainable ones are fp32 masters)
    remat: Literal["none", "full", "dots"] = "full"
    query_block: int = DEFAULT_QUERY_BLOCK  # queries per attention block in training forwards (0 = one block)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 32.0
    lora_targets: str = ",".join(PROJECTIONS)

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        check_query_block(self.query_block)
        _check_choice(self, "dtype", "param_dtype", "remat")
        try:
            LoraConfig(rank=max(self.lora_rank, 1), alpha=self.lora_alpha, targets=self._targets())
        except ValueError as e:
            raise ValueError(f"lora_targets: {e}") from None

    def _targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def lora(self) -> LoraConfig | None:
        if not self.lora_rank:
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self._targets())


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    task: str = "capitals"  # tooluse | science | jsonl | an offline task (capitals, elements)
    data_dir: str = ""  # upstream layout root (tooluse/science) or the JSONL file/folder
    split: str = "train"
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of failing on the first
    thinking_format: bool = False  # science: <think>-style demonstrations for thinking models
    keep_system: bool = False  # science train: keep the system turn (official code) or drop it (recipe)
    offline_seed: int = 0  # offline tasks: generator seed
    offline_num_train: int = 64  # offline tasks: facts to learn

    def __post_init__(self):
        if self.task in ("tooluse", "science", "jsonl") and not self.data_dir:
            raise ValueError(f"data_dir is required for task {self.task!r} (the folder holding {self.task}_data/)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSection:
    samples_per_prompt: int = 1  # completions sampled per problem
    temperature: float = 1.0  # on-policy sampling of the student (spec: 1.0)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256  # completion length limit (paper 1024, recipe 2048)

    def __post_init__(self):
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    learning_rate: float = 2e-5  # 2e-5 full fine-tuning; 5e-4 to 1e-3 LoRA
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine decays to 0 over train.steps
    warmup_ratio: float = 0.1  # linear warmup over this fraction of train.steps
    b1: float = 0.9  # AdamW betas (recipe: b2 0.95)
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # global-norm clipping; <= 0 disables


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    steps: int = 100  # optimizer steps (also the cosine schedule's length)
    prompts_per_step: int = 32  # problems per step over all hosts (paper 32, recipe 128)
    nonfinite: Literal["skip", "stop"] = "skip"  # non-finite loss: skip the update (counted) or stop the run
    log_every: int = 1  # steps between metric rows

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        _check_choice(self, "nonfinite")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection:
    tasks: str = ""  # comma-separated eval tasks (tooluse, science, capitals, elements, probe); empty = none
    every: int = 0  # steps between evaluations (0 = only at the start and the end)
    at_start: bool = True  # evaluate the initial model too
    limit: int = 0  # items per task (0 = all)
    max_new_tokens: int = 0  # 0 = the task's default (tool use 1024, science 2048, offline 32)
    batch_size: int = 16  # prompts decoded together

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = 50  # steps between checkpoints (the final step is always saved)
    keep: int = 2  # newest checkpoints kept
    async_save: bool = True  # write while training continues


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    data: int = -1  # batch split (pure data parallel); -1 = all remaining devices
    fsdp: int = 1  # batch split + parameters / optimizer / teacher sharded over `embed`
    tensor: int = 1  # heads, MLP and vocab dimensions split (tensor parallel)

    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    method: Literal["sdft", "sft"] = "sdft"  # self-distillation, or the supervised baseline
    seed: int = 0  # data order, rollout sampling and LoRA init
    run_dir: str = "runs/default"  # local path or gs://; a run restarted here resumes
    init_from: str = ""  # HF directory to start from (e.g. a previous run's export/) with a fresh optimizer
    teacher_init_from: str = ""  # HF directory whose weights start the teacher (default: the student's start); full FT only
    export: bool = True  # write the final student as an HF directory (LoRA merged)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    prompts: PromptConfig = PromptConfig()
    rollout: RolloutSection = RolloutSection()
    loss: LossConfig = LossConfig()
    teacher: TeacherConfig = TeacherConfig()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        _check_choice(self, "method")
        if self.method == "sft" and self.loss.name != "sft":
            raise ValueError("method 'sft' needs loss.name = 'sft'")
        if self.method == "sdft" and self.loss.name == "sft":
            raise ValueError("method 'sdft' needs a distillation loss (loss.name != 'sft')")
        if self.teacher_init_from and (self.method == "sft" or self.model.lora_rank):
            raise ValueError("teacher_init_from needs method 'sdft' with full fine-tuning (model.lora_rank = 0): "
                             "SFT has no teacher, and with LoRA the teacher shares the student's frozen base")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


def _build(cls, raw: Any, path: str):
    """Builds dataclass `cls` from a ConfigDict/dict at `path`, naming the key in every error."""
    if isinstance(raw, ml_collections.ConfigDict):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a section (ConfigDict), got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {path}.{unknown[0]} (valid keys of {path}: {', '.join(sorted(fields))})")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{path}.{name}")
            continue
        values[name] = _coerce(value, hint, f"{path}.{name}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        message = str(e)
        for name in fields:
            if message.startswith(f"{cls.__name__}.{name}") or message.startswith(name):
                raise ConfigError(f"{path}.{name}: {message}") from None
        raise ConfigError(f"{path}: {message}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks a leaf value against its annotation (tuples from lists, ints accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def load_train_config(cfg: ml_collections.ConfigDict | dict) -> TrainConfig:
    """Validates a config file's ConfigDict into a TrainConfig (raises ConfigError naming the key)."""
    return _build(TrainConfig, cfg, "config")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain-data view (for logging the resolved config into the run directory)."""
    return dataclasses.asdict(cfg)


def _section_dict(obj) -> ml_collections.ConfigDict:
    hints = typing.get_type_hints(type(obj))
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _section_dict(value)
        elif value is None:
            # Typed placeholders keep `--config.section.key=VALUE` overrides possible for unset keys.
            types = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
            out[f.name] = ml_collections.config_dict.placeholder(types[0] if types else str)
        elif isinstance(value, tuple):
            out[f.name] = ",".join(str(v) for v in value)
        else:
            out[f.name] = value
    return out


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default (see the dataclasses above for what each means); config files start here."""
    return _section_dict(TrainConfig())
