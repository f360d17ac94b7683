"""The continual-learning experiment as data: which runs exist and the trainer config of each.

Spec section 8. For every method x learning rate x seed:
    stage 1: from the base model, train on task A;
    stage 2: from where stage 1 ended (fresh optimizer), train on task B;
and after each stage evaluate task A, task B and the probe tasks (what the base model already knew).
The base model is evaluated once on the same tasks. A run's directory is
`<out_dir>/<method>_lr<lr>_seed<seed>/stage<1|2>`; the base evaluation lives in `<out_dir>/base/`.

Stage 2 continues stage 1 as the recipe does. With full fine-tuning it starts from stage 1's exported
weights; with LoRA the same adapters keep training on the unchanged base (from stage 1's last
checkpoint, `init_adapters_from`), nothing merged. Its teacher (`stage2_teacher`, SDFT methods) is
`stage1`, the student as stage 2 starts, or `base`, the original base model: with full fine-tuning a
copy of the base weights (`teacher_init_from`), with LoRA the student's own frozen base with the
adapters off (`teacher.source = "base"`, a static teacher).

`per_method` holds trainer keys that differ by method, e.g. the recipe's SFT keeps the science system
prompt and its SDFT does not: `per_method = {"sft": {"data": {"keep_system": True}}}`.

A sweep: `method_learning_rates` gives a method its own grid (`{"sft": "5e-6,1.5e-5,5e-5"}`; a method
not named there uses `learning_rates`), and `repeat_lr` + `repeat_seeds` repeat one learning rate of a
method with more seeds (`repeat_lr = {"sft": 1.5e-5}`, `repeat_seeds = "1,2"`; 0 = no repeat), after
the grid: the run-to-run noise of the chosen setting, without repeating the whole grid.
`diagnose_teacher`: before stage 2 of an SDFT cell, evaluate task B with the demonstration in the prompt,
with the stage-1 student (stage 2's teacher as it starts) and, once, with the base model
(`continual/teacher_eval.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from typing import Any, Literal

import ml_collections

from sdft_jax.config import TASKS, ConfigError, TrainConfig, load_train_config, task_splits
from sdft_jax.validation import check_bool, check_choice, check_int

# method -> (trainer method, loss name)
METHODS: dict[str, tuple[str, str]] = {
    "sft": ("sft", "sft"),
    "sdft_topk": ("sdft", "topk"),
    "sdft_full_kl": ("sdft", "full_kl"),
    "sdft_reverse": ("sdft", "reverse_topk"),
    "sdft_is": ("sdft", "importance_sampling"),
}
Stage2Teacher = Literal["stage1", "base"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """One stage of one (method, learning rate, seed) cell of the grid."""

    method: str
    learning_rate: float
    seed: int
    stage: int  # 1 or 2
    config: TrainConfig

    @property
    def name(self) -> str:
        return run_name(self.method, self.learning_rate, self.seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    out_dir: str
    task_a: str
    task_b: str
    probe_tasks: tuple[str, ...]
    base_config: TrainConfig  # the shared settings; evaluates the base model
    runs: tuple[Run, ...]  # stage 1 of a cell always precedes its stage 2
    diagnose_teacher: bool = False  # teacher-with-demonstration accuracy on task B at stage 2's start

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        return (self.task_a, self.task_b, *self.probe_tasks)

    @property
    def base_dir(self) -> str:
        return os.path.join(self.out_dir, "base")


def run_name(method: str, learning_rate: float, seed: int) -> str:
    return f"{method}_lr{learning_rate:g}_seed{seed}"


def diverged_path(stage_dir: str) -> str:
    """The record of a stage that diverged (`trainer.DivergedError`): the runner writes it and goes on with
    the other cells; the stage (and a stage 2 after it) is then skipped. Delete it to try the stage again."""
    return os.path.join(stage_dir, "diverged.json")


def teacher_eval_dir(stage_dir: str) -> str:
    """Where the teacher-with-demonstration evaluations of `diagnose_teacher` live: under the base
    directory (the base model as teacher) or a cell's stage-2 directory (the stage-1 student as teacher)."""
    return os.path.join(stage_dir, "teacher_eval")


