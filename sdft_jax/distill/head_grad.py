"""The chunked loss with a hand-written backward that never holds the LM head's gradient twice.

Autodiff of `losses.chunked_loss` accumulates the head's gradient `[D, V]` over token chunks in a
loop carry. XLA cannot give that carry the output's buffer, so a second `[D, V]` fp32 buffer, as
large as the gradient itself, lives through the backward pass.

Here the backward pass runs vocab blocks in the outer loop and token chunks in the inner one. A
block's gradient columns are complete when its inner loop ends and are written once into the
output, which XLA can alias. What it needs from the forward pass is small and per token: for every
loss but `jsd`, the gradient of a position's loss with respect to the student logits has the form

    d loss / d z  =  alpha * p_S  +  beta * p_T  +  sum_k c_k * onehot(id_k)

(`p_S`, `p_T` the student and teacher softmax), so the forward saves these `Coefficients` (alpha,
beta, the sparse ids and coefficients, and the two softmax normalisers); the backward recomputes `p_S`
(and `p_T` for `full_kl`) one block at a time. `jsd` has no such form and keeps the autodiff path.
The logits, forward and recomputed, come from matmuls in the hidden states' dtype accumulated in fp32
(`student_logits`: in a bf16 model, bf16 matmuls whose products are exact); the two gradient matmuls
take the fp32 logit gradients, and the head's gradient accumulates in fp32.
Parity with `dense_loss` (values and gradients, every loss and reduction, ragged token chunks and
vocab blocks) is tested in tests/distill/head_grad_test.py.

Per-loss coefficients (z = student logits, w = renormalised teacher top-K):
  topk          alpha 1, ids = teacher top-K, c = -w
  full_kl       alpha 1, beta -1
  reverse_topk  alpha 0, ids = teacher top-K, c_k = q_k (log q_k - log w_k - loss)  (q: student over the K)
  importance    alpha r*A, ids = target, c = -r*A  (r = exp(lp_S(y) - lp_old), A the stop-grad advantage)
  sft           alpha 1, ids = target, c = -1
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sdft_jax.distill.loss_config import LossConfig
from sdft_jax.models.lm_head import LMHead
from sdft_jax.models.sharding import active_batch_shards, pin_rows, split_rows
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.distill.token_terms import (
    TokenMetrics,
    TokenStreams,
    TokenTerms,
    student_logits,
    teacher_logits,
    token_terms,
)

BLOCKED_LOSSES = frozenset({"topk", "full_kl", "reverse_topk", "importance_sampling", "sft"})


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Coefficients:
    """The gradient of each position's loss with respect to its student logits z, in closed form:

        d loss / d z = alpha * p_S + beta * p_T + sum_k sparse_coeffs[k] * onehot(sparse_ids[k])

    Attributes:
      alpha: `[*N]` the weight of the student softmax.
      beta: `[*N]` the weight of the teacher softmax (non-zero for `full_kl` only).
      sparse_ids: `[*N, K]` the token ids of the sparse terms (K = 1 when the loss has none: a zero term).
      sparse_coeffs: `[*N, K]` their coefficients.
      student_norm: `[*N, 2]` (max, log-sum-exp of z - max) of the student logits, which give p_S.
      teacher_norm: `[*N, 2]` the same for the teacher logits (`full_kl`; zeros otherwise).
    """

    alpha: Float[Array, "*N"]
    beta: Float[Array, "*N"]
    sparse_ids: Int[Array, "*N K"]
    sparse_coeffs: Float[Array, "*N K"]
    student_norm: Float[Array, "*N 2"]
    teacher_norm: Float[Array, "*N 2"]

    def times(self, cotangent: Float[Array, "*N"]) -> Coefficients:
        """The coefficients of `cotangent * loss` at each position."""
        return dataclasses.replace(self, alpha=self.alpha * cotangent, beta=self.beta * cotangent,
                                   sparse_coeffs=self.sparse_coeffs * cotangent[..., None])


def _normaliser(logits: Float[Array, "*N V"]) -> Float[Array, "*N 2"]:
    """(max, log-sum-exp of logits - max): softmax = exp((z - max) - that), as exact as log_softmax."""
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    return jnp.stack([m, jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))], axis=-1)


def _softmax(logits: Float[Array, "*N V"], norm: Float[Array, "*N 2"]) -> Float[Array, "*N V"]:
    return jnp.exp((logits - norm[..., :1]) - norm[..., 1:])


def _coefficients(
    cfg: LossConfig,
    terms: TokenTerms,
    s_logits: Float[Array, "*N V"],
    t_logits: Float[Array, "*N V"] | None,
    targets: Int[Array, "*N"] | None,
) -> Coefficients:
    """The coefficients of each position, from the values the loss already computed (`terms`)."""
    student_norm = _normaliser(s_logits)
    zeros = jnp.zeros(s_logits.shape[:-1], jnp.float32)
    ones = jnp.ones_like(zeros)
    no_teacher = jnp.zeros_like(student_norm)
    if cfg.name == "full_kl":
        return Coefficients(alpha=ones, beta=-ones, sparse_ids=jnp.zeros(zeros.shape + (1,), jnp.int32),
                            sparse_coeffs=zeros[..., None], student_norm=student_norm,
                            teacher_norm=_normaliser(t_logits))
    if cfg.name == "importance_sampling":
        ra = terms.ratio_advantage
        return Coefficients(alpha=ra, beta=zeros, sparse_ids=targets[..., None], sparse_coeffs=-ra[..., None],
                            student_norm=student_norm, teacher_norm=no_teacher)
    if cfg.name == "sft":
        return Coefficients(alpha=ones, beta=zeros, sparse_ids=targets[..., None], sparse_coeffs=-ones[..., None],
                            student_norm=student_norm, teacher_norm=no_teacher)
    if cfg.name == "topk":
        return Coefficients(alpha=ones, beta=zeros, sparse_ids=terms.teacher_topk_ids,
                            sparse_coeffs=-jnp.exp(terms.teacher_topk_logw), student_norm=student_norm,
                            teacher_norm=no_teacher)
    if cfg.name == "reverse_topk":
        logq = terms.student_topk_logq
        sparse_coeffs = jnp.exp(logq) * (logq - terms.teacher_topk_logw - terms.loss[..., None])
        return Coefficients(alpha=zeros, beta=zeros, sparse_ids=terms.teacher_topk_ids, sparse_coeffs=sparse_coeffs,
                            student_norm=student_norm, teacher_norm=no_teacher)
    raise ValueError(f"loss {cfg.name!r} has no blocked backward (only {sorted(BLOCKED_LOSSES)})")


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class _Residuals:
    """What the blocked backward keeps from the forward pass (chunked streams: `[n_chunks, B, P, ...]`)."""

    student_head: LMHead
    teacher_head: LMHead | None
    streams: TokenStreams
    coefficients: Coefficients


# The backward's carry over vocab blocks: the gradients of the student head and hidden states.
_Gradients = tuple[LMHead, Float[Array, "n B P D"]]


class _BackwardChunk(NamedTuple):
    """One token chunk's inputs to a vocab block's backward (`[B, P, ...]`)."""

    student_hidden: Float[Array, "B P D"]
    coefficients: Coefficients
    d_hidden: Float[Array, "B P D"]  # the chunk's hidden-state gradient from the blocks before
    teacher_hidden: Float[Array, "B P Dt"] | None  # read by `full_kl` only


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def blocked_terms(
    cfg: LossConfig,
    student_head: LMHead,
    teacher_head: LMHead | None,
    streams: TokenStreams,
) -> tuple[Float[Array, "n B P"], TokenMetrics]:
    """Per-position loss and metrics of token chunks, like the scan in `losses.chunked_loss`.

    Args:
      cfg: the loss (one of `BLOCKED_LOSSES`) and `vocab_chunk_size`, the columns of a vocab block.
      student_head: the student's LM head, fp32; its gradient comes back in the same layout.
      teacher_head: the teacher's LM head (None for `sft`); it gets no gradient.
      streams: the inputs cut into chunks, `[n_chunks, B, P, ...]`.

    Returns:
      The loss and metrics at every position, `[n_chunks, B, P]`; differentiable in `student_head` and
      `streams.student_hidden` only.
    """
    (loss, metrics), _ = _blocked_forward(cfg, student_head, teacher_head, streams)
    return loss, metrics


def _blocked_forward(
    cfg: LossConfig,
    student_head: LMHead,
    teacher_head: LMHead | None,
    streams: TokenStreams,
) -> tuple[tuple[Float[Array, "n B P"], TokenMetrics], _Residuals]:
    """The loss over the chunks, and each position's gradient coefficients for the backward.

    The heads are cast to their hidden states' dtypes (the matmuls' dtype, `student_logits`) once, here,
    and kept so for the backward."""
    student_head = student_head.astype(streams.student_hidden.dtype)
    if teacher_head is not None:
        teacher_head = teacher_head.astype(streams.teacher_hidden.dtype)

    def chunk(carry: None, xc: TokenStreams) -> tuple[None, tuple[Float[Array, "B P"], TokenMetrics, Coefficients]]:
        s_logits = student_logits(xc.student_hidden, student_head)
        t_logits = None if teacher_head is None else teacher_logits(xc.teacher_hidden, teacher_head)
        terms = token_terms(cfg, s_logits, t_logits, xc.targets, xc.sampler_logprobs)
        return carry, (terms.loss, terms.metrics, _coefficients(cfg, terms, s_logits, t_logits, xc.targets))

    _, (loss, metrics, coefficients) = jax.lax.scan(chunk, None, streams)
    residuals = _Residuals(student_head=student_head, teacher_head=teacher_head, streams=streams,
                           coefficients=coefficients)
    return (loss, metrics), residuals


def _blocked_backward(
    cfg: LossConfig,
    residuals: _Residuals,
    cotangents: tuple[Float[Array, "n B P"], TokenMetrics],
) -> tuple[LMHead, None, TokenStreams]:
    """Gradients of the head and the student hidden states, one vocab block at a time.

    The head's gradient is a sum over the batch's rows. With the rows split over devices (a sharded step),
    each device computes its own rows of every token chunk (`models.sharding.split_rows`) and accumulates
    their part of a vocab block's gradient over the token chunks; the parts are summed once per block, after
    the token loop: XLA's partitioner on CPU and GPU would otherwise all-reduce every chunk's contribution
    (libtpu's defers that by itself). (Carrying the parts through the vocab loop as well, to sum them once
    at the end, cost the TPU program 1.5 heads of fp32 more memory for the same bytes reduced.)"""
    loss_cotangent, _ = cotangents  # the metrics carry no gradient
    coefficients = residuals.coefficients.times(loss_cotangent)
    head = residuals.student_head
    hidden = residuals.streams.student_hidden  # [n_chunks, B, P, D]
    parts = active_batch_shards(hidden.shape[1])
    vocab = head.vocab
    block = min(cfg.vocab_chunk_size, vocab)
    n_blocks = -(-vocab // block)
    uses_teacher = cfg.name == "full_kl"

    def vocab_block(j: Int[Array, ""], grads: _Gradients) -> _Gradients:
        d_head, d_hidden = grads
        # The last block is moved back to end at V; the columns it shares with the previous block get
        # their (complete) gradient written again, and add nothing more to the hidden gradient.
        start = jnp.minimum(j * block, vocab - block)
        w = head.columns(start, block)
        w_t = residuals.teacher_head.columns(start, block) if uses_teacher else None
        fresh = (start + jnp.arange(block)) >= j * block

        def one_part(x: _BackwardChunk) -> tuple[Float[Array, "_ _"], Float[Array, "b P D"]]:
            """A token chunk's rows of one batch shard: their part of the block's head gradient, and their
            hidden states' gradient."""
            cf = x.coefficients
            g = cf.alpha[..., None] * _softmax(student_logits(x.student_hidden, w), cf.student_norm)
            if uses_teacher:
                g = g + cf.beta[..., None] * _softmax(teacher_logits(x.teacher_hidden, w_t), cf.teacher_norm)
            ids = cf.sparse_ids
            local = jnp.where((ids >= start) & (ids < start + block), ids - start, block)  # `block`: dropped
            rows = jnp.arange(g.shape[0])[:, None, None]
            cols = jnp.arange(g.shape[1])[None, :, None]
            g = g.at[rows, cols, local].add(cf.sparse_coeffs, mode="drop")
            # The logits' gradient stays fp32 (rounding it to bf16 would cost the hidden states'
            # gradient, a sum of terms that cancel, up to a few % where it is small): these two matmuls
            # are fp32 whatever the hidden states' dtype.
            d_w = w.weight_grad(x.student_hidden, g, preferred_element_type=jnp.float32)
            d_h = x.d_hidden + w.hidden_grad(jnp.where(fresh, g, 0.0), preferred_element_type=jnp.float32)
            return d_w, d_h

        def token_chunk(
            d_w: Float[Array, "S _ _"], x: _BackwardChunk
        ) -> tuple[Float[Array, "S _ _"], Float[Array, "B P D"]]:
            d_w_parts, d_h = jax.vmap(one_part)(jax.tree.map(lambda a: split_rows(a, parts), x))
            return d_w + pin_rows(d_w_parts), d_h.reshape(x.d_hidden.shape)

        chunks = _BackwardChunk(student_hidden=hidden, coefficients=coefficients, d_hidden=d_hidden,
                                teacher_hidden=residuals.streams.teacher_hidden if uses_teacher else None)
        d_w, d_hidden = jax.lax.scan(token_chunk, _zero_parts(parts, w.weight.shape), chunks)
        d_head = d_head.with_columns(jnp.sum(d_w, axis=0), start)
        return d_head, d_hidden

    zero_head = dataclasses.replace(head, weight=jnp.zeros(head.weight.shape, jnp.float32))
    d_head, d_hidden = jax.lax.fori_loop(0, n_blocks, vocab_block,
                                         (zero_head, jnp.zeros(hidden.shape, jnp.float32)))
    # None: no cotangent (a zero) for the teacher head and for every stream but the student's hidden states.
    d_streams = TokenStreams(student_hidden=d_hidden.astype(hidden.dtype), teacher_hidden=None, targets=None,
                             sampler_logprobs=None)
    return d_head, None, d_streams


def _zero_parts(parts: int, shape: tuple[int, ...]) -> Float[Array, "S ..."]:
    """fp32 zeros `[parts, *shape]`, one part per batch shard."""
    return pin_rows(jnp.zeros((parts, *shape), jnp.float32))


blocked_terms.defvjp(_blocked_forward, _blocked_backward)
