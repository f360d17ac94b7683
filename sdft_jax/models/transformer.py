"""The decoder-only transformer (Llama / Qwen2 / Qwen3) as a Flax NNX module.

Layers are stacked: every per-layer weight has a leading `layers` axis and the forward pass is one
`lax.scan` over them, so compile time does not grow with depth and each layer can be rematerialised.
The forward returns final (normed) hidden states; the LM head is a separate call (`logits`,
`head_weight`) so losses can apply it in token chunks and the sampler at the last position only.

Two modes share one code path:
- no cache: a padded batch `[B, T]`, causal attention among the real tokens of each row;
- KV cache: tokens are written at the cache's shared slot index (prefill a batch, then decode one
  token per call); positions are per row, so left-padded prompts of different lengths decode together.

Every forward is built from the same public parts, which a caller that runs the layers its own way
(the sampler's unrolled decode step) uses too: `Transformer.embed_tokens`, `Transformer.rope_tables`,
`decoder_layer` (one layer, on one layer's weights), `Transformer.normalize` (the final norm) and
`Transformer.logits`; in cache mode, `KVCache.reserve` / `commit` around the layers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from sdft_jax.models import attention as attn
from sdft_jax.models import lora as lora_lib
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.sharding import constrain
from sdft_jax.validation import check_int

RematPolicy = Literal["none", "full", "dots"]
DEFAULT_QUERY_BLOCK = 128  # queries per block of the uncached attention (attention.causal_attention)


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, "D"], eps: float) -> Float[Array, "... D"]:
    """RMSNorm in fp32, cast back before the weight (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Per-layer weight name -> (shape without the layers axis, logical axes)."""
    D, F, H, K, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        "input_layernorm": ((D,), ("embed",)),
        "post_attention_layernorm": ((D,), ("embed",)),
        "q_proj": ((D, H, E), ("embed", "q_heads", "head_dim")),
        "k_proj": ((D, K, E), ("embed", "kv_heads", "head_dim")),
        "v_proj": ((D, K, E), ("embed", "kv_heads", "head_dim")),
        "o_proj": ((H, E, D), ("q_heads", "head_dim", "embed")),
        "gate_proj": ((D, F), ("embed", "mlp")),
        "up_proj": ((D, F), ("embed", "mlp")),
        "down_proj": ((F, D), ("mlp", "embed")),
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
    return shapes


_NORMS = ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm")


class DecoderStack(nnx.Module):
    """All decoder layers, each weight stacked over a leading `layers` axis."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        lora: lora_lib.LoraConfig | None = None,
    ):
        self.cfg = cfg
        self.lora = lora
        L = cfg.num_layers
        self.weight_names = tuple(_param_shapes(cfg))
        for name, (shape, axes) in _param_shapes(cfg).items():
            if name in _NORMS:
                value = jnp.ones((L, *shape), param_dtype)
            elif name.endswith("_bias"):
                value = jnp.zeros((L, *shape), param_dtype)
            else:
                value = 0.02 * jax.random.normal(rngs.params(), (L, *shape), param_dtype)
            setattr(self, name, nnx.Param(value, axes=("layers", *axes)))
        if lora is not None:
            shapes = _param_shapes(cfg)
            for name in lora.targets:
                n_in = lora_lib.PROJECTIONS[name]
                shape, axes = shapes[name]
                a_shape = (L, *shape[:n_in], lora.rank)
                b_shape = (L, lora.rank, *shape[n_in:])
                setattr(self, f"{name}_lora_a", nnx.LoRAParam(
                    lora_lib.lora_a_init(rngs.params(), a_shape, n_in, param_dtype),
                    axes=("layers", *axes[:n_in], "lora_rank")))
                setattr(self, f"{name}_lora_b", nnx.LoRAParam(
                    jnp.zeros(b_shape, param_dtype), axes=("layers", "lora_rank", *axes[n_in:])))

    def weights(self) -> dict[str, Array]:
        """The stacked arrays (base weights and adapters) by name."""
        names = list(self.weight_names)
        if self.lora is not None:
            names += [f"{t}_lora_{s}" for t in self.lora.targets for s in "ab"]
        return {n: getattr(self, n)[...] for n in names}

    def __call__(
        self,
        x: Float[Array, "B T D"],
        rope: attn.RopeTables,
        visible: attn.Visibility,
        cache: attn.KVCache | None,
        *,
        dtype,
        remat: RematPolicy,
        query_block: int,
    ) -> tuple[Float[Array, "B T D"], tuple[Float[Array, "L B S Hkv hd"], Float[Array, "L B S Hkv hd"]] | None]:
        """`decoder_layer` over every layer in one scan. In cache mode (`cache` holds this call's slots,
        see `KVCache.reserve`) also returns the cache's new `(k, v)` buffers.

        `remat` rematerialises each layer in the backward of the uncached forward (training); a cached
        forward is inference and is never rematerialised.
        """
        layer = functools.partial(decoder_layer, cfg=self.cfg, lora=self.lora, dtype=dtype, query_block=query_block)
        if remat != "none" and cache is None:
            policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            layer = jax.checkpoint(layer, policy=policy)
        weights = self.weights()
        if cache is None:
            def body(h, w):
                h, _ = layer(h, w, rope, visible, None)
                return h, None

            x, _ = jax.lax.scan(body, x, weights)
            return x, None

        def cached_body(carry, xs):
            h, k_all, v_all = carry
            w, index = xs
            kv = functools.partial(attn.attend_stacked, k_all=k_all, v_all=v_all, layer=index, slot=cache.index)
            h, (k_all, v_all) = layer(h, w, rope, visible, kv)
            return (h, k_all, v_all), None

        (x, k, v), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v), (weights, jnp.arange(self.cfg.num_layers)))
        return x, (k, v)


