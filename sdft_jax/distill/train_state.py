"""The train state: everything a checkpoint needs, as one pytree.

- `params`: what trains, as an fp32 master copy (all weights but a MoE model's routers, or only the
  LoRA adapters);
- `frozen`: what does not (the LoRA base, possibly bf16; for full fine-tuning the routers, or nothing);
- `opt_state`: optax AdamW state (fp32 moments, since the master params are fp32);
- `teacher`: the teacher's copy of the trainable part (fp32), updated per the teacher mode. With LoRA
  the teacher is the shared frozen base plus these adapters: no second copy of the base (and with zero
  adapters, the base model alone: `with_base_teacher`).
- `step`, `rng`.
The module graph (`graphdef`) is static and lives beside the state, not in it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Int, UInt32

from sdft_jax.distill import teacher as teacher_lib
from sdft_jax.models.transformer import Transformer
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.validation import check_int, check_literals, check_number

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with grad-norm clipping and a constant, warmup+cosine or warmup+linear learning rate (spec
    section 5).

    The schedule's length is the run's number of optimizer steps, given to `schedule_fn` and
    `optimizer` rather than held here, so that a trainer config states it once.

    Attributes:
      learning_rate: the peak rate (> 0); about 2e-5 for full fine-tuning, 5e-4 to 1e-3 with LoRA.
      schedule: `constant`, `cosine` decaying to 0 at the schedule's end (the trainer: `train.steps`), or
        `linear` decaying to 0 at the end (HF's `get_linear_schedule_with_warmup`; the recipe's SFT).
      warmup_ratio: linear warmup from 0 over this fraction of the schedule, in [0, 1).
      b1, b2, eps, weight_decay: AdamW's, in [0, 1), [0, 1), >= 0 and >= 0 (the recipe uses b2 0.95).
      max_grad_norm: global-norm clipping; <= 0 disables it.
    """

    learning_rate: float = 2e-5
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_number("OptimConfig.learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_literals(self)
        for name in ("warmup_ratio", "b1", "b2"):
            check_number(f"OptimConfig.{name}", getattr(self, name), low=0.0, high=1.0, high_open=True)
        for name in ("eps", "weight_decay"):
            check_number(f"OptimConfig.{name}", getattr(self, name), low=0.0)
        check_number("OptimConfig.max_grad_norm", self.max_grad_norm)

    def schedule_fn(self, total_steps: int) -> optax.Schedule:
        """The learning rate by step for a run of `total_steps` optimizer steps."""
        check_int("total_steps", total_steps, minimum=1)
        warmup = int(self.warmup_ratio * total_steps)
        if self.schedule == "constant":
            if warmup == 0:
                return optax.constant_schedule(self.learning_rate)
            return optax.linear_schedule(0.0, self.learning_rate, warmup)
        if self.schedule == "linear":
            decay = optax.linear_schedule(self.learning_rate, 0.0, total_steps - warmup)
            if warmup == 0:
                return decay
            return optax.join_schedules([optax.linear_schedule(0.0, self.learning_rate, warmup), decay], [warmup])
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, warmup, total_steps, end_value=0.0)

    def optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """The optax transformation for a run of `total_steps` optimizer steps."""
        adamw = optax.adamw(self.schedule_fn(total_steps), b1=self.b1, b2=self.b2, eps=self.eps,
                            weight_decay=self.weight_decay)
        if self.max_grad_norm > 0:
            return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw)
        return adamw


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """The fields of the module docstring. A pytree whose rebuilding skips `__init__` (`pytree_dataclass`):
    tree operations also build TrainStates of shardings or abstract shapes."""

    step: Int[Array, ""]  # the optimizer updates done
    params: nnx.State
    frozen: nnx.State
    opt_state: PyTree
    teacher: nnx.State
    rng: UInt32[Array, "..."]  # key data of the run's PRNG key


ROUTER = "router"  # a MoE layer's router weight (`models.moe.param_shapes`)


