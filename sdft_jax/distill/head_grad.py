"""The chunked loss with a hand-written backward that never holds the LM head's gradient twice.

Autodiff of `losses.chunked_loss` accumulates the head's gradient `[D, V]` over token chunks in a
loop carry. XLA cannot give that carry the output's buffer, so a second `[D, V]` fp32 buffer lives
through the backward pass (2.5 GB for a 152K vocab at D=4096: most of the chunked loss's memory).

Here the backward pass runs vocab blocks in the outer loop and token chunks in the inner one. A
block's gradient columns are complete when its inner loop ends and are written once into the
output, which XLA can alias. What it needs from the forward pass is small and per token: for every
loss but `jsd`, the gradient of a position's loss with respect to the student logits has the form

    d loss / d z  =  alpha * p_S  +  beta * p_T  +  sum_k c_k * onehot(id_k)

(`p_S`, `p_T` the student and teacher softmax), so the forward saves alpha, beta, the sparse ids and
coefficients, and the two softmax normalisers; the backward recomputes `p_S` (and `p_T` for `full_kl`)
one block at a time. `jsd` has no such form and keeps the autodiff path. Parity with `dense_loss`
(values and gradients, every loss and reduction, ragged token chunks and vocab blocks) is tested in
tests/distill/head_grad_test.py.

Per-loss coefficients (z = student logits, lse its log-normaliser, w = renormalised teacher top-K):
  topk          alpha 1, ids = teacher top-K, c = -w
  full_kl       alpha 1, beta -1
  reverse_topk  alpha 0, ids = teacher top-K, c_k = q_k (log q_k - log w_k - loss)  (q: student over the K)
  importance    alpha r*A, ids = target, c = -r*A  (r = exp(lp_S(y) - lp_old), A the stop-grad advantage)
  sft           alpha 1, ids = target, c = -1
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

BLOCKED_LOSSES = frozenset({"topk", "full_kl", "reverse_topk", "importance_sampling", "sft"})


def _normaliser(logits):
    """(max, log-sum-exp of logits - max): softmax = exp((z - max) - that), as exact as log_softmax."""
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    return jnp.stack([m, jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))], axis=-1)


def _coefficients(cfg, s_logits, t_logits, loss, parts):
    """(alpha, beta, ids, c, norm_s, norm_t) of each position: [..], [..], [.., K], [.., K], [.., 2], [.., 2],
    from the values the loss already computed (`parts`)."""
    norm_s = _normaliser(s_logits)
    zeros = jnp.zeros(s_logits.shape[:-1], jnp.float32)
    ones = jnp.ones_like(zeros)
    norm_t = jnp.zeros_like(norm_s)
    if cfg.name == "full_kl":
        return ones, -ones, jnp.zeros(zeros.shape + (1,), jnp.int32), zeros[..., None], norm_s, _normaliser(t_logits)
    if cfg.name == "importance_sampling":
        ra = parts["ratio_advantage"]
        return ra, zeros, parts["targets"][..., None], -ra[..., None], norm_s, norm_t
    if cfg.name == "sft":
        return ones, zeros, parts["targets"][..., None], -ones[..., None], norm_s, norm_t
    if cfg.name == "topk":
        return ones, zeros, parts["top_ids"], -jnp.exp(parts["logw"]), norm_s, norm_t
    logq = parts["logq"]  # reverse_topk
    c = jnp.exp(logq) * (logq - parts["logw"] - loss[..., None])
    return zeros, zeros, parts["top_ids"], c, norm_s, norm_t


def _softmax(logits, norm):
    return jnp.exp((logits - norm[..., :1]) - norm[..., 1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def blocked_terms(cfg, token_terms, s_head: Float[Array, "D V"], xs: dict[str, Array]):
    """Per-position loss and metrics over chunks `xs` ([n_chunks, B, P, ...] streams), like the scan in
    `losses.chunked_loss`; differentiable in `s_head` and `xs["student_hidden"]` only."""
    return _forward(cfg, token_terms, s_head, xs)[0]


def _forward(cfg, token_terms, s_head, xs):
    t_head = xs.get("teacher_head")

    def chunk(_, xc):
        s_logits = jnp.matmul(xc["student_hidden"], s_head)
        t_logits = None
        if t_head is not None:
            t_logits = jnp.matmul(xc["teacher_hidden"], t_head, preferred_element_type=jnp.float32)
        loss, metrics, parts = token_terms(cfg, s_logits, t_logits, xc.get("targets"), xc.get("sampler_logprobs"))
        coeffs = _coefficients(cfg, s_logits, t_logits, loss, {**parts, "targets": xc.get("targets")})
        return None, ((loss, metrics), coeffs)

    chunk_xs = {k: v for k, v in xs.items() if k != "teacher_head"}
    _, (out, coeffs) = jax.lax.scan(chunk, None, chunk_xs)
    return out, (s_head, xs, coeffs)


def _bwd(cfg, token_terms, residuals, cotangents):
    s_head, xs, (alpha, beta, ids, c, norm_s, norm_t) = residuals
    ct_loss = cotangents[0]  # [n_chunks, B, P]; the metrics carry no gradient
    alpha, beta, c = alpha * ct_loss, beta * ct_loss, c * ct_loss[..., None]
    hidden = xs["student_hidden"]  # [n_chunks, B, P, D]
    vocab = s_head.shape[1]
    block = min(cfg.vocab_chunk_size, vocab)
    n_blocks = -(-vocab // block)
    teacher = cfg.name == "full_kl"

    def vocab_block(j, carry):
        d_head, d_hidden = carry
        # The last block is moved back to end at V; the columns it shares with the previous block get
        # their (complete) gradient written again, and add nothing more to the hidden gradient.
        start = jnp.minimum(j * block, vocab - block)
        w = jax.lax.dynamic_slice_in_dim(s_head, start, block, axis=1)
        w_t = jax.lax.dynamic_slice_in_dim(xs["teacher_head"], start, block, axis=1) if teacher else None
        fresh = (start + jnp.arange(block)) >= j * block

        def token_chunk(d_w, x):
            h, a, b, i, cc, ls, lt, dh, h_t = x
            g = a[..., None] * _softmax(jnp.matmul(h, w), ls)
            if teacher:
                g = g + b[..., None] * _softmax(jnp.matmul(h_t, w_t, preferred_element_type=jnp.float32), lt)
            local = jnp.where((i >= start) & (i < start + block), i - start, block)  # `block`: dropped
            rows = jnp.arange(g.shape[0])[:, None, None]
            cols = jnp.arange(g.shape[1])[None, :, None]
            g = g.at[rows, cols, local].add(cc, mode="drop")
            d_w = d_w + jnp.einsum("bpd,bpv->dv", h, g)
            dh = dh + jnp.einsum("bpv,dv->bpd", jnp.where(fresh, g, 0.0), w)
            return d_w, dh

        # Without a teacher term the last stream is a stand-in that is never read.
        streams = (hidden, alpha, beta, ids, c, norm_s, norm_t, d_hidden, xs["teacher_hidden"] if teacher else hidden)
        d_w, d_hidden = jax.lax.scan(token_chunk, jnp.zeros((s_head.shape[0], block), jnp.float32), streams)
        d_head = jax.lax.dynamic_update_slice_in_dim(d_head, d_w, start, axis=1)
        return d_head, d_hidden

    d_head, d_hidden = jax.lax.fori_loop(0, n_blocks, vocab_block,
                                         (jnp.zeros_like(s_head), jnp.zeros(hidden.shape, jnp.float32)))
    d_hidden = d_hidden.astype(hidden.dtype)
    d_xs = {k: (d_hidden if k == "student_hidden" else _zero_cotangent(v)) for k, v in xs.items()}
    return d_head, d_xs


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return jnp.zeros(x.shape, jax.dtypes.float0)


blocked_terms.defvjp(_forward, _bwd)


def chunk_streams(xs: dict[str, Array], teacher_head: Float[Array, "D V"] | None) -> dict[str, Array]:
    """The scan inputs of `blocked_terms`: the chunked streams plus the (gradient-free) teacher head."""
    out = dict(xs)
    if teacher_head is not None:
        out["teacher_head"] = jax.lax.stop_gradient(teacher_head)
    return out

