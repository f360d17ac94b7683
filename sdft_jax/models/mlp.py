"""The dense channel mixer: the gated (SwiGLU) MLP of Llama / Qwen, and of the dense layers of a MoE model."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jaxtyping import Array, Float

from sdft_jax.models import lora as lora_lib
from sdft_jax.models.config import ModelConfig

Shapes = dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]


def param_shapes(cfg: ModelConfig) -> Shapes:
    """One layer's MLP weight name -> (shape, logical axes); matrices `[in, out]`."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    return {
        "gate_proj": ((D, F), ("embed", "mlp")),
        "up_proj": ((D, F), ("embed", "mlp")),
        "down_proj": ((F, D), ("mlp", "embed")),
    }


def mlp(x: Float[Array, "B T D"], w: Mapping[str, Array], lora: lora_lib.LoraConfig | None) -> Float[Array, "B T D"]:
    """`down(silu(gate(x)) * up(x))` of the normed `x` (each projection with its adapters when `w` has them)."""
    gate = lora_lib.project_named(x, w, "gate_proj", lora)
    return lora_lib.project_named(jax.nn.silu(gate) * lora_lib.project_named(x, w, "up_proj", lora), w,
                                  "down_proj", lora)
