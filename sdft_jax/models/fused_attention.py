"""Fused attention kernels behind the plain path's interface, chosen by platform.

`attention.causal_attention` (the uncached forward: training and teacher scoring) and the prefill of
`attention.attend_stacked` (a cached forward of several tokens) call `attend` here when the model's
`attention` setting (`Transformer(attention=...)`, the trainer's `config.model.attention`) resolves to a
kernel other than "plain". `select` resolves the setting:

- "plain": `attention.py`'s einsum path: the reference every kernel is tested against, and the CPU
  default (XLA:CPU runs it fastest, in causal query blocks).
- "xla": `jax.nn.dot_product_attention(implementation="xla")`: the same math through JAX's own
  function; any platform, any dtype. It is what the parity tests run on CPU.
- "cudnn": cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`): NVIDIA GPUs,
  bf16 / fp16 only. The score matrix is never stored; causal blocks above the diagonal are skipped.
- "splash": the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), TPU
  only. Its mask is static (causal) and padding is given as segment ids, so it covers the uncached
  forward; a cached prefill (whose visibility depends on the cache's slot index) runs "xla" instead.
- "auto": "cudnn" on a GPU with a bf16 / fp16 compute dtype, "splash" on TPU, else "plain".

Only softmax(Q K^T / sqrt(hd)) V is replaced: the projections, q/k norms, (partial) RoPE and Qwen3.5's
output gate stay in `self_attention.py`, around the call. `ModelConfig` has no logit soft-capping and
refuses sliding-window models, so every model it describes can use every kernel.

Rows of padding: a query that is padding sees no key in the plain path (its row is uniform, finite);
the kernels may give such rows other finite values (splash: attention among the padding). No real
token's output depends on them, and losses never count them.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Bool, Float

from sdft_jax.models.sharding import active_mesh, logical_to_spec
from sdft_jax.validation import check_choice

Implementation = Literal["auto", "plain", "xla", "cudnn", "splash"]  # the setting
Kernel = Literal["plain", "xla", "cudnn", "splash"]  # what it resolves to on a platform
IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(Implementation)
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # what cuDNN's flash attention takes
SPLASH_TILE = 128  # splash attention's sequence lengths are padded to a multiple of this


def select(implementation: str, *, platform: str, dtype) -> Kernel:
    """The kernel that `implementation` means on `platform` (`jax.default_backend()`: "cpu", "gpu",
    "tpu") for a model computing in `dtype`. An explicit kernel the platform or dtype cannot run is
    refused, naming why."""
    check_choice("attention", implementation, IMPLEMENTATIONS)
    half = jnp.dtype(dtype) in HALF_DTYPES
    if implementation == "auto":
        if platform == "gpu" and half:
            return "cudnn"
        return "splash" if platform == "tpu" else "plain"
    if implementation == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention 'cudnn' is cuDNN flash attention, on NVIDIA GPUs; this program runs on "
                             f"{platform} (use 'auto', 'xla' or 'plain')")
        if not half:
            raise ValueError(f"attention 'cudnn' runs bf16 / fp16 only; the model computes in {jnp.dtype(dtype).name} "
                             "(set the compute dtype to bfloat16, or use 'auto' / 'xla')")
    if implementation == "splash" and platform != "tpu":
        raise ValueError(f"attention 'splash' is a Pallas TPU kernel; this program runs on {platform} "
                         "(use 'auto', 'xla' or 'plain')")
    return implementation


def attend(
    q: Float[Array, "B T Hkv G hd"],
    k: Float[Array, "B S Hkv hd"],
    v: Float[Array, "B S Hkv hd"],
    visible: Bool[Array, "B T S"],
    *,
    kernel: Kernel,
    causal: bool,
) -> Float[Array, "B T Hkv G hd"]:
    """`attention.attention(q, k, v, visible)` by a fused `kernel` ("xla", "cudnn", "splash").

    `causal`: `visible` is `attention.causal_visibility` of a sequence over itself (query i sees the real
    keys j <= i), which lets cuDNN skip the blocks above the diagonal and splash use its causal mask
    with the padding as segment ids. Otherwise `visible` may be any pattern (a cache's slots).
    """
    if kernel == "plain":
        raise ValueError("attend runs the fused kernels; the plain path is attention.attention")
    if kernel == "splash" and causal:
        return splash_attention(q, k, v, key_mask=jnp.diagonal(visible, axis1=1, axis2=2))
    if kernel == "splash":
        kernel = "xla"  # splash's masks are static; a cache's visibility is not
    return dot_product_attention(q, k, v, visible, implementation=kernel, causal=causal)


def dot_product_attention(
    q: Float[Array, "B T Hkv G hd"],
    k: Float[Array, "B S Hkv hd"],
    v: Float[Array, "B S Hkv hd"],
    visible: Bool[Array, "B T S"],
    *,
    implementation: Literal["xla", "cudnn"],
    causal: bool,
) -> Float[Array, "B T Hkv G hd"]:
    """`jax.nn.dot_product_attention` of the grouped queries (query head `h * G + g` reads KV head `h`,
    the grouping of both) under the boolean mask `visible`.

    cuDNN takes the mask as a bias over every (query, key) pair, which it refuses in training for odd
    lengths: an odd T or S gets one more invisible key / query, sliced off after.
    """
    B, T, Hkv, G, hd = q.shape
    S = k.shape[1]
    pad_t, pad_s = (T % 2, S % 2) if implementation == "cudnn" else (0, 0)
    if pad_t or pad_s:
        q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k, v))
        visible = jnp.pad(visible, ((0, 0), (0, pad_t), (0, pad_s)))
        if causal and T + pad_t != S + pad_s:
            causal = False  # the padded mask still holds the causal pattern; only the block skipping is lost
    out = jax.nn.dot_product_attention(q.reshape(B, T + pad_t, Hkv * G, hd), k, v, mask=visible[:, None],
                                       is_causal=causal, implementation=implementation)
    return out[:, :T].reshape(B, T, Hkv, G, hd)


def splash_attention(
    q: Float[Array, "B T Hkv G hd"],
    k: Float[Array, "B T Hkv hd"],
    v: Float[Array, "B T Hkv hd"],
    key_mask: Bool[Array, "B T"],
    *,
    interpret: bool = False,
) -> Float[Array, "B T Hkv G hd"]:
    """Causal self-attention of a padded sequence by the Pallas splash kernel: real query i sees the
    real keys j <= i (`key_mask` marks real tokens), as `attention.causal_visibility` says.

    One kernel per KV head serves its G query heads (splash's MQA form), mapped over rows and KV heads.
    Padding tokens get segment id 0 and real ones 1 (splash attends within a segment), so a padding
    query attends among the padding (finite, never read). The length is padded to a multiple of
    `SPLASH_TILE` the same way. Under an `activation_sharding` mesh the kernel runs per device in a
    `shard_map` (a Pallas call is not partitioned automatically), rows over the batch axes and KV heads
    over the tensor axis where they divide. `interpret`: Pallas's interpreter (runs on CPU, for tests).
    """
    T = q.shape[1]
    padded = -(-T // SPLASH_TILE) * SPLASH_TILE
    if padded != T:
        extra = padded - T
        q = jnp.pad(q, ((0, 0), (0, extra), (0, 0), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) for x in (k, v))
        key_mask = jnp.pad(key_mask, ((0, 0), (0, extra)))
    segments = key_mask.astype(jnp.int32)

    def local(q, k, v, segments):
        return _splash_local(q, k, v, segments, interpret=interpret)

    context = active_mesh()
    if context is not None:
        mesh, rules = context
        rows, _, heads, _, _ = logical_to_spec(("batch", "length", "kv_heads", None, "head_dim"), q.shape, mesh, rules)
        local = jax.shard_map(local, mesh=mesh, out_specs=PartitionSpec(rows, None, heads),
                              in_specs=(PartitionSpec(rows, None, heads), PartitionSpec(rows, None, heads),
                                        PartitionSpec(rows, None, heads), PartitionSpec(rows)), check_vma=False)
    return local(q, k, v, segments)[:, :T]


def _splash_local(q, k, v, segments, *, interpret: bool):
    """`splash_attention` on one device's arrays (lengths already a multiple of `SPLASH_TILE`)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, Hkv, G, hd = q.shape
    block = math.gcd(T, 512)  # 128, 256 or 512: the largest tile up to 512 that divides the length
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((T, T)) for _ in range(G)])
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    # splash does not scale the scores: scale the queries. [B, Hkv, G, T, hd] and [B, Hkv, T, hd].
    queries = (q * hd**-0.5).astype(q.dtype).transpose(0, 2, 3, 1, 4)
    keys, values = (x.transpose(0, 2, 1, 3) for x in (k, v))
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0))
    out = per_row(queries, keys, values, splash.SegmentIds(q=segments, kv=segments))
    return out.transpose(0, 3, 1, 2, 4)