def trainable_filter(model: Transformer, *, train_router: bool = False) -> nnx.filterlib.Filter:
    """LoRA adapters when the model has them (a router has none: it stays frozen), else every parameter
    but a MoE model's routers unless `train_router`.

    Routers are frozen by default: fine-tuning on a narrow distribution easily unbalances the experts'
    loads, and the experts can adapt to a fixed routing.
    """
    if model.layers.lora is not None:
        return nnx.LoRAParam
    if train_router:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains(ROUTER)))


def split_model(model: Transformer, *, train_router: bool = False) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen) of a model; `nnx.merge(graphdef, trainable, frozen)` rebuilds it."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model, train_router=train_router), ...)
    return graphdef, trainable, frozen


def trains_router(state: TrainState) -> bool:
    """Whether `state` trains a MoE model's routers (full fine-tuning with `train_router`)."""
    return any(ROUTER in path for path, _ in nnx.to_flat_state(state.params))


def _to_f32(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _init_optimizer(tx: optax.GradientTransformation, params: nnx.State) -> optax.OptState:
    """Optimizer state whose per-parameter parts (Adam's moments) are sharded like their parameters."""
    first = jax.tree.leaves(params)[0].sharding
    other = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
             if isinstance(first, jax.sharding.NamedSharding) else first)
    shardings = optax.tree_map_params(
        tx, lambda _, p: p.sharding, jax.eval_shape(tx.init, params), params,
        transform_non_params=lambda _: other)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def init_train_state(
    model: Transformer, optim: OptimConfig, *, seed: int = 0, train_router: bool = False
) -> tuple[nnx.GraphDef, TrainState]:
    """Builds the train state of a (possibly sharded) model; shardings follow the model's arrays.

    `train_router`: in full fine-tuning, train a MoE model's routers too (`trainable_filter`).
    """
    graphdef, trainable, frozen = split_model(model, train_router=train_router)
    params = jax.jit(_to_f32)(trainable)
    # Adam's state (its moments and a step count) does not depend on the schedule's length.
    opt_state = _init_optimizer(optim.optimizer(total_steps=1), params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=opt_state,
        teacher=jax.jit(teacher_lib.init_teacher)(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    # Scalars (step, rng, Adam's count) are created on one device, uncommitted; put them, replicated, on
    # the devices the parameters live on, committed: the step is one program over one device set, and
    # its second call (committed outputs in) reuses the first's compilation instead of compiling again.
    sharding = jax.tree.leaves(params)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        state = jax.tree.map(
            lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding) else jax.device_put(x, replicated), state)
    else:
        state = jax.tree.map(lambda x: x if x.committed else jax.device_put(x, sharding), state)
    return graphdef, state


def abstract_train_state(
    model: Transformer, optim: OptimConfig, *, train_router: bool = False
) -> tuple[nnx.GraphDef, TrainState]:
    """The train state `init_train_state` builds, as shapes and dtypes on one device (a TrainState of
    `jax.ShapeDtypeStruct`s), computing nothing: to lower and compile a step ahead of time (e.g.
    `make_train_step(graphdef, state, cfg).lower(state, batch).compile()`). `model` may be abstract
    itself (`nnx.eval_shape(lambda: Transformer(...))`), so no weight is ever materialised.
    """
    graphdef, trainable, frozen = split_model(model, train_router=train_router)

    def build(trainable: nnx.State, frozen: nnx.State) -> TrainState:
        params = _to_f32(trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                          opt_state=optim.optimizer(total_steps=1).init(params),
                          teacher=teacher_lib.init_teacher(params), rng=jax.random.key_data(jax.random.key(0)))

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(build, trainable, frozen)
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def with_teacher(state: TrainState, model: Transformer) -> TrainState:
    """`state` with its teacher replaced by `model`'s weights (fp32, on the teacher's shardings).

    For a teacher that starts elsewhere than the student (e.g. the original base model in a continual
    experiment's second stage). `model` must have the student's architecture and no LoRA adapters, and
    the state must be a full fine-tuning one (with LoRA the teacher shares the student's frozen base).
    A MoE teacher shares the student's frozen routers too (unless the state trains them), so `model`'s
    routers must equal them.
    """
    if model.layers.lora is not None:
        raise ValueError("with_teacher: the teacher model must not have LoRA adapters")
    _, trainable, frozen = split_model(model, train_router=trains_router(state))
    if jax.tree.structure(trainable) != jax.tree.structure(state.teacher):
        raise ValueError("with_teacher: the state's teacher holds other parameters than the model (a LoRA state "
                         "shares its frozen base with the teacher and cannot take a separate one)")
    for (path, t), new in zip(jax.tree_util.tree_leaves_with_path(state.teacher), jax.tree.leaves(trainable)):
        if t.shape != new.shape:
            raise ValueError(f"with_teacher: {jax.tree_util.keystr(path)} has shape {new.shape} in the teacher "
                             f"model but {t.shape} in the student")
    same = jax.jit(lambda a, b: jax.tree.map(
        lambda x, y: jnp.array_equal(x.astype(jnp.float32), y.astype(jnp.float32)), a, b))(state.frozen, frozen)
    for path, equal in jax.tree_util.tree_leaves_with_path(same):
        if not bool(equal):
            raise ValueError(f"with_teacher: {jax.tree_util.keystr(path)} is frozen, shared by student and teacher, "
                             "and differs in the teacher model (a teacher with other routers needs a state that "
                             "trains them: `train_router`)")
    teacher = jax.jit(_to_f32, out_shardings=jax.tree.map(lambda x: x.sharding, state.teacher))(trainable)
    return dataclasses.replace(state, teacher=teacher)


def trains_adapters(state: TrainState) -> bool:
    """Whether `state` trains LoRA adapters (its frozen part is then the base model)."""
    return all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(state.params))


