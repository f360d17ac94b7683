"""SDFT losses computed from final hidden states: a token-chunked path and a dense reference.

Both functions take the student's (and teacher's) final, post-norm hidden states aligned so that
position `t` predicts completion token `t`, together with the LM-head weights, and return the reduced
loss and a dict of scalar metrics. All math is fp32 whatever the input dtype; the teacher side never
receives a gradient.

Memory. `dense_loss` materialises `[B, C, V]` logits for each model (and the backward pass keeps
several more arrays of that size): with a 152K vocab that is 0.6 MB per token per array in fp32.
`chunked_loss` never holds more than one chunk of logits per model, forward or backward: the tokens are
cut into chunks of at most `LossConfig.chunk_size` tokens, the LM-head matmul runs inside the chunk, and
the per-chunk function is rematerialised (`jax.checkpoint`) inside a `jax.lax.scan`, so the backward
pass recomputes a chunk's logits when it reaches it instead of storing them. What survives a chunk is
per-token: the loss, the metrics, and for `topk` / `reverse_topk` / `importance_sampling` the few
teacher values the gradient needs (saved, so the backward pass skips the teacher's matmul). Peak loss
memory is therefore `O(chunk_size * V)` per model instead of `O(B * C * V)`, plus `[D, V]` buffers for
the student head: its fp32 gradient, an fp32 copy of a bf16 head (so that the gradient accumulates
over chunks in fp32), and, where the backend does not fuse the accumulation into the matmul (XLA:CPU
does not), one chunk's contribution before it is added. `python -m sdft_jax.bench loss` measures it.

Chunks run along the sequence and hold every row of the batch (`chunk_size // B` positions each, at
least one), so a batch sharded over a data axis stays sharded: each device computes its own rows of
every chunk. `chunk_size` counts tokens of the global batch; with `n` data shards a device holds
`chunk_size / n` of them, so raise it with the number of shards. A vocabulary sharded over a tensor
axis needs no special code: GSPMD inserts the cross-shard reductions for the log-softmax and top-K.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int

LossName = Literal["topk", "full_kl", "reverse_topk", "importance_sampling", "jsd", "sft"]
Reduction = Literal["sequence_mean", "token_mean", "sum"]

_LOSS_NAMES: tuple[str, ...] = typing.get_args(LossName)
_REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)
# The losses that compare whole next-token distributions skip the first completion tokens (both
# references do: the first few tokens of an answer are the least informative about the skill).
_SKIPPING_LOSSES = frozenset({"topk", "full_kl", "reverse_topk", "jsd"})
# Names given to the teacher values that the backward pass needs; saved across the rematerialised
# chunk so the teacher's LM-head matmul is not recomputed.
_SAVED_TEACHER_VALUES = ("teacher_topk_ids", "teacher_topk_logw", "teacher_target_logprob")


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"LossConfig.{field} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which SDFT loss to compute and how to reduce it.

    Attributes:
      name: the per-position loss (see the SDFT spec, section 3).
      top_k: how many of the teacher's most likely tokens `topk` and `reverse_topk` use.
      jsd_beta: weight of the teacher in the `jsd` mixture; 0 is forward KL(T||S), 1 is reverse KL(S||T).
      reduction: `sequence_mean` (mean per sequence, then over sequences), `token_mean` or `sum`.
      skip_first_tokens: completion positions `t < skip_first_tokens` are not scored by `topk`,
        `full_kl`, `reverse_topk` and `jsd` (`importance_sampling` and `sft` score every position).
      chunk_size: at most this many tokens (of the whole batch) per chunk in `chunked_loss`.
      vocab_chunk_size: N > 0 = `chunked_loss`'s backward runs over blocks of N vocab columns
        (`head_grad.py`; every loss but `jsd`), so the LM head's gradient is never held twice; 0 = plain
        autodiff, which accumulates it over token chunks in a second [D, V] buffer. Use 0 when the
        vocabulary is split over the `tensor` mesh axis (each block would gather its slice of the head).
    """

    name: LossName = "topk"
    top_k: int = 20
    jsd_beta: float = 0.5
    reduction: Reduction = "sequence_mean"
    skip_first_tokens: int = 3
    chunk_size: int = 256
    vocab_chunk_size: int = 16384

    def __post_init__(self):
        if self.name not in _LOSS_NAMES:
            raise ValueError(f"LossConfig.name must be one of {_LOSS_NAMES}, got {self.name!r}")
        _check_int("top_k", self.top_k, 1)
        beta = self.jsd_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"LossConfig.jsd_beta must be a number in [0, 1], got {beta!r}")
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"LossConfig.reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")
        _check_int("skip_first_tokens", self.skip_first_tokens, 0)
        _check_int("chunk_size", self.chunk_size, 1)
        _check_int("vocab_chunk_size", self.vocab_chunk_size, 0)


