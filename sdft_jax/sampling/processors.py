"""Next-token distributions: temperature, top-k, top-p, drawing a token and its two log-probs.

Two distributions matter for every sampled token:
- the *model* distribution, `log_softmax(logits)` at temperature 1 with nothing cut: what SDFT's
  importance-sampling loss needs as the old policy's log-prob (`lp_old`);
- the *sampling* distribution the token was actually drawn from: logits divided by the temperature,
  then tokens outside the top-k and outside the top-p nucleus removed, renormalised.
At temperature 1, top_p 1 and top_k 0 (SDFT's rollout settings) the two are the same.

Temperature 0 means greedy: the token is the argmax of the logits, and its sampling log-prob is 0
(the greedy "distribution" puts all its mass on that token).

The settings are plain Python numbers: they shape the computation (the top-k and top-p passes
exist only when those are on), so a jitted caller treats them as static.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Key, UInt32

from sdft_jax.models.top_k import order_keys
from sdft_jax.validation import check_int, check_number


def check_settings(*, temperature: float, top_p: float, top_k: int, prefix: str = "") -> None:
    """Raises a ValueError naming the first setting out of range (as `prefix` + its name, e.g.
    `SamplingConfig.top_p`)."""
    check_number(f"{prefix}temperature", temperature, low=0, hint="0 = greedy")
    check_number(f"{prefix}top_p", top_p, low=0, high=1, low_open=True)
    check_int(f"{prefix}top_k", top_k, minimum=0, hint="0 = off")


def is_identity(*, temperature: float, top_p: float, top_k: int) -> bool:
    """Whether the sampling distribution is the model distribution itself."""
    return temperature == 1 and top_p == 1 and top_k == 0


def sampling_logits(
    logits: Float[Array, "*B V"], *, temperature: float, top_p: float = 1.0, top_k: int = 0
) -> Float[Array, "*B V"]:
    """Unnormalised log-probs of the sampling distribution (fp32); removed tokens are -inf.

    Order as in `transformers`: temperature, then top-k, then top-p over what top-k kept. Top-k
    keeps every token at least as likely as the k-th; top-p keeps the most likely tokens until their
    mass reaches top_p, and every token tied with the last one kept. So the result never depends on
    how ties are ordered.
    """
    check_settings(temperature=temperature, top_p=top_p, top_k=top_k)
    if temperature == 0:
        raise ValueError("temperature 0 (greedy) has no sampling distribution to compute")
    x = logits.astype(jnp.float32) / jnp.float32(temperature)
    if 0 < top_k < x.shape[-1]:
        keys = jax.lax.optimization_barrier(order_keys(x))
        kth = _largest_threshold(keys, lambda keep: jnp.sum(keep, axis=-1, dtype=jnp.int32) >= top_k)
        x = jnp.where(keys >= kth, x, -jnp.inf)
    if top_p < 1:
        # The barrier materialises probs and keys once; fused into the 32 passes of `_largest_threshold`
        # they would be recomputed in each.
        probs = jnp.exp(x - jax.nn.logsumexp(x, axis=-1, keepdims=True))
        probs, keys = jax.lax.optimization_barrier((probs, order_keys(probs)))
        last = _largest_threshold(keys, lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), axis=-1) >= top_p)
        x = jnp.where(keys >= last, x, -jnp.inf)
    return x


def _largest_threshold(
    keys: UInt32[Array, "*B V"], enough: Callable[[Bool[Array, "*B V"]], Bool[Array, "*B"]]
) -> UInt32[Array, "*B 1"]:
    """Per row, the largest key t for which `enough(keys >= t)` holds (it must hold for t = 0 and
    must only turn false as t grows).

    Built bit by bit from the top: 32 passes over the row, each a fused compare-and-reduce, which on
    XLA:CPU is far faster than a sort or `lax.top_k` over a whole vocabulary (docs/benchmarks.md).
    """
    def bit(i, t):
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(enough(keys >= candidate)[..., None], candidate, t)

    start = jnp.zeros((*keys.shape[:-1], 1), jnp.uint32)
    return jax.lax.fori_loop(0, 32, bit, start)


def sample_tokens(
    noise: Float[Array, "B 2"] | None, logits: Float[Array, "B V"], *, temperature: float, top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[Int[Array, "B"], Float[Array, "B"], Float[Array, "B"]]:
    """One token per row, drawn with that row's `noise` (from `noise_for`; unused when greedy).

    Returns `(tokens, sampling_logprobs, model_logprobs)`: the log-prob of each token under the
    sampling distribution (0 when greedy) and under the plain model distribution (fp32).
    """
    check_settings(temperature=temperature, top_p=top_p, top_k=top_k)
    logits = logits.astype(jnp.float32)
    model_lse = jax.nn.logsumexp(logits, axis=-1)
    if temperature == 0:
        tokens = argmax(logits)
        return tokens, jnp.zeros(tokens.shape, jnp.float32), _at(logits, tokens) - model_lse
    if is_identity(temperature=temperature, top_p=top_p, top_k=top_k):
        tokens = draw(noise, logits)
        lp = _at(logits, tokens) - model_lse
        return tokens, lp, lp
    processed = sampling_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    tokens = draw(noise, processed)
    sampling_lp = _at(processed, tokens) - jax.nn.logsumexp(processed, axis=-1)
    return tokens, sampling_lp, _at(logits, tokens) - model_lse


def noise_for(keys: Key[Array, "B"], steps: int | None = None) -> Float[Array, "B *N 2"]:
    """The uniform random numbers `draw` consumes: per row (one key each), for one draw or `steps` draws.

    A decode loop takes all of them before it starts, so no random-number generation (a long chain
    of integer ops in XLA) runs or compiles inside the loop.
    """
    shape = (2,) if steps is None else (steps, 2)
    return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32))(keys)


def argmax(logits: Float[Array, "B V"]) -> Int[Array, "B"]:
    """`argmax` over the last axis (lowest index on ties), as two plain reductions: a max, then a min
    over the indices that reach it. XLA:CPU runs `jnp.argmax`'s pair-valued reduction much slower
    (docs/benchmarks.md).
    """
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits == best, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


_BLOCK = 256


def draw(noise: Float[Array, "B 2"], logits: Float[Array, "B V"]) -> Int[Array, "B"]:
    """One token per row from `softmax(logits)` (-inf = never), using the row's two uniforms in `noise`.

    Two-stage inverse-CDF sampling: a block of 256 tokens with probability proportional to its
    mass, then a token within it. Exact up to fp32 rounding (each stage's uniform has 2^-23
    resolution over at most a few hundred outcomes), and it needs two random numbers per row where
    Gumbel-max (`jax.random.categorical`) needs one per vocabulary entry (docs/benchmarks.md compares them).
    """
    batch, vocab = logits.shape
    pad = -vocab % _BLOCK
    if pad:
        logits = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    blocks = logits.reshape(batch, -1, _BLOCK)
    top = jnp.max(logits, axis=-1)[:, None, None]
    block_mass = jnp.sum(jnp.exp(blocks - top), axis=-1)  # [B, n_blocks]
    block = _inverse_cdf(block_mass, noise[:, 0])
    inside = jnp.exp(jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0] - top[:, 0])  # [B, BLOCK]
    return (block * _BLOCK + _inverse_cdf(inside, noise[:, 1])).astype(jnp.int32)


def _inverse_cdf(mass: Float[Array, "B K"], u: Float[Array, "B"]) -> Int[Array, "B"]:
    """Index i with probability mass[i] / sum(mass), given u ~ U[0, 1)."""
    cdf = jnp.cumsum(mass, axis=-1)
    index = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
    # Rounding can only push the index past the end; the last entry with mass is the right one then.
    positions = jnp.arange(mass.shape[-1])
    last = jnp.max(jnp.where(mass > 0, positions, 0), axis=-1)
    return jnp.minimum(index, last)


def _at(values: Float[Array, "B V"], tokens: Int[Array, "B"]) -> Float[Array, "B"]:
    """Each row's value at its token."""
    return jnp.take_along_axis(values, tokens[:, None], axis=-1)[:, 0]