def decoder_layer(
    h: Float[Array, "B T D"],
    weights: Mapping[str, Array],
    rope: attn.RopeTables,
    visible: attn.Visibility,
    kv: attn.CacheAttention | None,
    *,
    cfg: ModelConfig,
    lora: lora_lib.LoraConfig | None,
    dtype,
    query_block: int = 0,
) -> tuple[Float[Array, "B T D"], tuple[Array, Array] | None]:
    """One pre-norm decoder layer on one layer's `weights` (`DecoderStack.weights` without the layers
    axis): the token mixer (self-attention) and the channel mixer (the MLP), each added to the residual
    stream `h`. `rope` is the forward's `Transformer.rope_tables`, `visible` which keys each query sees.

    `kv` is None (no cache: attend among this call's tokens, causally, in blocks of `query_block`
    queries; see `attention.causal_attention`) or a cache's `attention.CacheAttention`, which writes
    the new keys and values and attends over the cache; its new buffers are returned beside `h`.
    """
    w = {n: a.astype(dtype) if not n.endswith("norm") else a for n, a in weights.items()}
    mixed, new_kv = _self_attention(rms_norm(h, w["input_layernorm"], cfg.rms_norm_eps), w, rope, visible, kv,
                                    cfg=cfg, lora=lora, query_block=query_block)
    h = h + mixed
    mlp = _mlp(rms_norm(h, w["post_attention_layernorm"], cfg.rms_norm_eps), w, lora)
    h = constrain(h + mlp, ("batch", "length", "embed"))
    return h, new_kv


def _project(x: Float[Array, "B T *in"], w: Mapping[str, Array], name: str,
             lora: lora_lib.LoraConfig | None) -> Float[Array, "B T *out"]:
    """Projection `name` of `x`, with its low-rank update when `w` holds adapters for it."""
    adapters = (w[f"{name}_lora_a"], w[f"{name}_lora_b"]) if f"{name}_lora_a" in w else None
    return lora_lib.project(x, w[name], lora_lib.PROJECTIONS[name], adapters, lora.scale if adapters else 1.0)