# ---------------------------------------------------------------------------------------------------
# Per-token math, shared by both paths. Inputs are fp32 logits with any leading shape.


def _take(x: Float[Array, "... V"], ids: Int[Array, "... K"]) -> Float[Array, "... K"]:
    return jnp.take_along_axis(x, ids, axis=-1)


def _token_terms(
    cfg: LossConfig,
    student_logits: Float[Array, "*N V"],
    teacher_logits: Float[Array, "*N V"] | None,
    targets: Int[Array, "*N"] | None,
    sampler_logprobs: Float[Array, "*N"] | None,
) -> tuple[Float[Array, "*N"], dict[str, Float[Array, "*N"]]]:
    """Per-position loss and per-position metrics (the metrics carry no gradient)."""
    loss, metrics, _ = token_terms_and_parts(cfg, student_logits, teacher_logits, targets, sampler_logprobs)
    return loss, metrics


def token_terms_and_parts(cfg: LossConfig, student_logits, teacher_logits, targets, sampler_logprobs):
    """`_token_terms` plus the intermediate values it computed (`parts`: log-probs, the teacher's top-K),
    for the blocked backward (head_grad.py), which needs them and should not compute them twice."""
    logp_s = jax.nn.log_softmax(student_logits, axis=-1)
    parts = {"logp_s": logp_s}
    if cfg.name == "sft":
        return -_take(logp_s, targets[..., None])[..., 0], {}, parts

    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    logp_t = jax.nn.log_softmax(teacher_logits, axis=-1)
    parts["logp_t"] = logp_t
    p_t = jnp.exp(logp_t)
    forward_kl = jnp.sum(p_t * (logp_t - logp_s), axis=-1)
    metrics = {
        "kl": jax.lax.stop_gradient(forward_kl),
        "teacher_entropy": -jnp.sum(p_t * logp_t, axis=-1),
    }

    if cfg.name == "full_kl":
        loss = forward_kl
    elif cfg.name in ("topk", "reverse_topk"):
        if cfg.top_k > teacher_logits.shape[-1]:
            raise ValueError(f"LossConfig.top_k={cfg.top_k} exceeds the vocabulary size {teacher_logits.shape[-1]}")
        top_vals, top_ids = jax.lax.top_k(teacher_logits, cfg.top_k)
        top_ids = checkpoint_name(top_ids, "teacher_topk_ids")
        logw = checkpoint_name(jax.nn.log_softmax(top_vals, axis=-1), "teacher_topk_logw")
        parts.update(top_ids=top_ids, logw=logw)
        logp_s_top = _take(logp_s, top_ids)
        if cfg.name == "topk":
            loss = -jnp.sum(jnp.exp(logw) * logp_s_top, axis=-1)
            metrics["topk_mass"] = jnp.exp(jax.nn.logsumexp(_take(logp_t, top_ids), axis=-1))
        else:
            logq = jax.nn.log_softmax(logp_s_top, axis=-1)
            parts["logq"] = logq
            loss = jnp.sum(jnp.exp(logq) * (logq - logw), axis=-1)
    elif cfg.name == "importance_sampling":
        lp_s = _take(logp_s, targets[..., None])[..., 0]
        lp_t = checkpoint_name(_take(logp_t, targets[..., None])[..., 0], "teacher_target_logprob")
        advantage = jax.lax.stop_gradient(lp_t - sampler_logprobs)
        loss = -jnp.exp(lp_s - sampler_logprobs) * advantage
        parts["ratio_advantage"] = jnp.exp(lp_s - sampler_logprobs) * advantage
    elif cfg.name == "jsd":
        p_s = jnp.exp(logp_s)
        beta = cfg.jsd_beta
        if beta == 0.0:
            loss = forward_kl
        elif beta == 1.0:
            loss = jnp.sum(p_s * (logp_s - logp_t), axis=-1)
        else:
            # log M from the two log-probs, so that tokens one side gives probability ~0 stay finite.
            log_m = jnp.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
            kl_t_m = jnp.sum(p_t * (logp_t - log_m), axis=-1)
            kl_s_m = jnp.sum(p_s * (logp_s - log_m), axis=-1)
            loss = beta * kl_t_m + (1.0 - beta) * kl_s_m
    else:  # pragma: no cover - LossConfig validates the name
        raise AssertionError(cfg.name)
    return loss, {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}, parts


