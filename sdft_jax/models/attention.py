"""Rotary position embeddings, grouped-query attention, and the KV cache.

Attention is written with einsums over `[B, T, kv_heads, groups, head_dim]` so grouped-query
attention never repeats K/V. Scores and softmax are fp32. Masks are finite (a large negative number,
not -inf), so a query with no visible key (left padding) yields a harmless uniform row, never NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sdft_jax.models import fused_attention
from sdft_jax.models.config import ModelConfig, RopeScaling
from sdft_jax.models.gated_deltanet import DeltaNetState
from sdft_jax.pytrees import pytree_dataclass

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# The arrays one layer's attention works on. B rows, T new tokens (queries), S key slots, Hkv KV heads,
# G query heads per KV head, hd the head dimension.
Queries = Float[Array, "B T Hkv G hd"]
NewKeys = Float[Array, "B T Hkv hd"]  # the new tokens' keys, or their values
Visibility = Bool[Array, "B T S"]  # which key slots each query sees
RopeTables = tuple[Float[Array, "B T half"], Float[Array, "B T half"]]  # `rope_tables`' (cos, sin)

# A cache's attention for one layer, `(q, k, v, visible) -> (out, the layer's new cache buffers)`: writes
# the new keys and values into the cache, then attends over its slots (`attend_stacked`, `attend_layer`).
CacheAttention = Callable[[Queries, NewKeys, NewKeys, Visibility], tuple[Queries, tuple[Array, Array]]]


def rope_inv_freq(cfg: ModelConfig) -> Float[Array, "half"]:
    """Inverse frequencies of RoPE over the rotated dims (`cfg.rotary_dim`), with Llama-3 or linear
    scaling where the config has it."""
    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    return _llama3_scale(inv, scaling)


def _llama3_scale(inv: Float[Array, "half"], s: RopeScaling) -> Float[Array, "half"]:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    interpolated = (1 - smooth) * inv / s.factor + smooth * inv
    out = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(medium, interpolated, out)


def rope_tables(positions: Int[Array, "B T"], inv_freq: Float[Array, "half"]) -> RopeTables:
    """`(cos, sin)` of each token's rotation angles, fp32, for `apply_rope`: made once per forward,
    outside the layer scan, and read by every layer (not recomputed per layer and head)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B T H hd"], tables: RopeTables) -> Float[Array, "B T H hd"]:
    """Rotates pairs (i, i + r/2) of the first r dims by `rope_tables`' angles (r = 2 x the tables' last
    dim: all of hd, or fewer with partial rotary, the rest passed through): the HF "rotate_half"
    convention that HF checkpoints are stored in."""
    cos, sin = (t[:, :, None, :].astype(x.dtype) for t in tables)
    rotary = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass], axis=-1)


CacheT = TypeVar("CacheT", bound="CacheSlots")


class CacheSlots:
    """The slot bookkeeping both cache layouts share (`KVCache`, `LayerKVCache`): which slots hold a
    real token (`valid [B, S]`) and where the next token goes (`index`, one slot shared by all rows).

    A cached forward of T tokens `reserve`s slots `index .. index + T - 1` for them, runs its layers
    (each writes its keys and values there), then `commit`s the layers' buffers and moves the index on.
    """

    valid: Bool[Array, "B S"]
    index: Int[Array, ""]

    @property
    def max_len(self) -> int:
        """The number of slots."""
        return self.valid.shape[1]

    def reserve(self: CacheT, input_mask: Bool[Array, "B T"]) -> tuple[CacheT, Visibility]:
        """Marks the next T slots valid where `input_mask` is (False: padding, never seen), and says
        which slots each of the T new tokens sees: its own and the valid ones before it.

        One new token (T = 1, a decode step) sees every valid slot of its row: a cache holds only a
        row's earlier tokens, in whatever slots. So a cache may be used as a ring, its index wrapped
        round (`sampling.continuous`), where a row's earlier tokens also lie after the index."""
        valid = jax.lax.dynamic_update_slice(self.valid, input_mask, (0, self.index))
        if input_mask.shape[1] == 1:
            return dataclasses.replace(self, valid=valid), valid[:, None, :]
        visible = causal_visibility(self.index + jnp.arange(input_mask.shape[1]), valid)
        return dataclasses.replace(self, valid=valid), visible

    def commit(self: CacheT, k: Array | tuple[Array, ...], v: Array | tuple[Array, ...], count: int,
               linear=None) -> CacheT:
        """The cache holding the layers' new buffers `k` and `v` (and the Gated DeltaNet layers' new
        states `linear`), its index moved past the `count` new tokens."""
        return dataclasses.replace(self, k=k, v=v, linear=linear, index=self.index + count)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache(CacheSlots):
    """Keys and values of every attention layer for a batch, stacked over a leading layers axis, and a
    hybrid model's Gated DeltaNet states (`linear`, stacked over those layers; None without them).

    Row b's token in slot s is visible iff `valid[b, s]`; positions (for RoPE) are per row and
    independent of slots, so left-padded prompts of different lengths share one write index.
    """

    k: Float[Array, "L B S Hkv hd"]
    v: Float[Array, "L B S Hkv hd"]
    valid: Bool[Array, "B S"]
    index: Int[Array, ""]  # next slot to write
    linear: DeltaNetState | None = None

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.attention_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        linear = None
        if cfg.deltanet is not None:
            one = DeltaNetState.zeros(batch, cfg.deltanet, dtype)
            linear = jax.tree.map(lambda a: jnp.zeros((len(cfg.linear_layers), *a.shape), a.dtype), one)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
            linear=linear,
        )


