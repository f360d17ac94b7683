"""The trainer's configuration: typed sections built from an ml_collections ConfigDict.

A section is the library's own config class where the part has one (`optim` is an `OptimConfig`,
`loss` a `LossConfig`, `rollout` a `SamplingConfig` plus the samples per prompt, `model.lora` a
`LoraConfig` whose rank 0 means full fine-tuning, ...), so that every setting has one name and one
check. The run's own settings (data, train, eval, checkpoint, mesh) are sections declared here.

Config files under `configs/` return a ConfigDict (data, with a comment per key); `load_train_config`
checks it against these dataclasses before anything is compiled: an unknown key, a missing section, an
invalid value or a rule between sections (`TrainConfig.__post_init__`) fails with a message naming the
key (e.g. `config.loss.top_k`).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import re
import typing
from typing import Any, Literal, TypeVar

import ml_collections

from sdft_jax.data import offline_tasks, readers
from sdft_jax.data.prompts import PromptConfig
from sdft_jax.distill.head_grad import BLOCKED_LOSSES
from sdft_jax.distill.losses import LossConfig
from sdft_jax.distill.teacher import TeacherConfig
from sdft_jax.distill.train_state import OptimConfig
from sdft_jax.distributed import DistributedConfig
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.fused_attention import Implementation
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK
from sdft_jax.sampling.rollout_weights import RolloutWeightsConfig
from sdft_jax.sampling.sampler import SamplingConfig
from sdft_jax.validation import check_bool, check_choice, check_int, check_literals, check_number

_Config = TypeVar("_Config")

# Every task a run can read or generate: the upstream / JSONL ones (a data_dir), then the offline ones.
TASKS = (*readers.TASKS, *offline_tasks.TASK_NAMES)


def task_splits(task: str) -> tuple[str, ...]:
    """The splits `task` has."""
    if task in offline_tasks.TASK_NAMES:
        return offline_tasks.SPLITS
    return ("eval",) if task == "tooluse_json" else readers.SPLITS


def _reads_data_dir(task: str) -> bool:
    return task not in offline_tasks.TASK_NAMES


def _as(obj: Any, cls: type[_Config], **changes: Any) -> _Config:
    """A plain `cls` (a dataclass that `obj`'s class extends) holding `obj`'s values of its fields."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **changes})


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSection(LoraConfig):
    """The trained model's adapters: `LoraConfig`'s fields, where rank 0 (the default) means full
    fine-tuning, every weight trained and no adapters."""

    rank: int = 0

    def __post_init__(self):
        check_int("LoraSection.rank", self.rank, minimum=0, hint="0 = full fine-tuning")
        # alpha and targets are checked while unused too: a typo shows before LoRA is switched on.
        _as(self, LoraConfig, rank=max(self.rank, 1))

    def adapters(self) -> LoraConfig | None:
        """The model's `LoraConfig`, or None for full fine-tuning."""
        return _as(self, LoraConfig) if self.rank else None

    @property
    def scale(self) -> float:
        """`LoraConfig.scale`; refused at rank 0, where there are no adapters (pass `adapters()` on)."""
        if not self.rank:
            raise ValueError("LoraSection.rank is 0 (full fine-tuning): no adapters, no scale; use adapters()")
        return super().scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    name: str = "smollm2-135m"  # registered name or HF directory
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage of frozen weights (trainable ones are fp32 masters)
    remat: Literal["none", "full", "dots"] = "full"
    query_block: int = DEFAULT_QUERY_BLOCK  # queries per attention block in training forwards (0 = one block)
    # Kernel of the uncached attention and the prefill (models/fused_attention.py): auto = cudnn on GPU
    # (bfloat16 dtype), splash on TPU, plain on CPU; or plain | xla | cudnn | splash
    attention: Implementation = "auto"
    lora: LoraSection = LoraSection()  # lora.rank 0 = full fine-tuning
    train_router: bool = False  # full fine-tuning of a MoE model: train the routers too (frozen by default)

    def __post_init__(self):
        check_literals(self)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSection.name must name a model (registered name or HF directory), got {self.name!r}")
        check_int("ModelSection.query_block", self.query_block, minimum=0, hint="0 = one block")
        check_bool("ModelSection.train_router", self.train_router)
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ValueError(f"ModelSection.attention 'cudnn' runs bf16 only: set model.dtype to bfloat16 (it is "
                             f"{self.dtype!r}), or use 'auto' / 'xla'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    task: str = "capitals"  # tooluse | science | jsonl | dataset | an offline task (capitals, elements)
    # upstream layout root (tooluse/science), the JSONL file/folder (jsonl), or for `dataset`: a save_to_disk
    # folder, a .jsonl/.json/.parquet file (or a folder of {split}.*), or a dataset name in the local cache
    data_dir: str = ""
    split: str = "train"
    columns: readers.Columns = readers.Columns()  # jsonl / dataset: the columns of question, demonstration, ...
    # the training split read as a stream, never held whole (data/stream.py: window-shuffled, read again each
    # epoch and on resume; train.steps, not epochs); `dataset` also writes no Arrow copy into the datasets cache
    streaming: bool = False
    shuffle_window: int = 10_000  # streaming: items shuffled together (1 = the file's order)
    eval_split: str = "test"  # dataset: what the "eval" split is called in a DatasetDict / cached dataset
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of failing on the first
    thinking_format: bool = False  # science: <think>-style demonstrations for thinking models
    keep_system: bool = False  # science train: keep the system turn (official code) or drop it (recipe)
    offline_seed: int = 0  # offline tasks: generator seed
    offline_num_train: int = 64  # offline tasks: facts to learn

    def __post_init__(self):
        for name in ("skip_bad_rows", "thinking_format", "keep_system", "streaming"):
            check_bool(f"DataSection.{name}", getattr(self, name))
        if not isinstance(self.eval_split, str) or not self.eval_split:
            raise ValueError(f"DataSection.eval_split must name a split, got {self.eval_split!r}")
        check_int("DataSection.offline_seed", self.offline_seed)
        check_int("DataSection.shuffle_window", self.shuffle_window, minimum=1, hint="1 = the file's order")
        check_int("DataSection.offline_num_train", self.offline_num_train, minimum=0)
        check_choice("DataSection.task", self.task, TASKS)
        check_choice("DataSection.split", self.split, task_splits(self.task))
        if _reads_data_dir(self.task) and not self.data_dir:
            where = {"jsonl": "the JSONL file", "dataset": "a file, save_to_disk folder or cached dataset name"}.get(
                self.task, f"the folder holding {self.task.removesuffix('_json')}_data/")
            raise ValueError(f"data_dir is required for task {self.task!r} ({where})")
        if self.task in ("capitals", "elements") and self.split == "train" and not self.offline_num_train:
            raise ValueError(f"DataSection.offline_num_train must be >= 1 to train on task {self.task!r} "
                             "(it is the number of facts to learn), got 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig(SamplingConfig):
    """How the student's completions are sampled: `SamplingConfig`'s fields (temperature, top_p, top_k,
    the completion length limit `max_new_tokens`, the shape buckets) and the completions per prompt.
    The spec samples at temperature 1.0; the paper's completions are up to 1024 tokens, the recipe's 2048."""

    samples_per_prompt: int = 1
    # Rows (prompts x samples) decoded together by one sampler call; a step's rows run as several calls.
    # 0 = up to the largest batch bucket at once
    batch_size: int = 0
    # The rollout weights, made from the student's once per step (sampling/rollout_weights.py): their dtype,
    # also the rollout's compute dtype (auto = bfloat16 on accelerators, float32 on CPU)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Overrides of their sharding rules (ROLLOUT_RULES: whole over data / fsdp, split over tensor / expert),
    # each "logical=mesh_axis" ("+" joins mesh axes; nothing after "=" = replicated), e.g. "embed=fsdp"
    sharding: tuple[str, ...] = ()
    # "static": each sampler call decodes its batch until its longest row ends; "continuous": a pool of
    # `slots` rows, a finished row's slot refilled with the next prompt (sampling/continuous.py). Same
    # tokens for the same key; continuous wins when completion lengths vary (docs/benchmarks.md)
    mode: Literal["static", "continuous"] = "static"
    # Continuous mode's decode rows; 0 = batch_size, or the largest batch bucket
    slots: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("RolloutConfig.samples_per_prompt", self.samples_per_prompt, minimum=1)
        check_int("RolloutConfig.batch_size", self.batch_size, minimum=0, hint="0 = the largest batch bucket")
        check_choice("RolloutConfig.mode", self.mode, ("static", "continuous"))
        check_int("RolloutConfig.slots", self.slots, minimum=0, hint="0 = batch_size, or the largest batch bucket")
        self.weights()

    def decode_slots(self) -> int:
        """Continuous mode's pool size: `slots`, else `batch_size`, else the largest batch bucket."""
        return self.slots or self.batch_size or self.batch_buckets[-1]

    def weights(self) -> RolloutWeightsConfig:
        """The sampler's rollout weights settings (`dtype`, `sharding`; the implementation by platform)."""
        return RolloutWeightsConfig(dtype=self.dtype, sharding=self.sharding)

    def sampling(self) -> SamplingConfig:
        """What the sampler takes: this section without `samples_per_prompt`, and `batch_size` as the
        largest batch bucket (the sampler runs larger batches in parts of that size)."""
        if not self.batch_size:
            return _as(self, SamplingConfig)
        buckets = (*(b for b in self.batch_buckets if b < self.batch_size), self.batch_size)
        return _as(self, SamplingConfig, batch_buckets=buckets)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    steps: int = 100  # optimizer steps (also the learning-rate schedule's length); 0 = from epochs
    # > 0: passes over the training items; steps = ceil(epochs x items / prompts_per_step). With steps > 0
    # too, the two must give the same count (checked once the data is loaded)
    epochs: float = 0.0
    prompts_per_step: int = 32  # problems per step over all hosts (paper 32, recipe 128)
    # A step with a non-finite loss or gradient skips its update (counted); more consecutive such steps
    # than this stop the run (`trainer.DivergedError`, no export). 0 = stop at the first
    max_nonfinite_steps: int = 3
    log_every: int = 1  # steps between metric rows
    # Rows (prompts x samples) per micro-batch: the train step runs teacher and student forward/backward on
    # one micro-batch at a time and sums the gradients (the whole batch's step, in less memory). Must
    # divide the step's rows and split over the mesh's batch shards. 0 = the whole batch at once
    micro_batch_size: int = 0

    def __post_init__(self):
        for name in ("prompts_per_step", "log_every"):
            check_int(f"TrainSection.{name}", getattr(self, name), minimum=1)
        check_int("TrainSection.micro_batch_size", self.micro_batch_size, minimum=0, hint="0 = the whole batch")
        check_int("TrainSection.steps", self.steps, minimum=0, hint="0 = from epochs")
        check_int("TrainSection.max_nonfinite_steps", self.max_nonfinite_steps, minimum=0)
        check_number("TrainSection.epochs", self.epochs, low=0.0)
        if not self.steps and not self.epochs:
            raise ValueError("TrainSection.steps is 0 and epochs is 0: set one of them")
        check_literals(self)

    def steps_for(self, num_items: int) -> int:
        """The run's optimizer steps for `num_items` training items: `steps`, or the count `epochs` gives,
        rounded up as HF's Trainer does (batches run on across epochs: a last step short of items takes
        its rest from the next epoch's order)."""
        if not self.epochs:
            return self.steps
        # exact decimal arithmetic: 0.1 epochs of 30 items at 3 per step is 1 step, not 1.0000000000000002
        from_epochs = max(1, math.ceil(fractions.Fraction(repr(self.epochs)) * num_items / self.prompts_per_step))
        if self.steps and self.steps != from_epochs:
            raise ConfigError(f"config.train.epochs = {self.epochs:g} gives {from_epochs} steps for {num_items} items "
                              f"at {self.prompts_per_step} prompts per step, but config.train.steps = {self.steps}: "
                              "set train.steps = 0 (or to that count)")
        return from_epochs


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection:
    tasks: str = ""  # comma-separated eval tasks (tooluse, science, capitals, elements, probe); empty = none
    every: int = 0  # steps between evaluations (0 = only at the start and the end)
    at_start: bool = True  # evaluate the initial model too
    limit: int = 0  # items per task (0 = all)
    max_new_tokens: int = 0  # 0 = the task's default (tool use 1024, science 2048, offline 32)
    batch_size: int = 16  # prompts decoded together
    # "project": the project's scorers (eval/scorers.py); "recipe": the hosted recipe's, quirks included
    # (eval/recipe_scorers.py; docs/scoring.md lists the differences)
    scoring: Literal["project", "recipe"] = "project"

    def __post_init__(self):
        for name in ("every", "limit", "max_new_tokens"):
            check_int(f"EvalSection.{name}", getattr(self, name), minimum=0)
        check_int("EvalSection.batch_size", self.batch_size, minimum=1)
        check_bool("EvalSection.at_start", self.at_start)
        check_literals(self)
        if not isinstance(self.tasks, str):
            raise ValueError(f"EvalSection.tasks must be a comma-separated string of tasks, got {self.tasks!r}")
        names = self.task_list()
        for name in names:
            check_choice("EvalSection.tasks", name, [t for t in TASKS if "eval" in task_splits(t)])
        if len(set(names)) != len(names):
            raise ValueError(f"EvalSection.tasks names a task twice: {self.tasks!r}")

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = 50  # steps between checkpoints (the final step is always saved)
    keep: int = 2  # newest checkpoints kept
    async_save: bool = True  # write while training continues

    def __post_init__(self):
        check_int("CheckpointSection.every", self.every, minimum=1)
        check_int("CheckpointSection.keep", self.keep, minimum=1)
        check_bool("CheckpointSection.async_save", self.async_save)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    """Device mesh sizes; one of them may be -1, all the devices the others leave."""

    data: int = -1  # batch split (pure data parallel)
    fsdp: int = 1  # batch split + parameters / optimizer / teacher sharded over `embed`
    expert: int = 1  # batch split + a MoE model's experts split (expert parallel); must divide num_experts
    tensor: int = 1  # heads, MLP and vocab dimensions split (tensor parallel)

    def __post_init__(self):
        for name, size in self.shape().items():
            if size != -1:
                check_int(f"MeshSection.{name}", size, minimum=1, hint="or -1 = all remaining devices")
        if list(self.shape().values()).count(-1) > 1:
            raise ValueError(f"MeshSection: at most one size may be -1, got {self.shape()}")

    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run: its own settings, then one section per part (the part's own config class)."""

    method: Literal["sdft", "sft"] = "sdft"  # self-distillation, or the supervised baseline
    seed: int = 0  # data order, rollout sampling and LoRA init
    run_dir: str = "runs/default"  # local path or gs://; a run restarted here resumes
    init_from: str = ""  # HF directory to start from (e.g. a previous run's export/) with a fresh optimizer
    # LoRA: a previous LoRA run's directory whose last checkpoint's adapters start this run's (same rank and
    # targets; on the base model of init_from / model.name; fresh optimizer)
    init_adapters_from: str = ""
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    prompts: PromptConfig = PromptConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    # HF directory whose weights start the teacher (default: the student's start); full fine-tuning only
    teacher_init_from: str = ""
    teacher: TeacherConfig = TeacherConfig()
    optim: OptimConfig = OptimConfig()  # its schedule runs over train.steps
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    export: bool = True  # write the final student as an HF directory (LoRA merged)
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        check_literals(self)
        check_int("TrainConfig.seed", self.seed, minimum=0, maximum=2**32 - 1, hint="the data shuffle's seed range")
        check_bool("TrainConfig.export", self.export)
        if not self.run_dir:
            raise ValueError("TrainConfig.run_dir must be a directory (local path or gs://), got ''")
        self._check_loss_fits_method()
        self._check_eval_data()
        self._check_teacher_start()
        self._check_vocab_split()
        self._check_prompt_buckets()
        self._check_batch_split()
        if self.data.streaming and self.train.epochs:
            raise _rule_error("train.epochs", self.train.epochs,
                              "a streamed split (data.streaming) has no known size to count epochs in: set "
                              "train.steps (and train.epochs = 0)")

    def _check_loss_fits_method(self) -> None:
        if self.method == "sft" and self.loss.name != "sft":
            raise _rule_error("loss.name", self.loss.name, "method 'sft' needs loss.name = 'sft'")
        if self.method == "sdft" and self.loss.name == "sft":
            raise _rule_error("loss.name", self.loss.name,
                              "method 'sdft' needs a distillation loss (loss.name != 'sft')")

    def _check_eval_data(self) -> None:
        needs_data = [t for t in self.eval.task_list() if _reads_data_dir(t)]
        if needs_data and not self.data.data_dir:
            raise _rule_error("data.data_dir", self.data.data_dir, f"required by eval.tasks = {self.eval.tasks!r}: "
                              f"task {needs_data[0]!r} reads its eval split from there")

    def _check_teacher_start(self) -> None:
        if self.teacher_init_from and (self.method == "sft" or self.model.lora.rank):
            raise _rule_error("teacher_init_from", self.teacher_init_from,
                              "teacher_init_from needs method 'sdft' with full fine-tuning (model.lora.rank = 0): "
                              "SFT has no teacher, and with LoRA the teacher shares the student's frozen base "
                              "(teacher.source = 'base' makes that base alone the teacher)")
        if self.teacher.source == "base" and not self.model.lora.rank:
            raise _rule_error("teacher.source", self.teacher.source,
                              "teacher.source 'base' (the base model, adapters off) needs LoRA (model.lora.rank > 0); "
                              "with full fine-tuning set teacher_init_from to the base model")
        if self.init_adapters_from and not self.model.lora.rank:
            raise _rule_error("init_adapters_from", self.init_adapters_from,
                              "init_adapters_from needs LoRA (model.lora.rank > 0): it starts this run's adapters")

    def _check_vocab_split(self) -> None:
        # -1 gives the tensor axis every device the others leave: a split on any mesh of several devices.
        if self.loss.vocab_chunk_size > 0 and self.loss.name in BLOCKED_LOSSES and self.mesh.tensor != 1:
            raise _rule_error("loss.vocab_chunk_size", self.loss.vocab_chunk_size,
                              f"must be 0 when the vocabulary is split over the tensor mesh axis (mesh.tensor = "
                              f"{self.mesh.tensor}): each vocabulary block of the LM head's backward would "
                              "gather its slice of the head")

    def _check_prompt_buckets(self) -> None:
        if self.method == "sdft" and self.rollout.prompt_buckets[-1] < self.prompts.max_prompt_tokens:
            raise _rule_error("rollout.prompt_buckets", self.rollout.prompt_buckets,
                              f"the largest bucket must hold prompts.max_prompt_tokens = "
                              f"{self.prompts.max_prompt_tokens} (the sampler refuses longer prompts)")

    def _check_batch_split(self) -> None:
        # the batch axes (sharding.DEFAULT_RULES); unknown while one of them is -1
        shards = self.mesh.data * self.mesh.fsdp * self.mesh.expert
        samples = self.rollout.samples_per_prompt if self.method == "sdft" else 1
        rows = self.train.prompts_per_step * samples
        if shards > 0 and rows % shards:
            raise _rule_error("train.prompts_per_step", self.train.prompts_per_step,
                              f"{rows} batch rows per step ({samples} per prompt) do not split over the "
                              f"mesh.data x mesh.fsdp x mesh.expert = {shards} batch shards")
        micro = self.train.micro_batch_size
        if micro and rows % micro:
            raise _rule_error("train.micro_batch_size", micro, f"does not divide the {rows} batch rows per step "
                              f"(train.prompts_per_step x {samples} per prompt)")
        if micro and shards > 0 and micro % shards:
            raise _rule_error("train.micro_batch_size", micro, f"a micro-batch's rows do not split over the "
                              f"mesh.data x mesh.fsdp x mesh.expert = {shards} batch shards")
        if self.rollout.batch_size and shards > 0 and self.rollout.batch_size % shards:
            raise _rule_error("rollout.batch_size", self.rollout.batch_size, f"does not split over the "
                              f"mesh.data x mesh.fsdp x mesh.expert = {shards} batch shards (the sampler's batch axes)")


def _rule_error(key: str, value: Any, why: str) -> ValueError:
    """A broken rule between sections, naming the key to change (`config.<key>` once loaded)."""
    return ValueError(f"TrainConfig.{key} = {value!r}: {why}")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


def _build(cls, raw: Any, path: str):
    """Builds dataclass `cls` from a ConfigDict/dict at `path`, naming the key in every error."""
    if isinstance(raw, ml_collections.ConfigDict):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a section (ConfigDict), got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - fields)
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
        key = _named_key(cls, str(e))
        raise ConfigError(f"{path}.{key}: {e}" if key else f"{path}: {e}") from None


# A message's leading name: `LossConfig.top_k`, `TrainConfig.loss.vocab_chunk_size`, or `data_dir`.
_LEADING_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _named_key(cls, message: str) -> str:
    """The key below dataclass `cls` that a validation message starts with ('' if it names none)."""
    match = _LEADING_NAME.match(message)
    names = match.group().split(".") if match else []
    if len(names) > 1 and names[0] not in {f.name for f in dataclasses.fields(cls)}:
        names = names[1:]  # the prefix is a class name (the section's, or a class it extends)
    key, section = [], cls
    for name in names:
        if not dataclasses.is_dataclass(section) or name not in {f.name for f in dataclasses.fields(section)}:
            break
        key.append(name)
        section = typing.get_type_hints(section)[name]
    return ".".join(key)


# The type checks of plain leaves, before the section's own checks of their values.
_LEAF_CHECKS = {int: check_int, float: check_number, bool: check_bool}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks a leaf value against its annotation (tuples from lists or comma-separated strings, ints
    accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        try:
            return check_choice(key, value, typing.get_args(hint))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if origin is tuple:
        if not isinstance(value, (str, list, tuple)):
            raise ConfigError(f"{key} must be a comma-separated list, got {value!r}")
        items = value.split(",") if isinstance(value, str) else value
        items = [v.strip() if isinstance(v, str) else v for v in items]
        kind = typing.get_args(hint)[0]
        return tuple(_tuple_item(v, kind, key) for v in items if v != "")
    if hint is float and type(value) is int:
        value = float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    try:
        return _LEAF_CHECKS[hint](key, value) if hint in _LEAF_CHECKS else value
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _tuple_item(value: Any, kind: Any, key: str) -> Any:
    if kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key} must be comma-separated integers, got {value!r}") from None
    return value


def load_train_config(cfg: ml_collections.ConfigDict | dict) -> TrainConfig:
    """Validates a config file's ConfigDict into a TrainConfig (raises ConfigError naming the key)."""
    return _build(TrainConfig, cfg, "config")


def resolved_mesh(mesh: MeshSection, num_devices: int, *, prefix: str = "config") -> MeshSection:
    """`mesh` on `num_devices` devices, its -1 size resolved; ConfigError (naming `<prefix>.mesh`) if they do
    not fit."""
    sizes = mesh.shape()
    known = math.prod(size for size in sizes.values() if size != -1)
    free = [name for name, size in sizes.items() if size == -1]
    if free and num_devices % known == 0:
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        needs = f"a multiple of {known} devices" if free else f"{known} devices (one size may be -1: all the rest)"
        raise ConfigError(f"{prefix}.mesh = {mesh.shape()}: needs {needs}, this run has {num_devices}")
    return MeshSection(**sizes)


def check_fit(cfg: TrainConfig, model: ModelConfig, num_devices: int, *, prefix: str = "config") -> None:
    """The rules that need the model's config.json (`model`) and the device count, applied before any
    weight is loaded: the mesh fits the devices (and, its -1 resolved, the batch still splits over it),
    `loss.top_k` is within the vocabulary, `mesh.expert` divides the experts, and
    `prompts.max_prompt_tokens` is within the model's positions. Raises ConfigError naming the key
    (`<prefix>.<key>`: `config.train.<key>` in a continual plan)."""
    mesh = resolved_mesh(cfg.mesh, num_devices, prefix=prefix)
    if mesh != cfg.mesh:
        try:  # the rules between sections again, with the sizes the -1 stood for
            dataclasses.replace(cfg, mesh=mesh)
        except ValueError as e:
            key = _named_key(TrainConfig, str(e))
            raise ConfigError(f"{prefix}.{key}: {e} ({prefix}.mesh = {cfg.mesh.shape()} is {mesh.shape()} on "
                              f"{num_devices} devices)") from None
    if cfg.method == "sdft" and cfg.loss.name in ("topk", "reverse_topk") and cfg.loss.top_k > model.vocab_size:
        raise ConfigError(f"{prefix}.loss.top_k = {cfg.loss.top_k}: above the model's vocabulary of "
                          f"{model.vocab_size} tokens ({cfg.init_from or cfg.model.name})")
    if model.moe is not None and model.moe.num_experts % mesh.expert:
        raise ConfigError(f"{prefix}.mesh.expert = {mesh.expert}: does not divide the model's "
                          f"{model.moe.num_experts} experts")
    if cfg.prompts.max_prompt_tokens > model.max_position_embeddings:
        raise ConfigError(f"{prefix}.prompts.max_prompt_tokens = {cfg.prompts.max_prompt_tokens}: above the model's "
                          f"{model.max_position_embeddings} positions (such a prompt leaves no room for a completion)")


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
