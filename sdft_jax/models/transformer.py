"""The decoder-only transformer (Llama / Qwen2 / Qwen3 / Qwen3-MoE) as a Flax NNX module.

Layers are stacked (`decoder.DecoderStack`): every per-layer weight has a leading `layers` axis and
the forward pass scans over them, so compile time does not grow with depth and each layer can be
rematerialised.
The forward returns final (normed) hidden states; the LM head is a separate call (`logits`,
`head`) so losses can apply it in token chunks and the sampler at the last position only.

Two modes share one code path:
- no cache: a padded batch `[B, T]`, causal attention among the real tokens of each row;
- KV cache: tokens are written at the cache's shared slot index (prefill a batch, then decode one
  token per call); positions are per row, so left-padded prompts of different lengths decode together.

The attention of the uncached forward and of a prefill runs the kernel the `attention` setting selects
for the platform (`fused_attention`: cuDNN on GPU, splash on TPU, the plain einsums on CPU).

Every forward is built from the same public parts, which a caller that runs the layers its own way
(the sampler's unrolled decode step) uses too: `Transformer.embed_tokens`, `Transformer.rope_tables`,
`decoder.decoder_layer` (one layer, on one layer's weights), `Transformer.normalize` (the final norm) and
`Transformer.logits`; in cache mode, `KVCache.reserve` / `commit` around the layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from sdft_jax.models import attention as attn
from sdft_jax.models import fused_attention
from sdft_jax.models import lora as lora_lib
from sdft_jax.models import moe as moe_lib
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.decoder import DecoderStack, RematPolicy
from sdft_jax.models.lm_head import LMHead
from sdft_jax.models.norm import rms_norm
from sdft_jax.models.sharding import constrain, target_platform
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.validation import check_choice, check_int

__all__ = ["DEFAULT_QUERY_BLOCK", "ModelOutput", "RematPolicy", "Transformer", "positions_from_mask"]

DEFAULT_QUERY_BLOCK = 128  # queries per block of the uncached attention (attention.causal_attention)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """A forward's results: the final hidden states, the updated cache in cache mode, and for a MoE
    model its router statistics (summed over layers, real tokens only) and weighted balance loss."""

    hidden: Float[Array, "B T D"]
    cache: attn.KVCache | None
    router_stats: moe_lib.RouterStats | None
    aux_loss: Float[Array, ""]
    grad_sum: dict[str, Array] | None = None  # `forward`'s `grad_sum`, passed through (its backward adds into it)


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
        attention: fused_attention.Implementation = "auto",
    ):
        check_int("query_block", query_block, minimum=0, hint="0 = one block")
        check_choice("attention", attention, fused_attention.IMPLEMENTATIONS)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.query_block = query_block
        self.attention = attention  # resolved per platform when traced: `attention_kernel`
        self.embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
            axes=("vocab", "embed"),
        )
        self.layers = DecoderStack(cfg, rngs=rngs, param_dtype=param_dtype, lora=lora)
        self.final_norm = nnx.Param(jnp.full((cfg.hidden_size,), 0.0 if cfg.zero_centered_norms else 1.0, param_dtype),
                                    axes=("embed",))
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
        out = self.forward(tokens, positions, input_mask, cache)
        return out.hidden, out.cache

    def forward(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        input_mask: Bool[Array, "B T"],
        cache: attn.KVCache | None = None,
        *,
        grad_sum: Mapping[str, Array] | None = None,
    ) -> ModelOutput:
        """`__call__`, with what a MoE model's router did (`ModelOutput`). `grad_sum`: a running sum of
        gradients of the decoder's stacked arrays that the backward adds into (`DecoderStack.__call__`)."""
        x = self.embed_tokens(tokens)
        T = tokens.shape[1]
        if cache is None:
            visible = attn.causal_visibility(jnp.arange(T), input_mask)
        else:
            cache, visible = cache.reserve(input_mask)
        x, new_kv, stats, grad_sum = self.layers(
            x, self.rope_tables(positions), visible, cache, token_mask=input_mask, dtype=self.dtype,
            remat=self.remat, query_block=self.query_block, attention=self.attention_kernel(), grad_sum=grad_sum)
        if cache is not None:
            cache = cache.commit(new_kv.k, new_kv.v, count=T, linear=new_kv.linear)
        aux = jnp.zeros((), jnp.float32)
        if stats is not None and self.cfg.moe.load_balance_coef:
            aux = self.cfg.moe.load_balance_coef * moe_lib.balance_loss(stats)
        return ModelOutput(hidden=self.normalize(x), cache=cache, router_stats=stats, aux_loss=aux, grad_sum=grad_sum)

    def attention_kernel(self) -> fused_attention.Kernel:
        """The attention kernel of the uncached forward and of a prefill: the `attention` setting on the
        platform this program is traced for (`fused_attention.select`)."""
        return fused_attention.select(self.attention, platform=target_platform(), dtype=self.dtype)

    def embed_tokens(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        """The input embeddings of `tokens`, in the compute dtype."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def rope_tables(self, positions: Int[Array, "B T"]) -> attn.RopeTables:
        """The RoPE tables of `positions` that every layer of a forward reads (`attention.rope_tables`)."""
        return attn.rope_tables(positions, attn.rope_inv_freq(self.cfg))

    def normalize(self, x: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
        """The final norm: the last layer's output to the hidden states the LM head reads."""
        return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps, zero_centered=self.cfg.zero_centered_norms)

    def head(self) -> LMHead:
        """The LM head as stored: the `[V, D]` embedding when tied (never a transposed copy), else `[D, V]`."""
        if self.lm_head is None:
            return LMHead(weight=self.embed[...], vocab_major=True)
        return LMHead(weight=self.lm_head[...])

    def logits(self, hidden: Float[Array, "*B D"]) -> Float[Array, "*B V"]:
        """fp32 logits of hidden states (use on few positions; losses chunk this themselves)."""
        return self.head().astype(hidden.dtype).logits(hidden, preferred_element_type=jnp.float32)


def positions_from_mask(input_mask: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """RoPE positions 0, 1, ... over each row's real tokens (left or right padding)."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1, 0)