def _split(value: Any, key: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        items = [str(value)]
    items = [v for v in items if v]
    if len(set(items)) != len(items):
        raise ConfigError(f"config.{key} lists a value twice: {value!r}")
    return items


def _numbers(value: Any, key: str, kind: type) -> list:
    out = []
    for item in _split(value, key):
        try:
            number = kind(item)
        except ValueError:
            raise ConfigError(f"config.{key}: {item!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not number > 0:
            raise ConfigError(f"config.{key}: learning rates must be > 0, got {item}")
        out.append(number)
    if not out:
        raise ConfigError(f"config.{key} is empty")
    return out


_KEYS = {"out_dir", "task_a", "task_b", "probe_tasks", "methods", "learning_rates", "seeds", "stage2_teacher",
         "stage2_steps", "compilation_cache", "per_method", "method_learning_rates", "repeat_lr", "repeat_seeds",
         "diagnose_teacher", "train"}
_OPTIONAL_KEYS = {"per_method", "method_learning_rates", "repeat_lr", "repeat_seeds", "diagnose_teacher"}


def _by_method(raw: Any, key: str) -> dict[str, Any]:
    """A method -> value mapping (`method_learning_rates`, `repeat_lr`), its methods checked."""
    if isinstance(raw, ml_collections.ConfigDict):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"config.{key} must map methods to values, got {raw!r}")
    for method in raw:
        if method not in METHODS:
            raise ConfigError(f"config.{key}: unknown method {method!r} (choose from {', '.join(METHODS)})")
    return raw


def _cells(raw: dict, methods: list[str]) -> list[tuple[str, float, int]]:
    """(method, learning rate, seed) of every cell: each method's grid x seeds, then the repeats."""
    lrs = _numbers(raw["learning_rates"], "learning_rates", float)
    seeds = _numbers(raw["seeds"], "seeds", int)
    grids = {}
    for method, value in _by_method(raw.get("method_learning_rates", {}), "method_learning_rates").items():
        if str(value).strip():
            grids[method] = _numbers(value, f"method_learning_rates.{method}", float)
    cells = [(m, lr, s) for m in methods for lr in grids.get(m, lrs) for s in seeds]
    repeats = {m: v for m, v in _by_method(raw.get("repeat_lr", {}), "repeat_lr").items() if v not in (0, "0", "")}
    if not repeats:
        return cells
    extra = [s for s in _numbers(raw.get("repeat_seeds", ""), "repeat_seeds", int) if s not in seeds]
    repeat_lrs = {}
    for method, value in repeats.items():
        try:
            repeat_lrs[method] = lr = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config.repeat_lr.{method}: {value!r} is not a number") from None
        grid = grids.get(method, lrs)
        if lr not in grid:
            raise ConfigError(f"config.repeat_lr.{method} = {lr:g} is not one of {method}'s learning rates "
                              f"({', '.join(f'{x:g}' for x in grid)})")
    return cells + [(m, repeat_lrs[m], s) for m in methods if m in repeat_lrs for s in extra]


def _per_method(raw: Any, train: dict) -> dict[str, dict]:
    """The `per_method` overrides, checked: known methods, and only keys that `train` has."""
    if isinstance(raw, ml_collections.ConfigDict):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"config.per_method must map methods to trainer keys, got {raw!r}")

    def check(override: Any, like: Any, key: str) -> None:
        if not isinstance(override, dict):
            return
        if not isinstance(like, dict):
            raise ConfigError(f"{key} is not a section of config.train")
        for name, value in override.items():
            if name not in like:
                raise ConfigError(f"unknown config key {key}.{name} (config.train has no such key)")
            check(value, like[name], f"{key}.{name}")

    for method, override in raw.items():
        if method not in METHODS:
            raise ConfigError(f"config.per_method: unknown method {method!r} (choose from {', '.join(METHODS)})")
        check(override, train, f"config.per_method.{method}")
    return raw


def _merged(base: dict, override: dict) -> dict:
    """`base` with `override`'s keys set, section by section."""
    out = copy.deepcopy(base)
    for name, value in override.items():
        out[name] = _merged(out.get(name, {}), value) if isinstance(value, dict) else value
    return out


