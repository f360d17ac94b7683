"""SDFT losses computed from final hidden states: a token-chunked path and a dense reference.

Both functions take the student's (and teacher's) final, post-norm hidden states aligned so that
position `t` predicts completion token `t`, together with the LM-head weights, and return the reduced
loss and a dict of scalar metrics. The LM-head matmuls take the hidden states' dtype (the model's
compute dtype) and accumulate in fp32 (`token_terms.student_logits`); everything after the logits is
fp32 whatever the input dtype, the head's gradient accumulates in fp32, and the teacher side never
receives a gradient. The per-position math is `token_terms.token_terms`, shared by both; this module
checks the arguments, cuts the positions into chunks and reduces the result.

Memory. `dense_loss` materialises `[B, C, V]` logits for each model (and the backward pass keeps
several more arrays of that size): with a 152K vocab that is 0.6 MB per token per array in fp32.
`chunked_loss` never holds more than one chunk of logits per model, forward or backward: the tokens are
cut into chunks of at most `LossConfig.chunk_size` tokens, the LM-head matmul runs inside the chunk, and
the per-chunk function is rematerialised (`jax.checkpoint`) inside a `jax.lax.scan`, so the backward
pass recomputes a chunk's logits when it reaches it instead of storing them. What survives a chunk is
per-token: the loss, the metrics, and for `topk` / `reverse_topk` / `importance_sampling` the few
teacher values the gradient needs (saved, so the backward pass skips the teacher's matmul). Peak loss
memory is therefore `O(chunk_size * V)` per model instead of `O(B * C * V)`, plus `[D, V]` buffers for
the student head: its fp32 gradient, the head in the hidden states' dtype when it is stored in another,
and, where the backend does not fuse the accumulation into the matmul (XLA:CPU does not), one chunk's
contribution before it is added. With `LossConfig.vocab_chunk_size > 0` the
backward of every loss but `jsd` is `head_grad.blocked_terms` instead, which never holds the head's
gradient twice. `python -m sdft_jax.bench loss` measures both.

Chunks run along the sequence and hold every row of the batch (`chunk_size // B` positions each, at
least one), so a batch sharded over a data axis stays sharded: each device computes its own rows of
every chunk (as one part of the chunk: `models.sharding.split_rows`, so that the head's gradient is summed
over the devices after the loops, not in every iteration). `chunk_size` counts tokens of the global batch;
with `n` data shards a device holds `chunk_size / n` of them, so raise it with the number of shards. A
vocabulary sharded over a tensor axis needs no special code: GSPMD inserts the cross-shard reductions for
the log-softmax and top-K.

Micro-batches. The reductions divide by counts of the whole batch (its scored positions, its rows
with any), so a part of the batch cannot reduce alone. Given the whole batch's `ReductionTotals`
(`reduction_totals`), both paths return that part's share instead: the loss and every metric are
sums over the part's positions divided by the whole batch's counts, and the parts' values add up to
the whole batch's (the train step's gradient accumulation relies on it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sdft_jax.distill import head_grad
from sdft_jax.distill.loss_config import LossConfig, LossName, Reduction
from sdft_jax.distill.token_terms import (
    SAVED_TEACHER_VALUES,
    TokenMetrics,
    TokenStreams,
    student_logits,
    teacher_logits,
    token_terms,
)
from sdft_jax.models.lm_head import LMHead
from sdft_jax.models.sharding import active_batch_shards, constrain, pin_rows, split_rows
from sdft_jax.pytrees import pytree_dataclass

__all__ = ["LossConfig", "LossName", "Reduction", "ReductionTotals", "chunked_loss", "dense_loss", "reduction_totals"]

# The losses that compare whole next-token distributions skip the first completion tokens (both
# references do: the first few tokens of an answer are the least informative about the skill).
_SKIPPING_LOSSES = frozenset({"topk", "full_kl", "reverse_topk", "jsd"})


# ---------------------------------------------------------------------------------------------------
# Shared input checks and the reduction.


def _heads(
    student_head: LMHead | Float[Array, "D V"], teacher_head: LMHead | Float[Array, "D V"] | None
) -> tuple[LMHead, LMHead | None]:
    """Both heads as `LMHead`s (a plain array is a `[D, V]` head)."""
    return LMHead.of(student_head), None if teacher_head is None else LMHead.of(teacher_head)


def _prepare(
    cfg: LossConfig,
    student_hidden: Float[Array, "B C D"],
    student_head: LMHead,
    mask: Bool[Array, "B C"],
    teacher_hidden: Float[Array, "B C Dt"] | None,
    teacher_head: LMHead | None,
    targets: Int[Array, "B C"] | None,
    sampler_logprobs: Float[Array, "B C"] | None,
) -> tuple[TokenStreams, Bool[Array, "B C"]]:
    """Checks the arguments; returns the streams with the unscored positions neutralised, and the scored
    positions."""
    if student_hidden.ndim != 3:
        raise ValueError(f"student_hidden must be [B, C, D], got shape {student_hidden.shape}")
    b, c, d = student_hidden.shape
    if student_head.weight.ndim != 2 or student_head.hidden != d:
        raise ValueError(f"student_head must be {_layout(student_head, d, None)}, "
                         f"got shape {student_head.weight.shape}")
    if mask.shape != (b, c):
        raise ValueError(f"mask must be [B, C] = {(b, c)}, got shape {mask.shape}")
    vocab = student_head.vocab
    if cfg.name != "sft":
        if teacher_hidden is None or teacher_head is None:
            raise ValueError(f"loss {cfg.name!r} needs teacher_hidden and teacher_head")
        if teacher_hidden.ndim != 3 or teacher_hidden.shape[:2] != (b, c):
            raise ValueError(f"teacher_hidden must be [B, C, D] with B, C = {(b, c)}, got {teacher_hidden.shape}")
        if (teacher_head.weight.ndim != 2
                or (teacher_head.hidden, teacher_head.vocab) != (teacher_hidden.shape[2], vocab)):
            raise ValueError(f"teacher_head must be {_layout(teacher_head, teacher_hidden.shape[2], vocab)}, "
                             f"got shape {teacher_head.weight.shape}")
    if cfg.name in ("importance_sampling", "sft") and targets is None:
        raise ValueError(f"loss {cfg.name!r} needs targets")
    if cfg.name == "importance_sampling" and sampler_logprobs is None:
        raise ValueError("loss 'importance_sampling' needs sampler_logprobs")
    if targets is not None and targets.shape != (b, c):
        raise ValueError(f"targets must be [B, C] = {(b, c)}, got shape {targets.shape}")
    if sampler_logprobs is not None and sampler_logprobs.shape != (b, c):
        raise ValueError(f"sampler_logprobs must be [B, C] = {(b, c)}, got shape {sampler_logprobs.shape}")

    scored = _scored(mask, cfg)
    # Unscored positions see zero hidden states and neutral targets, so that whatever the caller left
    # there (padding garbage, lp_old = -inf) cannot turn a zero weight into a NaN gradient.
    def zero_unscored(x: Array | None) -> Array | None:
        return None if x is None else jnp.where(scored[..., None], x, jnp.zeros((), x.dtype))

    streams = TokenStreams(
        student_hidden=zero_unscored(student_hidden),
        teacher_hidden=None if cfg.name == "sft" else jax.lax.stop_gradient(zero_unscored(teacher_hidden)),
        targets=None if targets is None else jnp.where(scored, targets, 0).astype(jnp.int32),
        sampler_logprobs=(
            None if sampler_logprobs is None else jnp.where(scored, sampler_logprobs.astype(jnp.float32), 0.0)
        ),
    )
    return streams, scored


def _gathered(head: LMHead, cfg: LossConfig) -> LMHead:
    """`head` whole over the mesh axes its hidden dimension is split over, its vocabulary split as the rules
    say (`LossConfig.gather_head`; unchanged outside `activation_sharding` or with `gather_head` off)."""
    if not cfg.gather_head:
        return head
    axes = ("vocab", None) if head.vocab_major else (None, "vocab")
    return dataclasses.replace(head, weight=constrain(head.weight, axes))


def _layout(head: LMHead, d: int, v: int | None) -> str:
    """The shape a head of hidden size `d` and vocabulary `v` (None: any) must have in its layout, for an
    error."""
    vocab = "V" if v is None else f"V={v}"
    return f"[{vocab}, D={d}] (vocab-major)" if head.vocab_major else f"[D={d}, {vocab}]"


def _scored(mask: Bool[Array, "B C"], cfg: LossConfig) -> Bool[Array, "B C"]:
    """The positions the loss scores: real completion tokens, past `skip_first_tokens` where it applies."""
    scored = mask.astype(bool)
    if cfg.name in _SKIPPING_LOSSES:
        scored = scored & (jnp.arange(mask.shape[1]) >= cfg.skip_first_tokens)[None, :]
    return scored


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class ReductionTotals:
    """The counts of a whole batch that the reductions divide by: its scored positions, and its rows
    with at least one scored position (fp32)."""

    tokens: Float[Array, ""]
    rows: Float[Array, ""]


def _totals(scored: Bool[Array, "B C"]) -> ReductionTotals:
    s = scored.astype(jnp.float32)
    return ReductionTotals(tokens=jnp.sum(s), rows=jnp.sum((jnp.sum(s, axis=1) > 0).astype(jnp.float32)))


def reduction_totals(mask: Bool[Array, "B C"], cfg: LossConfig) -> ReductionTotals:
    """The whole batch's `ReductionTotals` under `cfg` (`mask` as `chunked_loss` takes it), for computing
    the loss of its parts one at a time."""
    return _totals(_scored(mask, cfg))


def _reduction_weights(
    scored: Bool[Array, "B C"], reduction: Reduction, totals: ReductionTotals
) -> Float[Array, "B C"]:
    """The weight of each position in the reduced loss; zero where unscored, all zero if none is.
    `totals` are the counts of the whole batch that `scored` is (a part of)."""
    s = scored.astype(jnp.float32)
    if reduction == "sum":
        return s
    if reduction == "token_mean":
        return s / jnp.maximum(totals.tokens, 1.0)
    per_row = jnp.sum(s, axis=1, keepdims=True)
    row_weight = jnp.where(per_row > 0, 1.0 / jnp.maximum(per_row, 1.0), 0.0)
    return s * row_weight / jnp.maximum(totals.rows, 1.0)


def _finish(
    cfg: LossConfig, token_loss: Float[Array, "B C"], token_metrics: TokenMetrics, scored: Bool[Array, "B C"],
    totals: ReductionTotals | None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The reduced loss, and the public metrics: each per-position metric as a mean over the scored
    positions (this part's share of them, given the whole batch's `totals`)."""
    totals = _totals(scored) if totals is None else totals
    loss = jnp.sum(_reduction_weights(scored, cfg.reduction, totals) * token_loss)
    token_mean = _reduction_weights(scored, "token_mean", totals)
    metrics = {"loss": jax.lax.stop_gradient(loss)}
    metrics.update({k: jnp.sum(token_mean * v) for k, v in token_metrics.named().items()})
    metrics["scored_tokens"] = jnp.sum(scored.astype(jnp.float32))
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """How `chunked_loss` cuts `[B, C]` positions: chunks of every row and `positions` positions each, the
    last one padded."""

    rows: int
    length: int
    positions: int

    @classmethod
    def of(cls, rows: int, length: int, chunk_size: int) -> _Chunks:
        return cls(rows=rows, length=length, positions=max(1, min(length, chunk_size // rows)))

    @property
    def count(self) -> int:
        return -(-self.length // self.positions)

    def split(self, a: Array) -> Array:
        """`[B, C, ...]` -> `[n_chunks, B, positions, ...]`."""
        pad = self.count * self.positions - self.length
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(self.rows, self.count, self.positions, *a.shape[2:]), 1, 0)

    def join(self, a: Float[Array, "n B P"]) -> Float[Array, "B C"]:
        """`[n_chunks, B, positions]` -> `[B, C]`."""
        return jnp.moveaxis(a, 0, 1).reshape(self.rows, self.count * self.positions)[:, : self.length]


def _scanned_terms(
    cfg: LossConfig, student_head: LMHead, teacher_head: LMHead | None, chunks: TokenStreams
) -> tuple[Float[Array, "n B P"], TokenMetrics]:
    """Per-position loss and metrics over the chunks, differentiated by autodiff: each chunk is
    rematerialised in the backward pass, except the teacher values it saves.

    Each batch shard's rows of a chunk are computed as one part (`models.sharding.split_rows`; one part
    outside a sharded step) with a copy of the student head of its own, so that autodiff accumulates each
    part's share of the head's gradient on its device through the loop and sums the copies' gradients once,
    after it: XLA's partitioner on CPU and GPU would otherwise all-reduce every chunk's share inside the loop
    (libtpu's defers that by itself)."""
    rows = chunks.student_hidden.shape[1]
    parts = active_batch_shards(rows)
    head_copies = None if parts == 1 else pin_rows(
        jnp.broadcast_to(student_head.weight, (parts, *student_head.weight.shape)))

    @functools.partial(
        jax.checkpoint,
        policy=jax.checkpoint_policies.save_only_these_names(*SAVED_TEACHER_VALUES),
        prevent_cse=False,  # safe inside scan, and lets XLA share work between the recomputed parts
    )
    def chunk(
        s_weight: Float[Array, "_ _"], t_head: LMHead | None, xc: TokenStreams
    ) -> tuple[Float[Array, "b P"], TokenMetrics]:
        s_head = dataclasses.replace(student_head, weight=s_weight)
        t_logits = None if t_head is None else teacher_logits(xc.teacher_hidden, t_head)
        terms = token_terms(cfg, student_logits(xc.student_hidden, s_head), t_logits, xc.targets, xc.sampler_logprobs)
        return terms.loss, terms.metrics

    def by_parts(carry: None, xc: TokenStreams) -> tuple[None, tuple[Float[Array, "B P"], TokenMetrics]]:
        if parts == 1:  # one device's rows: a copy of the head (one part) would only cost XLA:CPU a buffer
            return carry, chunk(student_head.weight, teacher_head, xc)
        split = jax.tree.map(lambda a: split_rows(a, parts), xc)
        out = jax.vmap(chunk, in_axes=(0, None, 0))(head_copies, teacher_head, split)
        return carry, jax.tree.map(lambda a: a.reshape(rows, *a.shape[2:]), out)

    _, (token_loss, token_metrics) = jax.lax.scan(by_parts, None, chunks)
    return token_loss, token_metrics


# ---------------------------------------------------------------------------------------------------
# The two public paths.


def dense_loss(
    student_hidden: Float[Array, "B C D"],
    student_head: LMHead | Float[Array, "D V"],
    mask: Bool[Array, "B C"],
    cfg: LossConfig,
    *,
    teacher_hidden: Float[Array, "B C D"] | None = None,
    teacher_head: LMHead | Float[Array, "D V"] | None = None,
    targets: Int[Array, "B C"] | None = None,
    sampler_logprobs: Float[Array, "B C"] | None = None,
    totals: ReductionTotals | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The reference loss: same contract as `chunked_loss`, with `[B, C, V]` logits materialised."""
    student_head, teacher_head = _heads(student_head, teacher_head)
    streams, scored = _prepare(cfg, student_hidden, student_head, mask, teacher_hidden, teacher_head, targets,
                               sampler_logprobs)
    t_logits = None
    if streams.teacher_hidden is not None:
        t_logits = jax.lax.stop_gradient(student_logits(streams.teacher_hidden, teacher_head))
    terms = token_terms(cfg, student_logits(streams.student_hidden, student_head), t_logits, streams.targets,
                        streams.sampler_logprobs)
    return _finish(cfg, terms.loss, terms.metrics, scored, totals)


def chunked_loss(
    student_hidden: Float[Array, "B C D"],
    student_head: LMHead | Float[Array, "D V"],
    mask: Bool[Array, "B C"],
    cfg: LossConfig,
    *,
    teacher_hidden: Float[Array, "B C D"] | None = None,
    teacher_head: LMHead | Float[Array, "D V"] | None = None,
    targets: Int[Array, "B C"] | None = None,
    sampler_logprobs: Float[Array, "B C"] | None = None,
    totals: ReductionTotals | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The SDFT loss of `cfg.name`, reduced by `cfg.reduction`, without ever holding `[B*C, V]` logits.

    Args:
      student_hidden: final (post-norm) student hidden states; position `t` predicts completion token `t`.
      student_head: the student's LM head: an `LMHead` (a tied embedding stays `[V, D]`, never
        transposed into a copy), or a plain `[D, V]` weight.
      mask: completion tokens that exist (not padding, not cut by a context limit). The loss applies
        `cfg.skip_first_tokens` itself.
      cfg: the loss to compute.
      teacher_hidden: the teacher's hidden states aligned the same way (every loss but `sft`).
      teacher_head: the teacher's LM head, likewise (every loss but `sft`).
      targets: the sampled token ids (`importance_sampling`) or the golden ids (`sft`).
      sampler_logprobs: the sampler's log-prob of each target (`importance_sampling`).
      totals: when these rows are a part of a batch (a micro-batch), the whole batch's
        `reduction_totals`: the loss and metrics are then this part's share (see the module docstring);
        None = the rows are the whole batch.

    Returns:
      The loss (exactly 0 with zero gradients when no position is scored) and fp32 scalar metrics:
      `loss` (the returned value, without gradient), `scored_tokens`, and, as means over the scored
      positions, `kl` (full-vocab KL(teacher||student)) and `teacher_entropy` for every loss but `sft`,
      and `topk_mass` (teacher probability of its top-K ids) for `topk`.
    """
    student_head, teacher_head = _heads(student_head, teacher_head)
    streams, scored = _prepare(cfg, student_hidden, student_head, mask, teacher_hidden, teacher_head, targets,
                               sampler_logprobs)
    b, c, _ = student_hidden.shape
    chunks = _Chunks.of(b, c, cfg.chunk_size)
    xs = jax.tree.map(chunks.split, streams)
    # The head enters the loops as fp32, so that its gradient accumulates over chunks in fp32 (a bf16
    # accumulator would round away the small per-chunk contributions); its matmuls cast it to the hidden
    # states' dtype (the blocked path once, the autodiff path per chunk).
    student_head = _gathered(student_head.astype(jnp.float32), cfg)
    teacher_head = None if streams.teacher_hidden is None else _gathered(
        teacher_head.astype(streams.teacher_hidden.dtype).stop_gradient(), cfg)
    if cfg.vocab_chunk_size and cfg.name in head_grad.BLOCKED_LOSSES:
        token_loss, token_metrics = head_grad.blocked_terms(cfg, student_head, teacher_head, xs)
    else:
        token_loss, token_metrics = _scanned_terms(cfg, student_head, teacher_head, xs)
    return _finish(cfg, chunks.join(token_loss), jax.tree.map(chunks.join, token_metrics), scored, totals)
