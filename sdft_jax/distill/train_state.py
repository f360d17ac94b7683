"""The train state: everything a checkpoint needs, as one pytree.

- `params`: what trains, as an fp32 master copy (all weights, or only the LoRA adapters);
- `frozen`: what does not (the LoRA base, possibly bf16; empty for full fine-tuning);
- `opt_state`: optax AdamW state (fp32 moments, since the master params are fp32);
- `teacher`: the teacher's copy of the trainable part (fp32), updated per the teacher mode. With LoRA
  the teacher is the shared frozen base plus these adapters: no second copy of the base.
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

from sdft_jax.distill import teacher as teacher_lib
from sdft_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with grad-norm clipping and a constant or warmup+cosine learning rate (spec section 5)."""

    learning_rate: float = 2e-5
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_ratio: float = 0.1  # of total_steps
    total_steps: int = 1000  # the cosine's length; also where warmup ends (warmup_ratio * total_steps)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 disables clipping

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"OptimConfig.learning_rate must be positive, got {self.learning_rate!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"OptimConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"OptimConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not isinstance(self.total_steps, int) or self.total_steps <= 0:
            raise ValueError(f"OptimConfig.total_steps must be a positive integer, got {self.total_steps!r}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")

    def schedule_fn(self) -> optax.Schedule:
        warmup = int(self.warmup_ratio * self.total_steps)
        if self.schedule == "constant":
            if warmup == 0:
                return optax.constant_schedule(self.learning_rate)
            return optax.linear_schedule(0.0, self.learning_rate, warmup)
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, warmup, self.total_steps, end_value=0.0)

    def optimizer(self) -> optax.GradientTransformation:
        adamw = optax.adamw(self.schedule_fn(), b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        if self.max_grad_norm > 0:
            return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw)
        return adamw


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array
    params: nnx.State
    frozen: nnx.State
    opt_state: Any
    teacher: nnx.State
    rng: jax.Array


def trainable_filter(model: Transformer):
    """LoRA adapters when the model has them, else every parameter."""
    return nnx.LoRAParam if model.layers.lora is not None else nnx.Param


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen) of a model; `nnx.merge(graphdef, trainable, frozen)` rebuilds it."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model), ...)
    return graphdef, trainable, frozen


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _init_optimizer(tx: optax.GradientTransformation, params):
    """Optimizer state whose per-parameter parts (Adam's moments) are sharded like their parameters."""
    first = jax.tree.leaves(params)[0].sharding
    other = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
             if isinstance(first, jax.sharding.NamedSharding) else first)
    shardings = optax.tree_map_params(
        tx, lambda _, p: p.sharding, jax.eval_shape(tx.init, params), params,
        transform_non_params=lambda _: other)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def init_train_state(
    model: Transformer, optim: OptimConfig, *, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
    """Builds the train state of a (possibly sharded) model; shardings follow the model's arrays."""
    graphdef, trainable, frozen = split_model(model)
    params = jax.jit(_to_f32)(trainable)
    opt_state = _init_optimizer(optim.optimizer(), params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=opt_state,
        teacher=jax.jit(teacher_lib.init_teacher)(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    # Scalars (step, rng, Adam's count) are created on one device; put them, replicated, on the
    # devices the parameters live on, so the step is one program over one device set.
    sharding = jax.tree.leaves(params)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        state = jax.tree.map(
            lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding) else jax.device_put(x, replicated), state)
    return graphdef, state


def with_teacher(state: TrainState, model: Transformer) -> TrainState:
    """`state` with its teacher replaced by `model`'s weights (fp32, on the teacher's shardings).

    For a teacher that starts elsewhere than the student (e.g. the original base model in a continual
    experiment's second stage). `model` must have the student's architecture and no LoRA adapters, and
    the state must be a full fine-tuning one (with LoRA the teacher shares the student's frozen base).
    """
    if model.layers.lora is not None:
        raise ValueError("with_teacher: the teacher model must not have LoRA adapters")
    _, trainable, _ = split_model(model)
    if jax.tree.structure(trainable) != jax.tree.structure(state.teacher):
        raise ValueError("with_teacher: the state's teacher holds other parameters than the model (a LoRA state "
                         "shares its frozen base with the teacher and cannot take a separate one)")
    for (path, t), new in zip(jax.tree_util.tree_leaves_with_path(state.teacher), jax.tree.leaves(trainable)):
        if t.shape != new.shape:
            raise ValueError(f"with_teacher: {jax.tree_util.keystr(path)} has shape {new.shape} in the teacher "
                             f"model but {t.shape} in the student")
    teacher = jax.jit(_to_f32, out_shardings=jax.tree.map(lambda x: x.sharding, state.teacher))(trainable)
    return dataclasses.replace(state, teacher=teacher)


def student_model(graphdef: nnx.GraphDef, state: TrainState) -> Transformer:
    """The current student as a module (params cast to the model's parameter dtype)."""
    return nnx.merge(graphdef, state.params, state.frozen)


def teacher_model(graphdef: nnx.GraphDef, state: TrainState) -> Transformer:
    """The teacher as a module: the frozen part shared with the student, its own trainable part."""
    return nnx.merge(graphdef, state.teacher, state.frozen)