def make_plan(c: ml_collections.ConfigDict | dict) -> Plan:
    """Validates the experiment config (see configs/continual.py) and builds every run's TrainConfig.

    Raises ConfigError naming the key for unknown keys, unknown methods, bad numbers or a trainer
    setting that fails validation (reported as `config.train.<key>`).
    """
    raw = c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown config key config.{unknown[0]} (valid keys: {', '.join(sorted(_KEYS))})")
    missing = sorted(_KEYS - set(raw) - _OPTIONAL_KEYS)
    if missing:
        raise ConfigError(f"missing config key config.{missing[0]}")
    methods = _split(raw["methods"], "methods")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"config.methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
    if not methods:
        raise ConfigError("config.methods is empty")
    cells = _cells(raw, methods)
    task_a, task_b = str(raw["task_a"]), str(raw["task_b"])
    probes = tuple(_split(raw["probe_tasks"], "probe_tasks"))
    for key, task in (("task_a", task_a), ("task_b", task_b), *(("probe_tasks", p) for p in probes)):
        usable = [t for t in TASKS if {"train", "eval"} <= set(task_splits(t)) or key == "probe_tasks"]
        if task not in usable:
            raise ConfigError(f"config.{key}: unknown task {task!r} (choose from {', '.join(usable)})")
    if task_a == task_b or {task_a, task_b} & set(probes):
        raise ConfigError(f"config.task_a, task_b and probe_tasks must be different tasks, got "
                          f"{task_a!r}, {task_b!r}, {probes}")
    try:
        teacher = check_choice("config.stage2_teacher", raw["stage2_teacher"], typing.get_args(Stage2Teacher))
        stage2_steps = check_int("config.stage2_steps", raw["stage2_steps"], minimum=0, hint="0 = train.steps")
        check_bool("config.compilation_cache", raw["compilation_cache"])
        diagnose = check_bool("config.diagnose_teacher", raw.get("diagnose_teacher", False))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out_dir = raw["out_dir"]
    if not isinstance(out_dir, str) or not out_dir:
        raise ConfigError(f"config.out_dir must be a directory (local path or gs://), got {out_dir!r}")
    train = dict(raw["train"])
    base = copy.deepcopy(train)
    base.setdefault("eval", {})["tasks"] = ",".join((task_a, task_b, *probes))
    base["run_dir"] = os.path.join(out_dir, "base")
    base_config = _validated(base)  # the shared settings: every stage's config differs from it in a few keys
    base_model = base_config.init_from or base_config.model.name
    lora = bool(base_config.model.lora.rank)
    if base_config.teacher.source != "student":
        raise ConfigError(f"config.train.teacher.source = {base_config.teacher.source!r}: a continual plan sets stage "
                          "2's teacher from config.stage2_teacher; leave it 'student'")
    per_method = _per_method(raw.get("per_method", {}), train)

    def stage_config(method: str, lr: float, seed: int, stage: int) -> TrainConfig:
        trainer_method, loss = METHODS[method]
        d = _merged(train, per_method.get(method, {}))
        cell = os.path.join(out_dir, run_name(method, lr, seed))
        d.update(method=trainer_method, seed=seed, run_dir=os.path.join(cell, f"stage{stage}"), export=True)
        d.setdefault("loss", {})["name"] = loss
        d.setdefault("optim", {})["learning_rate"] = lr
        d.setdefault("data", {})["task"] = task_a if stage == 1 else task_b
        d.setdefault("eval", {}).update(tasks=",".join((task_a, task_b, *probes)), at_start=False, every=0)
        if stage == 2:
            if lora:  # the same adapters keep training on the unchanged base
                d["init_adapters_from"] = os.path.join(cell, "stage1")
            else:
                d["init_from"] = os.path.join(cell, "stage1", "export")
            if stage2_steps:
                d.setdefault("train", {}).update(steps=stage2_steps, epochs=0.0)
            if teacher == "base" and trainer_method == "sdft":
                if lora:
                    mode = _validated(d).teacher.mode
                    if mode != "static":
                        raise ConfigError(
                            f"config.stage2_teacher = 'base' with LoRA makes stage 2's teacher the base model with the "
                            f"adapters off, a static teacher: set config.train.teacher.mode = 'static' (got {mode!r})")
                    d.setdefault("teacher", {})["source"] = "base"
                else:
                    d["teacher_init_from"] = base_model
        return _validated(d)

    runs = [Run(method=method, learning_rate=lr, seed=seed, stage=s, config=stage_config(method, lr, seed, s))
            for method, lr, seed in cells for s in (1, 2)]
    return Plan(out_dir=out_dir, task_a=task_a, task_b=task_b, probe_tasks=probes, base_config=base_config,
                runs=tuple(runs), diagnose_teacher=diagnose)


def _validated(d: dict) -> TrainConfig:
    try:
        return load_train_config(d)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.", "config.train.", 1)) from None