def _self_attention(x: Float[Array, "B T D"], w: Mapping[str, Array], rope: attn.RopeTables, visible: attn.Visibility,
                    kv: attn.CacheAttention | None, *, cfg: ModelConfig, lora: lora_lib.LoraConfig | None,
                    query_block: int) -> tuple[Float[Array, "B T D"], tuple[Array, Array] | None]:
    """Grouped-query self-attention of the normed `x` with RoPE (and the family's biases and q/k norms)."""
    B, T, _ = x.shape
    q, k, v = _project(x, w, "q_proj", lora), _project(x, w, "k_proj", lora), _project(x, w, "v_proj", lora)
    if cfg.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q = attn.apply_rope(q, rope)
    k = attn.apply_rope(k, rope)
    q = q.reshape(B, T, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)
    if kv is None:
        out, new_kv = attn.causal_attention(q, k, v, visible, query_block=query_block), None
    else:
        out, new_kv = kv(q, k, v, visible)
    out = _project(out.reshape(B, T, cfg.num_heads, cfg.head_dim), w, "o_proj", lora)
    if cfg.o_bias:
        out = out + w["o_bias"]
    return out, new_kv


def _mlp(x: Float[Array, "B T D"], w: Mapping[str, Array], lora: lora_lib.LoraConfig | None) -> Float[Array, "B T D"]:
    """The gated (SwiGLU) MLP of the normed `x`."""
    return _project(jax.nn.silu(_project(x, w, "gate_proj", lora)) * _project(x, w, "up_proj", lora), w, "down_proj",
                    lora)


class Transformer(nnx.Module):
    """Embedding, decoder stack, final norm and (untied) LM head."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        lora: lora_lib.LoraConfig | None = None,
        remat: RematPolicy = "none",
        query_block: int = DEFAULT_QUERY_BLOCK,
    ):
        check_int("query_block", query_block, minimum=0, hint="0 = one block")
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.query_block = query_block
        self.embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
            axes=("vocab", "embed"),
        )
        self.layers = DecoderStack(cfg, rngs=rngs, param_dtype=param_dtype, lora=lora)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype), axes=("embed",))
        self.lm_head = nnx.data(None)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype),
                axes=("embed", "vocab"),
            )

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        input_mask: Bool[Array, "B T"],
        cache: attn.KVCache | None = None,
    ) -> tuple[Float[Array, "B T D"], attn.KVCache | None]:
        """Final hidden states (after the last norm), and the updated cache in cache mode.

        `input_mask` marks real tokens (False = padding); `positions` are RoPE positions per row.
        """
        x = self.embed_tokens(tokens)
        T = tokens.shape[1]
        if cache is None:
            visible = attn.causal_visibility(jnp.arange(T), input_mask)
        else:
            cache, visible = cache.reserve(input_mask)
        x, new_kv = self.layers(x, self.rope_tables(positions), visible, cache, dtype=self.dtype, remat=self.remat,
                                query_block=self.query_block)
        if cache is not None:
            cache = cache.commit(*new_kv, count=T)
        return self.normalize(x), cache

    def embed_tokens(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        """The input embeddings of `tokens`, in the compute dtype."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def rope_tables(self, positions: Int[Array, "B T"]) -> attn.RopeTables:
        """The RoPE tables of `positions` that every layer of a forward reads (`attention.rope_tables`)."""
        return attn.rope_tables(positions, attn.rope_inv_freq(self.cfg))

    def normalize(self, x: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
        """The final norm: the last layer's output to the hidden states the LM head reads."""
        return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)

    def head_weight(self) -> Float[Array, "D V"]:
        """The LM head as `[hidden, vocab]` (the transposed embedding when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, hidden: Float[Array, "*B D"]) -> Float[Array, "*B V"]:
        """fp32 logits of hidden states (use on few positions; losses chunk this themselves)."""
        return jnp.einsum("...d,dv->...v", hidden, self.head_weight().astype(hidden.dtype),
                          preferred_element_type=jnp.float32)


def positions_from_mask(input_mask: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """RoPE positions 0, 1, ... over each row's real tokens (left or right padding)."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1, 0)