# ---------------------------------------------------------------------------------------------------
# Shared input checks and the reduction.


@dataclasses.dataclass(frozen=True)
class _Inputs:
    student_hidden: Array
    teacher_hidden: Array | None
    targets: Array | None
    sampler_logprobs: Array | None
    scored: Array


def _prepare(cfg, student_hidden, student_head, mask, teacher_hidden, teacher_head, targets, sampler_logprobs):
    """Checks the arguments, computes the scored positions and neutralises the unscored ones."""
    if student_hidden.ndim != 3:
        raise ValueError(f"student_hidden must be [B, C, D], got shape {student_hidden.shape}")
    b, c, d = student_hidden.shape
    if student_head.ndim != 2 or student_head.shape[0] != d:
        raise ValueError(f"student_head must be [D={d}, V], got shape {student_head.shape}")
    if mask.shape != (b, c):
        raise ValueError(f"mask must be [B, C] = {(b, c)}, got shape {mask.shape}")
    vocab = student_head.shape[1]
    if cfg.name != "sft":
        if teacher_hidden is None or teacher_head is None:
            raise ValueError(f"loss {cfg.name!r} needs teacher_hidden and teacher_head")
        if teacher_hidden.ndim != 3 or teacher_hidden.shape[:2] != (b, c):
            raise ValueError(f"teacher_hidden must be [B, C, D] with B, C = {(b, c)}, got {teacher_hidden.shape}")
        if teacher_head.shape != (teacher_hidden.shape[2], vocab):
            raise ValueError(
                f"teacher_head must be [D={teacher_hidden.shape[2]}, V={vocab}], got shape {teacher_head.shape}"
            )
    if cfg.name in ("importance_sampling", "sft") and targets is None:
        raise ValueError(f"loss {cfg.name!r} needs targets")
    if cfg.name == "importance_sampling" and sampler_logprobs is None:
        raise ValueError("loss 'importance_sampling' needs sampler_logprobs")
    if targets is not None and targets.shape != (b, c):
        raise ValueError(f"targets must be [B, C] = {(b, c)}, got shape {targets.shape}")
    if sampler_logprobs is not None and sampler_logprobs.shape != (b, c):
        raise ValueError(f"sampler_logprobs must be [B, C] = {(b, c)}, got shape {sampler_logprobs.shape}")

    scored = mask.astype(bool)
    if cfg.name in _SKIPPING_LOSSES:
        scored = scored & (jnp.arange(c) >= cfg.skip_first_tokens)[None, :]
    # Unscored positions see zero hidden states and neutral targets, so that whatever the caller left
    # there (padding garbage, lp_old = -inf) cannot turn a zero weight into a NaN gradient.
    zero_unscored = lambda x: None if x is None else jnp.where(scored[..., None], x, jnp.zeros((), x.dtype))
    return _Inputs(
        student_hidden=zero_unscored(student_hidden),
        teacher_hidden=None if cfg.name == "sft" else jax.lax.stop_gradient(zero_unscored(teacher_hidden)),
        targets=None if targets is None else jnp.where(scored, targets, 0).astype(jnp.int32),
        sampler_logprobs=(
            None if sampler_logprobs is None else jnp.where(scored, sampler_logprobs.astype(jnp.float32), 0.0)
        ),
        scored=scored,
    )


