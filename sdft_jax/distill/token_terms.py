"""The per-position SDFT loss terms, from student and teacher logits.

One function, `token_terms`, holds the math of every loss, and returns a `TokenTerms`: the
per-position loss, the per-position metrics, and the intermediate values the blocked backward
(`head_grad.py`) builds its gradient from, so that it never computes them twice. The dense reference
calls it on `[B, C, V]` logits, the chunked paths on one chunk's `[B, P, V]` at a time. The logits are
fp32 (`student_logits`: the head's matmul in the hidden states' dtype, accumulated in fp32) and all
math after them is; the teacher side never receives a gradient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from sdft_jax.distill.loss_config import LossConfig
from sdft_jax.models import top_k
from sdft_jax.models.lm_head import LMHead
from sdft_jax.pytrees import pytree_dataclass

# Names given to the teacher values that the backward pass needs. The chunked scan saves them across
# its rematerialised chunk, so that the teacher's LM-head matmul is not recomputed.
SAVED_TEACHER_VALUES = ("teacher_topk_ids", "teacher_topk_logw", "teacher_target_logprob")


class TokenStreams(NamedTuple):
    """The per-position inputs of the loss; position `t` predicts completion token `t`.

    The leading shape `*N` is `[B, C]` for a batch, `[n_chunks, B, P]` once cut into chunks, and
    `[B, P]` inside a chunk. A NamedTuple, not a dataclass: the blocked backward's custom VJP takes it
    as an argument, and JAX rebuilds its arguments with placeholder leaves that no checked
    constructor would accept.

    Attributes:
      student_hidden: `[*N, D]` final (post-norm) student hidden states.
      teacher_hidden: `[*N, Dt]` the teacher's, aligned the same way (None for `sft`).
      targets: `[*N]` the sampled (`importance_sampling`) or golden (`sft`) token ids, else None.
      sampler_logprobs: `[*N]` the sampler's log-prob of each target (`importance_sampling`), else None.
    """

    student_hidden: Float[Array, "*N D"]
    teacher_hidden: Float[Array, "*N Dt"] | None
    targets: Int[Array, "*N"] | None
    sampler_logprobs: Float[Array, "*N"] | None


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class TokenMetrics:
    """Per-position metrics, without gradient; None where the loss does not compute one.

    The field names are the public metric names: the losses report each as a mean over the scored
    positions.

    Attributes:
      kl: full-vocabulary KL(teacher || student) (every loss but `sft`).
      teacher_entropy: the teacher's entropy (every loss but `sft`).
      topk_mass: the teacher's probability of its own top-K ids (`topk`).
    """

    kl: Float[Array, "*N"] | None = None
    teacher_entropy: Float[Array, "*N"] | None = None
    topk_mass: Float[Array, "*N"] | None = None

    def named(self) -> dict[str, Float[Array, "*N"]]:
        """The metrics this loss computes, by name, in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class TokenTerms:
    """What `token_terms` computes at each position (leading shape `*N`; K = `LossConfig.top_k`).

    Attributes:
      loss: `[*N]` the per-position loss, differentiable in the student logits.
      metrics: the per-position metrics.
      teacher_topk_ids: `[*N, K]` the teacher's K most likely token ids (`topk`, `reverse_topk`).
      teacher_topk_logw: `[*N, K]` the teacher's log-probabilities renormalised over those ids, log w
        (`topk`, `reverse_topk`).
      student_topk_logq: `[*N, K]` the student's log-probabilities renormalised over the same ids,
        log q (`reverse_topk`).
      ratio_advantage: `[*N]` r * A, the importance ratio exp(lp_S(y) - lp_old) times the (gradient-free)
        advantage lp_T(y) - lp_old (`importance_sampling`).
    """

    loss: Float[Array, "*N"]
    metrics: TokenMetrics
    teacher_topk_ids: Int[Array, "*N K"] | None = None
    teacher_topk_logw: Float[Array, "*N K"] | None = None
    student_topk_logq: Float[Array, "*N K"] | None = None
    ratio_advantage: Float[Array, "*N"] | None = None


@jax.custom_vjp
def student_logits(hidden: Float[Array, "*N D"], head: LMHead) -> Float[Array, "*N V"]:
    """fp32 logits from hidden states and an LM head of any float dtype.

    The matmul takes the hidden states' dtype, the model's compute dtype (the head is cast to it, as
    every weight of the model is for its matmuls and as `Transformer.logits` casts the head), and
    accumulates in fp32: with fp32 hidden states an fp32 matmul; with bf16 ones a bf16 matmul whose
    products are exact in fp32, so the logits are those of the bf16-rounded head in fp32, without an
    fp32 matmul (an H100 / H200 runs those as TF32, at half its bf16 rate) or an fp32 copy of a bf16
    head.

    The backward keeps the logits' gradient in fp32 (autodiff would round the head's gradient to the
    matmul's dtype, chunk by chunk, before the chunks add up): the head's gradient comes back in fp32
    for an fp32 head, the hidden states' in their dtype.
    """
    return head.astype(hidden.dtype).logits(hidden, preferred_element_type=jnp.float32)


def _student_logits_forward(
    hidden: Float[Array, "*N D"], head: LMHead
) -> tuple[Float[Array, "*N V"], tuple[Float[Array, "*N D"], LMHead, LMHead]]:
    cast = head.astype(hidden.dtype)
    # The stored head rides along for its dtype only (the backward reads `cast`; XLA drops what it never reads).
    return cast.logits(hidden, preferred_element_type=jnp.float32), (hidden, cast, head)


