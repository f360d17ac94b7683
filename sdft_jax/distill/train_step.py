"""One SDFT (or SFT) train step: a single jitted, sharded function, read top to bottom.

    teacher forward on teacher_prompt ++ completion (no gradient)
 -> student forward + backward on student_prompt ++ completion
 -> chunked loss from aligned final hidden states (LM head applied inside token chunks), plus a MoE
    model's load-balancing loss when its coefficient is set
 -> AdamW update (skipped, and counted, if the loss or gradient is not finite)
 -> teacher update (static / EMA / sync)
 -> metrics
Teacher logits never leave the device; nothing but scalar metrics comes back to the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from sdft_jax import distributed
from sdft_jax.distill import teacher as teacher_lib
from sdft_jax.distill.batch import StepBatch
from sdft_jax.distill.losses import LossConfig, chunked_loss
from sdft_jax.distill.train_state import OptimConfig, TrainState
from sdft_jax.models import moe as moe_lib
from sdft_jax.models.sharding import DEFAULT_RULES, LogicalRules, activation_sharding
from sdft_jax.models.transformer import ModelOutput, Transformer, positions_from_mask
from sdft_jax.validation import check_bool, check_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    loss: LossConfig = LossConfig()
    teacher: teacher_lib.TeacherConfig = teacher_lib.TeacherConfig()
    optim: OptimConfig = OptimConfig()
    total_steps: int = 1000  # the learning-rate schedule's length: the run's optimizer steps
    skip_nonfinite: bool = True  # a non-finite loss/gradient leaves the state unchanged (counted in metrics)

    def __post_init__(self):
        check_int("StepConfig.total_steps", self.total_steps, minimum=1)
        check_bool("StepConfig.skip_nonfinite", self.skip_nonfinite)


def _forward(model: Transformer, tokens: Int[Array, "B L"], mask: Bool[Array, "B L"]) -> ModelOutput:
    return model.forward(tokens, positions_from_mask(mask), mask)


def _completion_hidden(hidden: Float[Array, "B L D"], prompt_len: int, completion_len: int) -> Float[Array, "B C D"]:
    """Final hidden states at the positions that predict the completion tokens: [B, C, D]."""
    return hidden[:, prompt_len - 1: prompt_len - 1 + completion_len]


def router_metrics(stats: moe_lib.RouterStats) -> dict[str, Float[Array, ""]]:
    """Scalar metrics of a MoE model's routing, its router statistics summed over the sparse layers and
    the real tokens of the student's forward: the busiest and the idlest expert's share of the
    assignments over the mean share 1/E (1 and 1 when balanced), and the unweighted load-balancing loss
    (`top_k` when balanced; what `load_balance_coef` would weight)."""
    relative = stats.load() * stats.assignments.shape[0]
    return {"router/max_over_mean_load": stats.max_over_mean_load(),
            "router/min_over_mean_load": jnp.min(relative),
            "router/balance_loss": moe_lib.balance_loss(stats)}


def train_step(
    graphdef: nnx.GraphDef, state: TrainState, batch: StepBatch, cfg: StepConfig
) -> tuple[TrainState, dict[str, Array]]:
    """(state, batch) -> (new state, metrics). Pure; jit it with `make_train_step`."""
    C = batch.completion_len
    sft = cfg.loss.name == "sft"

    # 1. Teacher: the frozen part shared with the student, its own copy of the trainable part.
    teacher_hidden = teacher_head = None
    if not sft:
        teacher = nnx.merge(graphdef, state.teacher, state.frozen)
        teacher_out = _forward(teacher, batch.teacher_tokens, batch.teacher_mask)
        teacher_hidden = jax.lax.stop_gradient(_completion_hidden(teacher_out.hidden, batch.teacher_prompt_len, C))
        teacher_head = jax.lax.stop_gradient(teacher.head_weight())

    # 2-3. Student forward and backward through the chunked loss (+ a MoE model's balance loss).
    def loss_fn(params: nnx.State) -> tuple[Float[Array, ""], dict[str, Array]]:
        student = nnx.merge(graphdef, params, state.frozen)
        out = _forward(student, batch.student_tokens, batch.student_mask)
        loss, metrics = chunked_loss(
            _completion_hidden(out.hidden, batch.student_prompt_len, C), student.head_weight(),
            batch.completion_mask, cfg.loss, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
            targets=batch.completion_tokens, sampler_logprobs=batch.sampler_logprobs)
        if out.router_stats is not None:
            metrics = {**metrics, **router_metrics(out.router_stats)}
            if student.cfg.moe.load_balance_coef:
                loss = loss + out.aux_loss
                metrics["aux_loss"] = out.aux_loss
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    # 4. Optimizer update, unless the step produced a non-finite loss or gradient.
    grad_norm = optax.tree.norm(grads)
    tx = cfg.optim.optimizer(cfg.total_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if cfg.skip_nonfinite:
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)

    # 5. Teacher update after the student's.
    step = state.step + 1
    teacher_params = state.teacher
    if not sft:
        teacher_params = teacher_lib.update_teacher(state.teacher, params, step, cfg.teacher)
        if cfg.skip_nonfinite:
            teacher_params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), teacher_params, state.teacher)

    # 6. Metrics (scalars only).
    metrics = dict(metrics)
    metrics.update(
        grad_norm=grad_norm,
        lr=cfg.optim.schedule_fn(cfg.total_steps)(state.step),
        skipped_nonfinite=(~finite).astype(jnp.int32),
        completion_tokens=batch.completion_mask.sum().astype(jnp.int32),
    )
    new_state = TrainState(step=step, params=params, frozen=state.frozen, opt_state=opt_state,
                           teacher=teacher_params, rng=state.rng)
    return new_state, metrics


def shard_batch(batch: StepBatch, mesh: Mesh | None, rules: LogicalRules = DEFAULT_RULES) -> StepBatch:
    """Global device arrays from this process's rows of a StepBatch, rows split over the batch axes."""
    return distributed.global_batch(batch, mesh, rules)


def make_train_step(
    graphdef: nnx.GraphDef,
    state: TrainState,
    cfg: StepConfig,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> Callable[[TrainState, StepBatch], tuple[TrainState, dict]]:
    """The jitted step with the state donated and its shardings kept fixed across steps."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    def step(state: TrainState, batch: StepBatch) -> tuple[TrainState, dict[str, Array]]:
        if mesh is None:
            return train_step(graphdef, state, batch, cfg)
        with activation_sharding(mesh, rules):
            return train_step(graphdef, state, batch, cfg)

    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, None))
