"""One SDFT (or SFT) train step: a single jitted, sharded function, read top to bottom.

    teacher forward on teacher_prompt ++ completion (no gradient)
 -> student forward + backward on student_prompt ++ completion
 -> chunked loss from aligned final hidden states (LM head applied inside token chunks), plus a MoE
    model's load-balancing loss when its coefficient is set
    (these three on the whole batch, or per micro-batch with the gradients summed: see below)
 -> AdamW update (skipped, and counted, if the loss or gradient is not finite)
 -> teacher update (static / EMA / sync)
 -> metrics
Teacher logits never leave the device; nothing but scalar metrics comes back to the host.

Micro-batches (`StepConfig.micro_batch_size`). A `jax.lax.scan` inside the step runs the teacher
forward, the student forward and backward on one micro-batch of rows at a time and adds up the
gradients, so activations are held for one micro-batch only; the decoder's layer scans add each layer's
gradients into the running sum as the backward goes (`models.summed_scan`), so a micro-batch's own
gradients are never held beside it. The result is the whole batch's step:
each micro-batch's loss is its share of the whole batch's reduction (`losses.reduction_totals`: the
token and row counts of the whole batch), so the shares, their gradients and every metric add up to
the whole batch's. A MoE balance loss weighs each expert by its share of the whole batch's
assignments; with micro-batches those come from a forward of the student over every micro-batch first
(no gradient; only when `load_balance_coef` is set), and the router metrics from the summed statistics.
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
from sdft_jax.distill.batch import StepBatch, split_rows
from sdft_jax.distill.losses import LossConfig, ReductionTotals, chunked_loss, reduction_totals
from sdft_jax.distill.train_state import OptimConfig, TrainState
from sdft_jax.models import moe as moe_lib
from sdft_jax.models.lm_head import LMHead
from sdft_jax.models.sharding import (
    DEFAULT_RULES,
    LogicalRules,
    activation_sharding,
    active_batch_shards,
    constrain,
)
from sdft_jax.models.transformer import ModelOutput, Transformer, positions_from_mask
from sdft_jax.validation import check_bool, check_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    loss: LossConfig = LossConfig()
    teacher: teacher_lib.TeacherConfig = teacher_lib.TeacherConfig()
    optim: OptimConfig = OptimConfig()
    total_steps: int = 1000  # the learning-rate schedule's length: the run's optimizer steps
    skip_nonfinite: bool = True  # a non-finite loss/gradient leaves the state unchanged (counted in metrics)
    # rows per micro-batch (gradients accumulated inside the step); 0 or the batch's rows = the whole batch
    # at once. Must divide the batch's rows, and split over the mesh's batch shards.
    micro_batch_size: int = 0

    def __post_init__(self):
        check_int("StepConfig.total_steps", self.total_steps, minimum=1)
        check_bool("StepConfig.skip_nonfinite", self.skip_nonfinite)
        check_int("StepConfig.micro_batch_size", self.micro_batch_size, minimum=0, hint="0 = the whole batch at once")


def model_forward(model: Transformer, tokens: Int[Array, "B L"], mask: Bool[Array, "B L"], *,
                  grad_sum: dict[str, Array] | None = None) -> ModelOutput:
    """`model`'s forward over left-padded `tokens` (positions from the mask); `grad_sum` as in
    `Transformer.forward`."""
    return model.forward(tokens, positions_from_mask(mask), mask, grad_sum=grad_sum)


def completion_hidden(hidden: Float[Array, "B L D"], prompt_len: int, completion_len: int) -> Float[Array, "B C D"]:
    """Final hidden states at the positions that predict the completion tokens: [B, C, D]."""
    return hidden[:, prompt_len - 1: prompt_len - 1 + completion_len]


def teacher_targets(
    graphdef: nnx.GraphDef, state: TrainState, batch: StepBatch
) -> tuple[Float[Array, "B C D"], LMHead]:
    """The teacher's side of the loss, without gradient: its final hidden states at the completion
    positions of `teacher_prompt ++ completion`, and its LM head. The teacher is the frozen part
    shared with the student plus its own copy of the trainable part."""
    teacher = nnx.merge(graphdef, state.teacher, state.frozen)
    out = model_forward(teacher, batch.teacher_tokens, batch.teacher_mask)
    hidden = completion_hidden(out.hidden, batch.teacher_prompt_len, batch.completion_len)
    return jax.lax.stop_gradient(hidden), teacher.head().stop_gradient()


def router_metrics(stats: moe_lib.RouterStats) -> dict[str, Float[Array, ""]]:
    """Scalar metrics of a MoE model's routing, its router statistics summed over the sparse layers and
    the real tokens of the student's forward: the busiest and the idlest expert's share of the
    assignments over the mean share 1/E (1 and 1 when balanced), and the unweighted load-balancing loss
    (`top_k` when balanced; what `load_balance_coef` would weight)."""
    relative = stats.load() * stats.assignments.shape[0]
    return {"router/max_over_mean_load": stats.max_over_mean_load(),
            "router/min_over_mean_load": jnp.min(relative),
            "router/balance_loss": moe_lib.balance_loss(stats)}


# What the student's loss function returns beside the loss: the metrics, and a MoE model's router
# statistics (None for a dense model).
LossAux = tuple[dict[str, Array], moe_lib.RouterStats | None]


def step_gradients(
    graphdef: nnx.GraphDef, state: TrainState, batch: StepBatch, cfg: StepConfig,
    totals: ReductionTotals | None = None, whole_routing: moe_lib.RouterStats | None = None,
    running: nnx.State | None = None,
) -> tuple[tuple[Float[Array, ""], LossAux], nnx.State]:
    """Teacher forward, student forward and backward on `batch`: `((loss, (metrics, router stats)), grads)`.

    `batch` is the whole batch, or one micro-batch of it with the whole batch's `totals` (the loss and
    metrics are then its share) and, for a balance loss, the whole batch's `whole_routing` statistics.
    With `running` (gradients shaped like the params, summed over earlier micro-batches), `grads` is
    `running` plus this batch's gradients, the decoder's share added into `running`'s own buffers as the
    backward goes (`summed_scan`), so a second copy of them is never held.
    """
    C = batch.completion_len
    sft = cfg.loss.name == "sft"

    # 1. Teacher forward (no gradient).
    teacher_hidden, teacher_head = (None, None) if sft else teacher_targets(graphdef, state, batch)

    # 2-3. Student forward and backward through the chunked loss (+ a MoE model's balance loss).
    def loss_fn(params: nnx.State, grad_sum: dict[str, Array] | None = None):
        student = nnx.merge(graphdef, params, state.frozen)
        out = model_forward(student, batch.student_tokens, batch.student_mask, grad_sum=grad_sum)
        loss, metrics = chunked_loss(
            completion_hidden(out.hidden, batch.student_prompt_len, C), student.head(),
            batch.completion_mask, cfg.loss, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
            targets=batch.completion_tokens, sampler_logprobs=batch.sampler_logprobs, totals=totals)
        if out.router_stats is not None and student.cfg.moe.load_balance_coef:
            aux = out.aux_loss
            if whole_routing is not None:  # this micro-batch's share, weighted by the whole batch's loads
                aux = student.cfg.moe.load_balance_coef * moe_lib.balance_loss(dataclasses.replace(
                    whole_routing, prob_sum=out.router_stats.prob_sum))
            loss = loss + aux
            metrics = {**metrics, "aux_loss": aux}
        return (loss, out.grad_sum), (metrics, out.router_stats)

    if running is None:
        def plain(params):
            (loss, _), aux = loss_fn(params)
            return loss, aux

        return jax.value_and_grad(plain, has_aux=True)(state.params)
    # The decoder's stacked gradients accumulate in place: the cotangent seeded into the passed-through
    # sum is the running sum itself, and comes back with this batch's gradients added. The params'
    # own cotangents for those arrays are zeros, unused; the rest (embeddings, head, final norm) add up
    # as usual.
    sums = _stacked_sums(running)
    (loss, _), pullback, aux = jax.vjp(loss_fn, state.params, sums, has_aux=True)
    grads, sums = pullback((jnp.ones_like(loss), sums))
    return (loss, aux), _summed(running, grads, sums)


def _stacked_sums(grads: nnx.State) -> dict[str, Array]:
    """The decoder's stacked arrays' entries of a params-shaped state, by name (`DecoderStack.weights`)."""
    return {name: v[...] for name, v in grads["layers"].items()} if "layers" in grads else {}


def _summed(running: nnx.State, grads: nnx.State, sums: dict[str, Array]) -> nnx.State:
    """`running` + `grads`, shaped like `running`, but the decoder's stacked entries taken from `sums`
    (where the backward already added them; `grads` holds zeros there)."""
    def one(path, running_v: nnx.Variable, grad_v: nnx.Variable) -> nnx.Variable:
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] == "layers":
            return running_v.replace(sums[keys[1]])
        return running_v.replace(running_v[...] + grad_v[...])

    return jax.tree_util.tree_map_with_path(one, running, grads, is_leaf=lambda x: isinstance(x, nnx.Variable))


def micro_batch_count(rows: int, cfg: StepConfig, shards: int = 1) -> int:
    """How many micro-batches `cfg` cuts a batch of `rows` rows into (1 = the whole batch at once);
    raises ValueError naming `micro_batch_size` when they do not split the rows evenly over `shards`
    batch shards."""
    size = cfg.micro_batch_size
    if size in (0, rows):
        return 1
    if rows % size:
        raise ValueError(f"StepConfig.micro_batch_size = {size} does not divide the batch's {rows} rows")
    if size % shards:
        raise ValueError(f"StepConfig.micro_batch_size = {size}: a micro-batch's rows do not split over the "
                         f"mesh's {shards} batch shards (data x fsdp x expert)")
    return rows // size


def _zeros_like_params(params: nnx.State) -> nnx.State:
    """Zeros shaped and laid out like `params` (sharded by their logical axes under a mesh)."""
    def zeros(v: nnx.Variable) -> nnx.Variable:
        axes = getattr(v, "axes", None) or (None,) * v.ndim
        return v.replace(constrain(jnp.zeros_like(v[...]), axes))

    return jax.tree.map(zeros, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _whole_routing(graphdef: nnx.GraphDef, state: TrainState, parts: StepBatch) -> moe_lib.RouterStats:
    """The student's router statistics summed over the micro-batches `parts`, from forwards without
    gradient: the whole batch's expert loads, which the balance loss's gradient needs before the first
    micro-batch's backward."""
    params = jax.lax.stop_gradient(state.params)

    def stats_of(part: StepBatch) -> moe_lib.RouterStats:
        student = nnx.merge(graphdef, params, state.frozen)
        return model_forward(student, part.student_tokens, part.student_mask).router_stats

    per_part = jax.lax.map(stats_of, parts)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), per_part)