def _reduction_weights(scored: Bool[Array, "B C"], reduction: Reduction) -> Float[Array, "B C"]:
    """The weight of each position in the reduced loss; zero where unscored, all zero if none is."""
    s = scored.astype(jnp.float32)
    if reduction == "sum":
        return s
    if reduction == "token_mean":
        return s / jnp.maximum(jnp.sum(s), 1.0)
    per_row = jnp.sum(s, axis=1, keepdims=True)
    row_weight = jnp.where(per_row > 0, 1.0 / jnp.maximum(per_row, 1.0), 0.0)
    rows = jnp.sum((per_row > 0).astype(jnp.float32))
    return s * row_weight / jnp.maximum(rows, 1.0)


def _finish(cfg, token_loss, token_metrics, scored):
    loss = jnp.sum(_reduction_weights(scored, cfg.reduction) * token_loss)
    token_mean = _reduction_weights(scored, "token_mean")
    metrics = {"loss": jax.lax.stop_gradient(loss)}
    metrics.update({k: jnp.sum(token_mean * v) for k, v in token_metrics.items()})
    metrics["scored_tokens"] = jnp.sum(scored.astype(jnp.float32))
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# The two public paths.


def _student_logits(hidden, head):
    return jnp.matmul(hidden.astype(jnp.float32), head.astype(jnp.float32))


def _teacher_logits(hidden, head):
    # bf16 x bf16 products are exact in fp32, so an fp32-accumulated matmul of the stored dtypes equals
    # the fp32 matmul without materialising an fp32 copy of the (V-sized) teacher head.
    return jax.lax.stop_gradient(jnp.matmul(hidden, head, preferred_element_type=jnp.float32))