def attention(
    q: Queries, k: Float[Array, "B S Hkv hd"], v: Float[Array, "B S Hkv hd"], visible: Visibility
) -> Queries:
    """Softmax attention (fp32 scores) of grouped queries over shared K/V heads."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.einsum("bkgts,bskd->btkgd", _probs(scores, q.shape[-1], visible, v.dtype), v)


MAX_QUERY_BLOCKS = 16


def causal_attention(
    q: Float[Array, "B T Hkv G hd"],
    k: Float[Array, "B T Hkv hd"],
    v: Float[Array, "B T Hkv hd"],
    visible: Bool[Array, "B T T"],
    *,
    query_block: int,
    kernel: fused_attention.Kernel = "plain",
) -> Float[Array, "B T Hkv G hd"]:
    """`attention` of a sequence over itself when `visible` is causal (no query sees a later key),
    computed in blocks of queries, each over only the keys up to its last query; or, with a `kernel`
    other than "plain", by that fused kernel (`fused_attention.attend`, `query_block` unused).

    The keys after a block are invisible to all of its queries, so skipping them changes nothing
    but the work: about half the scores of a long sequence are never computed, and on XLA:CPU the
    smaller score blocks stay in cache (docs/benchmarks.md has the measurements). Blocks are
    `query_block` queries, or more when that would make over `MAX_QUERY_BLOCKS` of them (each block
    is its own pair of matmuls in the program); `query_block` 0 computes one block, i.e. `attention`.
    """
    T = q.shape[1]
    if visible.shape[1:] != (T, k.shape[1]) or k.shape[1] != T:
        raise ValueError(f"causal_attention attends a sequence over itself: queries {T}, keys {k.shape[1]}, "
                         f"visible {visible.shape}")
    if kernel != "plain":
        return fused_attention.attend(q, k, v, visible, kernel=kernel, causal=True)
    blocks = query_blocks(T, query_block)
    if len(blocks) == 1:
        return attention(q, k, v, visible)
    outs = [attention(q[:, start:end], k[:, :end], v[:, :end], visible[:, start:end, :end]) for start, end in blocks]
    return jnp.concatenate(outs, axis=1)


def query_blocks(length: int, query_block: int) -> list[tuple[int, int]]:
    """`causal_attention`'s blocks of a sequence, `[start, end)` each: `query_block` queries (the last
    block ragged), larger when that would make over `MAX_QUERY_BLOCKS`; one block when `query_block` is 0."""
    block = max(query_block, -(-length // MAX_QUERY_BLOCKS)) if query_block else length
    return [(start, min(length, start + block)) for start in range(0, length, block)]


def _probs(
    scores: Float[Array, "B Hkv G T S"], head_dim: int, visible: Visibility, dtype
) -> Float[Array, "B Hkv G T S"]:
    """Softmax over the visible keys of the scaled scores, in `dtype`."""
    scores = jnp.where(visible[:, None, None, :, :], scores * head_dim**-0.5, _MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def attend_stacked(
    q: Queries, k: NewKeys, v: NewKeys, visible: Visibility, *,
    k_all: Float[Array, "L B S Hkv hd"], v_all: Float[Array, "L B S Hkv hd"], layer: Int[Array, ""], slot: Int[Array, ""],
    kernel: fused_attention.Kernel = "plain",
) -> tuple[Queries, tuple[Float[Array, "L B S Hkv hd"], Float[Array, "L B S Hkv hd"]]]:
    """A `CacheAttention` over layer `layer` of a `KVCache`'s stacked buffers `k_all`, `v_all`: writes the
    new keys and values at `slot`, then attends over the layer's slots (a prefill of several tokens by
    the fused `kernel` when it is not "plain"; one decoded token always by the plain path)."""
    start = (layer, 0, slot, 0, 0)
    k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
    v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
    keys, values = k_all[layer].astype(q.dtype), v_all[layer].astype(q.dtype)
    if kernel != "plain" and q.shape[1] > 1:
        return fused_attention.attend(q, keys, values, visible, kernel=kernel, causal=False), (k_all, v_all)
    return attention(q, keys, values, visible), (k_all, v_all)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKVCache(CacheSlots):
    """The KV cache as one buffer per layer, rows and KV heads merged, keys stored transposed: the
    decoding layout on CPU.

    Keys are `[B * Hkv, hd, S]` and values `[B * Hkv, S, hd]` (row b's head h at `b * Hkv + h`), so
    both attention matmuls of a decode step read a layer's buffer as it lies, with no size-1 axis to
    squeeze. Read out of the stacked `[L, B, S, Hkv, hd]` cache inside a scan, XLA:CPU copies (and
    transposes) every layer's keys and values at every decode step; with a separate batch axis, at
    batch 1 it squeezes that axis out of the matmul operand and copies every buffer several times per
    step (docs/benchmarks.md). Same `valid` / `index` meaning as `KVCache`.
    """

    k: tuple[Float[Array, "BHkv hd S"], ...]
    v: tuple[Float[Array, "BHkv S hd"], ...]
    valid: Bool[Array, "B S"]
    index: Int[Array, ""]
    linear: tuple[DeltaNetState, ...] | None = None  # each Gated DeltaNet layer's state

    @classmethod
    def from_stacked(cls, cache: KVCache) -> LayerKVCache:
        L, B, S, Hkv, hd = cache.k.shape
        linear = None
        if cache.linear is not None:
            count = cache.linear.recurrent.shape[0]
            linear = tuple(jax.tree.map(lambda a, i=i: a[i], cache.linear) for i in range(count))
        return cls(k=tuple(cache.k[i].transpose(0, 2, 3, 1).reshape(B * Hkv, hd, S) for i in range(L)),
                   v=tuple(cache.v[i].transpose(0, 2, 1, 3).reshape(B * Hkv, S, hd) for i in range(L)),
                   valid=cache.valid, index=cache.index, linear=linear)


def attend_layer(
    q: Queries, k: NewKeys, v: NewKeys, visible: Visibility, *,
    k_cache: Float[Array, "BHkv hd S"], v_cache: Float[Array, "BHkv S hd"], slot: Int[Array, ""],
) -> tuple[Queries, tuple[Float[Array, "BHkv hd S"], Float[Array, "BHkv S hd"]]]:
    """A `CacheAttention` over one layer's buffers `k_cache`, `v_cache` of a `LayerKVCache`: writes the new
    keys and values at `slot`, then attends over the layer's slots."""
    B, T, Hkv, G, hd = q.shape
    S = k_cache.shape[-1]
    k_new = k.transpose(0, 2, 3, 1).reshape(B * Hkv, hd, T).astype(k_cache.dtype)
    v_new = v.transpose(0, 2, 1, 3).reshape(B * Hkv, T, hd).astype(v_cache.dtype)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, (0, 0, slot))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, (0, slot, 0))
    keys, values = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    if T == 1:
        # One query per row (decoding): as batched matmuls over the merged (row, head) axis, the
        # buffers' own layout (with a length axis of 1, XLA:CPU runs slow generic dots).
        scores = jnp.einsum("ngd,nds->ngs", q.reshape(B * Hkv, G, hd), keys, preferred_element_type=jnp.float32)
        probs = _probs(scores.reshape(B, Hkv, G, 1, S), hd, visible, q.dtype).reshape(B * Hkv, G, S)
        return jnp.einsum("ngs,nsd->ngd", probs, values).reshape(B, 1, Hkv, G, hd), (k_cache, v_cache)
    scores = jnp.einsum("btkgd,bkds->bkgts", q, keys.reshape(B, Hkv, hd, S), preferred_element_type=jnp.float32)
    out = jnp.einsum("bkgts,bksd->btkgd", _probs(scores, hd, visible, q.dtype), values.reshape(B, Hkv, S, hd))
    return out, (k_cache, v_cache)


def causal_visibility(query_slots: Int[Array, "T"], key_valid: Bool[Array, "B S"]) -> Visibility:
    """Query at slot i sees key slot j iff j <= i and key j is a real token."""
    key_slots = jnp.arange(key_valid.shape[1])
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    return causal[None] & key_valid[:, None, :]
