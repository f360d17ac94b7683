"""RMSNorm, the normalisation of every family here (layer inputs, q / k heads, the final norm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, "D"], eps: float, *,
             zero_centered: bool = False) -> Float[Array, "... D"]:
    """RMSNorm in fp32, cast back before the weight (Llama / Qwen2 / Qwen3, as HF does); with
    `zero_centered` (Qwen3.5), the gain is `1 + weight` and applied in fp32 before the cast."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if zero_centered:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)