def dense_loss(
    student_hidden: Float[Array, "B C D"],
    student_head: Float[Array, "D V"],
    mask: Bool[Array, "B C"],
    cfg: LossConfig,
    *,
    teacher_hidden: Float[Array, "B C D"] | None = None,
    teacher_head: Float[Array, "D V"] | None = None,
    targets: Int[Array, "B C"] | None = None,
    sampler_logprobs: Float[Array, "B C"] | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The reference loss: same contract as `chunked_loss`, with `[B, C, V]` logits materialised."""
    x = _prepare(cfg, student_hidden, student_head, mask, teacher_hidden, teacher_head, targets, sampler_logprobs)
    teacher_logits = None
    if x.teacher_hidden is not None:
        teacher_logits = jax.lax.stop_gradient(_student_logits(x.teacher_hidden, teacher_head))
    token_loss, token_metrics = _token_terms(
        cfg, _student_logits(x.student_hidden, student_head), teacher_logits, x.targets, x.sampler_logprobs
    )
    return _finish(cfg, token_loss, token_metrics, x.scored)


def chunked_loss(
    student_hidden: Float[Array, "B C D"],
    student_head: Float[Array, "D V"],
    mask: Bool[Array, "B C"],
    cfg: LossConfig,
    *,
    teacher_hidden: Float[Array, "B C D"] | None = None,
    teacher_head: Float[Array, "D V"] | None = None,
    targets: Int[Array, "B C"] | None = None,
    sampler_logprobs: Float[Array, "B C"] | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The SDFT loss of `cfg.name`, reduced by `cfg.reduction`, without ever holding `[B*C, V]` logits.

    Args:
      student_hidden: final (post-norm) student hidden states; position `t` predicts completion token `t`.
      student_head: the student's LM-head weight (for tied embeddings, the embedding transposed).
      mask: completion tokens that exist (not padding, not cut by a context limit). The loss applies
        `cfg.skip_first_tokens` itself.
      cfg: the loss to compute.
      teacher_hidden: the teacher's hidden states aligned the same way (every loss but `sft`).
      teacher_head: the teacher's LM-head weight (every loss but `sft`).
      targets: the sampled token ids (`importance_sampling`) or the golden ids (`sft`).
      sampler_logprobs: the sampler's log-prob of each target (`importance_sampling`).

    Returns:
      The loss (exactly 0 with zero gradients when no position is scored) and fp32 scalar metrics:
      `loss` (the returned value, without gradient), `scored_tokens`, and, as means over the scored
      positions, `kl` (full-vocab KL(teacher||student)) and `teacher_entropy` for every loss but `sft`,
      and `topk_mass` (teacher probability of its top-K ids) for `topk`.
    """
    x = _prepare(cfg, student_hidden, student_head, mask, teacher_hidden, teacher_head, targets, sampler_logprobs)
    b, c, _ = student_hidden.shape
    positions = max(1, min(c, cfg.chunk_size // b))  # per row and chunk; every row is in every chunk
    n_chunks = -(-c // positions)
    pad = n_chunks * positions - c

    def to_chunks(a):  # [B, C, ...] -> [n_chunks, B, positions, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n_chunks, positions, *a.shape[2:]), 1, 0)

    def from_chunks(a):  # [n_chunks, B, positions] -> [B, C]
        return jnp.moveaxis(a, 0, 1).reshape(b, n_chunks * positions)[:, :c]

    streams = {"student_hidden": x.student_hidden, "teacher_hidden": x.teacher_hidden, "targets": x.targets,
               "sampler_logprobs": x.sampler_logprobs}
    xs = {k: to_chunks(v) for k, v in streams.items() if v is not None}
    # The fp32 cast happens once, outside the loop, so the head's gradient accumulates over chunks in
    # fp32 (a bf16 accumulator would round away the small per-chunk contributions).
    student_head = student_head.astype(jnp.float32)
    teacher_head = None if x.teacher_hidden is None else jax.lax.stop_gradient(teacher_head)

    from sdft_jax.distill import head_grad  # the blocked backward (imports this module's per-token math)

    if cfg.vocab_chunk_size and cfg.name in head_grad.BLOCKED_LOSSES:
        token_loss, token_metrics = head_grad.blocked_terms(cfg, token_terms_and_parts, student_head,
                                                            head_grad.chunk_streams(xs, teacher_head))
        token_metrics = {k: from_chunks(v) for k, v in token_metrics.items()}
        return _finish(cfg, from_chunks(token_loss), token_metrics, x.scored)

    @functools.partial(
        jax.checkpoint,
        policy=jax.checkpoint_policies.save_only_these_names(*_SAVED_TEACHER_VALUES),
        prevent_cse=False,  # safe inside scan, and lets XLA share work between the recomputed parts
    )
    def chunk(s_head, t_head, xc):
        t_logits = None if t_head is None else _teacher_logits(xc["teacher_hidden"], t_head)
        return _token_terms(
            cfg, _student_logits(xc["student_hidden"], s_head), t_logits, xc.get("targets"), xc.get("sampler_logprobs")
        )

    _, (token_loss, token_metrics) = jax.lax.scan(lambda carry, xc: (carry, chunk(student_head, teacher_head, xc)),
                                                  None, xs)
    token_loss = from_chunks(token_loss)
    token_metrics = {k: from_chunks(v) for k, v in token_metrics.items()}
    return _finish(cfg, token_loss, token_metrics, x.scored)
