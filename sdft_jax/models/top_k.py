"""Top-K along the last axis (a vocabulary of logits, a router's experts), exactly `jax.lax.top_k`: the same
values and ids in the same order, ties to the lower id. `jax.lax.top_k` itself is the plain reference and
what CPU and TPU programs run; `top_k` computes it another way on GPU, for two reasons:

- XLA:GPU runs a top-K with K > 16 as a sort of each whole row (its top-K kernel stops at K = 16; SDFT's K
  is 20): for one loss chunk of [256 tokens, 151,936] teacher logits, a 39M-element key-value sort.
- The SPMD partitioner of XLA:GPU (and XLA:CPU) does not split a top-K along its batch dimensions: with the
  rows sharded over data / fsdp, every device all-gathers the whole operand (every row's logits of the
  loss chunk, a router's probabilities for every token of the batch) and selects for every row. A sort it
  splits. libtpu's partitioner splits a top-K too (checked with `bench plan --compiler tpu`).

`sorted_top_k` is a stable sort of each row. `grouped_top_k`, for long rows, cuts each row into groups of
`GROUP` consecutive ids and keeps the K groups with the largest maxima: only they can hold the row's top K
(an element of any other group comes after those K groups' maxima, K elements ahead of it). It then sorts
their K x GROUP elements, laid out in id order so that ties still go to the lower id: one pass over the row
(a max per group) and two sorts of short rows, [*, V / GROUP] and [*, K * GROUP]. Every comparison is in
the total order `jax.lax.top_k` uses (NaN above +inf, -0.0 below 0.0), on order-preserving unsigned keys
(`order_keys`). XLA:CPU runs both far slower than its own top-K (a sort, integer reductions), so a CPU
program never takes them. tests/models/top_k_test.py: the parity (values, ids, ties, NaN, padding,
gradients) and the collectives on 8 fake devices; `python -m sdft_jax.bench top_k` times them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt

from sdft_jax.models.sharding import target_platform

GROUP = 128  # consecutive ids per group of `grouped_top_k`
MIN_GROUPS = 4  # `top_k` groups a row of at least MIN_GROUPS x K groups (its candidates <= 1/4 of the row)

_UNSIGNED = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def order_keys(x: Float[Array, "*N V"]) -> UInt[Array, "*N V"]:
    """Unsigned integers of `x`'s width in the same order as its float values under the total order
    (-NaN < -inf < ... < -0.0 < 0.0 < ... < inf < NaN): the sign bit set on non-negative floats, every bit
    flipped on negative ones."""
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize not in _UNSIGNED:
        raise TypeError(f"order_keys: a float16/bfloat16/float32/float64 array expected, got {x.dtype}")
    unsigned = _UNSIGNED[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned)
    sign = jnp.array(1 << (8 * x.dtype.itemsize - 1), unsigned)
    return jnp.where(bits & sign, ~bits, bits | sign)


def _sorted_ids(keys: UInt[Array, "*N L"], k: int) -> Int[Array, "*N K"]:
    """The positions of the k largest keys, largest first, equal keys in position order."""
    position = jax.lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
    # Ascending in ~key is descending in key; the stable sort keeps equal keys in position order.
    _, order = jax.lax.sort((~keys, position), dimension=keys.ndim - 1, num_keys=1, is_stable=True)
    return order[..., :k]


def _check(x: Array, k: int) -> None:
    if not 1 <= k <= x.shape[-1]:
        raise ValueError(f"top_k: k={k} must be in [1, {x.shape[-1]}] (the last axis' length)")


def sorted_top_k(x: Float[Array, "*N V"], k: int) -> tuple[Float[Array, "*N K"], Int[Array, "*N K"]]:
    """`jax.lax.top_k(x, k)` as a stable sort of each whole row."""
    _check(x, k)
    ids = _sorted_ids(order_keys(x), k)
    return jnp.take_along_axis(x, ids, axis=-1), ids


def grouped_top_k(x: Float[Array, "*N V"], k: int, *, group: int = GROUP
                  ) -> tuple[Float[Array, "*N K"], Int[Array, "*N K"]]:
    """`jax.lax.top_k(x, k)` from the K groups of `group` consecutive ids with the largest maxima (the module
    docstring says why that is exact). Needs at least K groups."""
    _check(x, k)
    *lead, v = x.shape
    groups = -(-v // group) if group >= 1 else 0
    if groups < k:
        raise ValueError(f"grouped_top_k: {v} ids in groups of {group} make fewer than k={k} groups")
    keys = order_keys(x)
    if groups * group != v:  # padded with the lowest key: after every real id it ties with
        keys = jnp.pad(keys, [(0, 0)] * len(lead) + [(0, groups * group - v)])
    by_group = keys.reshape(*lead, groups, group)
    # The K groups with the largest maxima (ties: the lower group), in id order.
    chosen = jnp.sort(_sorted_ids(jnp.max(by_group, axis=-1), k), axis=-1)
    candidates = jnp.take_along_axis(by_group, chosen[..., None], axis=-2).reshape(*lead, k * group)
    position = _sorted_ids(candidates, k)
    ids = jnp.take_along_axis(chosen, position // group, axis=-1) * group + position % group
    return jnp.take_along_axis(x, ids, axis=-1), ids


def top_k(x: Float[Array, "*N V"], k: int) -> tuple[Float[Array, "*N K"], Int[Array, "*N K"]]:
    """`jax.lax.top_k(x, k)`, values and ids the same to the bit, for the platform traced for
    (`sharding.target_platform`): on GPU `grouped_top_k` for a row of at least `MIN_GROUPS` x K groups of
    `GROUP`, `sorted_top_k` for a shorter one; elsewhere `jax.lax.top_k` itself. Differentiable in `x` as
    `lax.top_k` is (the values are `x` at the ids)."""
    _check(x, k)
    if target_platform() != "gpu":
        return tuple(jax.lax.top_k(x, k))
    if x.shape[-1] >= MIN_GROUPS * k * GROUP:
        return grouped_top_k(x, k)
    return sorted_top_k(x, k)