def _student_logits_backward(
    residuals: tuple[Float[Array, "*N D"], LMHead, LMHead], g: Float[Array, "*N V"]
) -> tuple[Float[Array, "*N D"], LMHead]:
    hidden, cast, head = residuals
    d_hidden = cast.hidden_grad(g, preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_head = cast.weight_grad(hidden, g, preferred_element_type=jnp.float32).astype(head.weight.dtype)
    return d_hidden, dataclasses.replace(head, weight=d_head)


student_logits.defvjp(_student_logits_forward, _student_logits_backward)


def teacher_logits(hidden: Float[Array, "*N D"], head: LMHead) -> Float[Array, "*N V"]:
    """`student_logits` without gradient."""
    return jax.lax.stop_gradient(student_logits(hidden, head))


def _take(x: Float[Array, "*N V"], ids: Int[Array, "*N K"]) -> Float[Array, "*N K"]:
    return jnp.take_along_axis(x, ids, axis=-1)


def _take_one(x: Float[Array, "*N V"], ids: Int[Array, "*N"]) -> Float[Array, "*N"]:
    return _take(x, ids[..., None])[..., 0]


def token_terms(
    cfg: LossConfig,
    student_logits: Float[Array, "*N V"],
    teacher_logits: Float[Array, "*N V"] | None,
    targets: Int[Array, "*N"] | None,
    sampler_logprobs: Float[Array, "*N"] | None,
) -> TokenTerms:
    """The loss `cfg.name` at every position, its metrics, and the values its blocked backward needs.

    Args:
      cfg: the loss (`name`, `top_k`, `jsd_beta` are read here).
      student_logits: fp32 student logits.
      teacher_logits: fp32 teacher logits (every loss but `sft`); no gradient flows into them.
      targets: the token ids `importance_sampling` and `sft` score.
      sampler_logprobs: the sampler's log-prob of each target (`importance_sampling`).
    """
    logp_s = jax.nn.log_softmax(student_logits, axis=-1)
    if cfg.name == "sft":
        return TokenTerms(loss=-_take_one(logp_s, targets), metrics=TokenMetrics())

    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    logp_t = jax.nn.log_softmax(teacher_logits, axis=-1)
    p_t = jnp.exp(logp_t)
    forward_kl = jnp.sum(p_t * (logp_t - logp_s), axis=-1)
    kl = jax.lax.stop_gradient(forward_kl)
    teacher_entropy = -jnp.sum(p_t * logp_t, axis=-1)
    topk_mass = None  # a metric of `topk` only
    top_ids = logw = logq = ratio_advantage = None  # what the blocked backward reads, where computed

    if cfg.name == "full_kl":
        loss = forward_kl
    elif cfg.name in ("topk", "reverse_topk"):
        if cfg.top_k > teacher_logits.shape[-1]:
            raise ValueError(f"LossConfig.top_k={cfg.top_k} exceeds the vocabulary size {teacher_logits.shape[-1]}")
        top_vals, top_ids = top_k.top_k(teacher_logits, cfg.top_k)
        top_ids = checkpoint_name(top_ids, "teacher_topk_ids")
        logw = checkpoint_name(jax.nn.log_softmax(top_vals, axis=-1), "teacher_topk_logw")
        logp_s_top = _take(logp_s, top_ids)
        if cfg.name == "topk":
            loss = -jnp.sum(jnp.exp(logw) * logp_s_top, axis=-1)
            topk_mass = jnp.exp(jax.nn.logsumexp(_take(logp_t, top_ids), axis=-1))
        else:
            logq = jax.nn.log_softmax(logp_s_top, axis=-1)
            loss = jnp.sum(jnp.exp(logq) * (logq - logw), axis=-1)
    elif cfg.name == "importance_sampling":
        lp_s = _take_one(logp_s, targets)
        lp_t = checkpoint_name(_take_one(logp_t, targets), "teacher_target_logprob")
        advantage = jax.lax.stop_gradient(lp_t - sampler_logprobs)
        loss = -jnp.exp(lp_s - sampler_logprobs) * advantage
        ratio_advantage = jnp.exp(lp_s - sampler_logprobs) * advantage
    elif cfg.name == "jsd":
        loss = _jsd(cfg.jsd_beta, logp_s, logp_t, p_t, forward_kl)
    else:  # pragma: no cover - LossConfig validates the name
        raise AssertionError(cfg.name)

    metrics = jax.lax.stop_gradient(TokenMetrics(kl=kl, teacher_entropy=teacher_entropy, topk_mass=topk_mass))
    return TokenTerms(loss=loss, metrics=metrics, teacher_topk_ids=top_ids, teacher_topk_logw=logw,
                      student_topk_logq=logq, ratio_advantage=ratio_advantage)


def _jsd(
    beta: float,
    logp_s: Float[Array, "*N V"],
    logp_t: Float[Array, "*N V"],
    p_t: Float[Array, "*N V"],
    forward_kl: Float[Array, "*N"],
) -> Float[Array, "*N"]:
    """beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta * p_T + (1 - beta) * p_S; the endpoints
    are the forward and the reverse KL exactly."""
    p_s = jnp.exp(logp_s)
    if beta == 0.0:
        return forward_kl
    if beta == 1.0:
        return jnp.sum(p_s * (logp_s - logp_t), axis=-1)
    # log M from the two log-probs, so that tokens one side gives probability ~0 stay finite.
    log_m = jnp.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
    kl_t_m = jnp.sum(p_t * (logp_t - log_m), axis=-1)
    kl_s_m = jnp.sum(p_s * (logp_s - log_m), axis=-1)
    return beta * kl_t_m + (1.0 - beta) * kl_s_m