def _accumulated_gradients(
    graphdef: nnx.GraphDef, state: TrainState, batch: StepBatch, cfg: StepConfig, count: int
) -> tuple[tuple[Float[Array, ""], LossAux], nnx.State]:
    """`step_gradients` of the whole batch, computed over `count` micro-batches in a scan and summed: the
    gradients in the scan's carry (laid out like the params; each micro-batch's backward adds into it),
    the scalars and router statistics per micro-batch, added up after it."""
    parts = split_rows(batch, count)
    parts = jax.tree.map(lambda x: constrain(x, (None, "batch") + (None,) * (x.ndim - 2)), parts)
    totals = reduction_totals(batch.completion_mask, cfg.loss)
    moe = nnx.merge(graphdef, state.params, state.frozen).cfg.moe
    whole_routing = _whole_routing(graphdef, state, parts) if moe is not None and moe.load_balance_coef else None

    def one(grads: nnx.State, part: StepBatch) -> tuple[nnx.State, tuple[Float[Array, ""], LossAux]]:
        loss_aux, grads = step_gradients(graphdef, state, part, cfg, totals, whole_routing, running=grads)
        return grads, loss_aux

    grads, per_part = jax.lax.scan(one, _zeros_like_params(state.params), parts)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), per_part), grads


def train_step(
    graphdef: nnx.GraphDef, state: TrainState, batch: StepBatch, cfg: StepConfig
) -> tuple[TrainState, dict[str, Array]]:
    """(state, batch) -> (new state, metrics). Pure; jit it with `make_train_step`."""
    sft = cfg.loss.name == "sft"

    # 1-3. Teacher forward, student forward and backward: the whole batch at once, or micro-batches.
    count = micro_batch_count(batch.rows, cfg, active_batch_shards())
    if count == 1:
        (loss, (metrics, router_stats)), grads = step_gradients(graphdef, state, batch, cfg)
    else:
        (loss, (metrics, router_stats)), grads = _accumulated_gradients(graphdef, state, batch, cfg, count)
    if router_stats is not None:
        metrics = {**metrics, **router_metrics(router_stats)}

    # 4. Optimizer update, unless the step produced a non-finite loss or gradient.
    grad_norm = optax.tree.norm(grads)
    tx = cfg.optim.optimizer(cfg.total_steps)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    step = state.step + 1

    def update(params: nnx.State, opt_state: optax.OptState, teacher: nnx.State):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # 5. Teacher update after the student's.
        if not sft:
            teacher = teacher_lib.update_teacher(teacher, params, step, cfg.teacher)
        return params, opt_state, teacher

    old = (state.params, state.opt_state, state.teacher)
    if cfg.skip_nonfinite:
        # A cond, not a select of the new state against the old: for the select XLA copies every optimizer
        # moment and teacher weight first, since it reads the old values the update overwrites in place
        # (the SmolLM2 full fine-tune step's temporaries on XLA:CPU: 1.45 GB with the select, 1.08 without).
        params, opt_state, teacher_params = jax.lax.cond(finite, update, lambda *unchanged: unchanged, *old)
    else:
        params, opt_state, teacher_params = update(*old)

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
