"""The attention token mixer: grouped-query self-attention with RoPE, the family's q/k/v/o biases and
q/k RMSNorm (Qwen3), over this call's tokens or a KV cache (the kernels are in `attention.py`).

Qwen3.5's gated full attention is this mixer with `ModelConfig.attention_output_gate` (a second
projection `q_gate_proj`, HF's q_proj rows interleaved per head with the queries, whose sigmoid
scales each head's output before `o_proj`), partial rotary and zero-centered q/k norms.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jaxtyping import Array, Float

from sdft_jax.models import attention as attn
from sdft_jax.models import fused_attention
from sdft_jax.models import lora as lora_lib
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.norm import rms_norm

Shapes = dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]


def param_shapes(cfg: ModelConfig) -> Shapes:
    """One layer's attention weight name -> (shape, logical axes); projections `[in, out]` with heads split."""
    D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes: Shapes = {
        "q_proj": ((D, H, E), ("embed", "q_heads", "head_dim")),
        "k_proj": ((D, K, E), ("embed", "kv_heads", "head_dim")),
        "v_proj": ((D, K, E), ("embed", "kv_heads", "head_dim")),
        "o_proj": ((H, E, D), ("q_heads", "head_dim", "embed")),
    }
    if cfg.qkv_bias:
        shapes["q_bias"] = ((H, E), ("q_heads", "head_dim"))
        shapes["k_bias"] = ((K, E), ("kv_heads", "head_dim"))
        shapes["v_bias"] = ((K, E), ("kv_heads", "head_dim"))
    if cfg.o_bias:
        shapes["o_bias"] = ((D,), ("embed",))
    if cfg.qk_norm:
        shapes["q_norm"] = ((E,), ("head_dim",))
        shapes["k_norm"] = ((E,), ("head_dim",))
    if cfg.attention_output_gate:
        shapes["q_gate_proj"] = ((D, H, E), ("embed", "q_heads", "head_dim"))
    return shapes


def self_attention(x: Float[Array, "B T D"], w: Mapping[str, Array], rope: attn.RopeTables, visible: attn.Visibility,
                   kv: attn.CacheAttention | None, *, cfg: ModelConfig, lora: lora_lib.LoraConfig | None,
                   query_block: int, attention: fused_attention.Kernel = "plain",
                   ) -> tuple[Float[Array, "B T D"], tuple[Array, Array] | None]:
    """Self-attention of the normed `x` by one layer's weights `w`.

    `kv` is None (attend among this call's tokens, causally, in blocks of `query_block` queries, or by
    the fused kernel `attention`; see `attention.causal_attention`) or a cache's
    `attention.CacheAttention`, which writes the new keys and values and attends over the cache; its
    new buffers are returned beside the output.
    """
    B, T, _ = x.shape
    q, k, v = (lora_lib.project_named(x, w, name, lora) for name in ("q_proj", "k_proj", "v_proj"))
    if cfg.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps, zero_centered=cfg.zero_centered_norms)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps, zero_centered=cfg.zero_centered_norms)
    q = attn.apply_rope(q, rope)
    k = attn.apply_rope(k, rope)
    q = q.reshape(B, T, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)
    if kv is None:
        out, new_kv = attn.causal_attention(q, k, v, visible, query_block=query_block, kernel=attention), None
    else:
        out, new_kv = kv(q, k, v, visible)
    out = out.reshape(B, T, cfg.num_heads, cfg.head_dim)
    if cfg.attention_output_gate:
        out = out * jax.nn.sigmoid(lora_lib.project_named(x, w, "q_gate_proj", lora))
    out = lora_lib.project_named(out, w, "o_proj", lora)
    if cfg.o_bias:
        out = out + w["o_bias"]
    return out, new_kv