def with_params(state: TrainState, params: nnx.State) -> TrainState:
    """`state` starting from other trainable weights, its teacher's copy too, with its fresh optimizer
    state kept (Adam's initial moments do not depend on the weights).

    For a run that continues another's LoRA adapters on the same frozen base (a continual experiment's
    second stage). `params` must have the state's parameters and shapes; they are cast to fp32 and
    placed on the state's shardings.
    """
    _check_like(params, state.params, "with_params")
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    params = jax.jit(_to_f32, out_shardings=shardings)(params)
    teacher = jax.jit(teacher_lib.init_teacher, out_shardings=jax.tree.map(lambda x: x.sharding, state.teacher))(params)
    return dataclasses.replace(state, params=params, teacher=teacher)


def with_base_teacher(state: TrainState) -> TrainState:
    """`state` with its teacher the base model alone, adapters off: a LoRA state whose teacher adapters
    are zero, so the teacher computes `x @ W + scale * (x @ 0) @ 0 = x @ W` exactly, on the frozen
    base it shares with the student (no second copy of the base weights).

    The teacher must then stay static (`TeacherConfig.source = "base"`): an EMA or copy of the student
    would bring the student's adapters back.
    """
    if not trains_adapters(state):
        raise ValueError("with_base_teacher: the state trains every weight, not LoRA adapters; a full "
                         "fine-tuning teacher takes the base model's weights with `with_teacher`")
    zeros = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t),
                    out_shardings=jax.tree.map(lambda x: x.sharding, state.teacher))(state.teacher)
    return dataclasses.replace(state, teacher=zeros)


def _check_like(new: PyTree, old: PyTree, what: str) -> None:
    """`new` has `old`'s tree structure and leaf shapes, else a ValueError naming the first difference."""
    if jax.tree.structure(new) != jax.tree.structure(old):
        new_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(new)}
        old_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(old)}
        missing, extra = sorted(old_paths - new_paths), sorted(new_paths - old_paths)
        raise ValueError(f"{what}: other parameters than the state's (missing {missing[:3]}, extra {extra[:3]})")
    for (path, o), n in zip(jax.tree_util.tree_leaves_with_path(old), jax.tree.leaves(new)):
        if o.shape != n.shape:
            raise ValueError(f"{what}: {jax.tree_util.keystr(path)} has shape {n.shape}, the state's {o.shape}")


def student_model(graphdef: nnx.GraphDef, state: TrainState) -> Transformer:
    """The current student as a module (params cast to the model's parameter dtype)."""
    return nnx.merge(graphdef, state.params, state.frozen)
