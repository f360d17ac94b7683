"""Per-family tables: which HF tensor holds each of our parameters, and its layout there.

One table per family (as Tunix's `models/<family>/params.py`): our parameter name -> `TensorName`,
the HF tensor name (with `{i}` for the layer, `{e}` for the expert) and the transform between the
two layouts. Llama, Qwen2 and Qwen3 share one dense table (a model uses the rows of the parameters
it has: Qwen2's q/k/v biases, Qwen3's q/k norms); Qwen3-MoE adds the router and the routed experts,
in one of two layouts (`ExpertLayout`):

- `per_expert`: one tensor per expert and projection, `mlp.experts.{e}.{gate,up,down}_proj.weight`
  ([F, D] / [D, F]); what `transformers`' `save_pretrained` writes and vLLM loads;
- `fused`: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `mlp.experts.down_proj`
  [E, D, F]; `transformers`' in-memory layout.

Ours store every matrix `[in, out]`, HF's `nn.Linear` `[out, in]`; attention weights keep their
heads split (`q_proj` [D, H, head_dim]). The rows of the shared expert (Qwen2-MoE style) are there
for families that have one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Literal

import numpy as np

ExpertLayout = Literal["per_expert", "fused"]


@dataclasses.dataclass(frozen=True)
class Transform:
    """Between an HF tensor and ours: `identity`; `flat` (HF holds ours flattened, e.g. a bias [H*E]
    of ours [H, E]); `linear` (HF [*lead, out, in] of ours [*lead, *in, *out], `n_in` input dims,
    `lead` leading axes kept as they are, e.g. the expert axis of a fused tensor)."""

    kind: Literal["identity", "flat", "linear"]
    n_in: int = 1
    lead: int = 0

    def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The HF tensor `x` as ours of `shape` (raises ValueError if its size does not fit)."""
        if self.kind == "linear":
            x = np.swapaxes(x, -1, -2)
        return x.reshape(shape)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape for ours of `shape`."""
        if self.kind == "identity":
            return tuple(shape)
        if self.kind == "flat":
            return (int(np.prod(shape)),)
        lead, n_in = self.lead, self.n_in
        return (*shape[:lead], int(np.prod(shape[lead + n_in:])), int(np.prod(shape[lead:lead + n_in])))

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        """Ours `y` as the HF tensor."""
        if self.kind == "identity":
            return y
        if self.kind == "flat":
            return y.reshape(-1)
        in_size = int(np.prod(y.shape[self.lead:self.lead + self.n_in]))
        return np.swapaxes(y.reshape(*y.shape[:self.lead], in_size, -1), -1, -2)


IDENTITY = Transform("identity")
FLAT = Transform("flat")
LINEAR = Transform("linear")


@dataclasses.dataclass(frozen=True)
class TensorName:
    """Where one of our parameters lives in an HF checkpoint.

    `hf_name` has `{i}` for a per-layer weight (ours stacked over layers) and `{e}` for a per-expert one
    (ours stacked over experts after the layers axis). `piece = (axis, index, count)` says the HF
    tensor is the concatenation of `count` equal pieces along `axis` and ours is piece `index` (the
    gate and up halves of a fused `gate_up_proj`).
    """

    hf_name: str
    transform: Transform = IDENTITY
    piece: tuple[int, int, int] | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf_name

    def names(self, layers: Iterable[int], num_experts: int) -> list[str]:
        """The HF tensor names, layer-major then expert (distinct: pieces of one tensor name it once)."""
        layers = list(layers) if self.per_layer else [0]
        experts = range(num_experts) if self.per_expert else [0]
        return [self.hf_name.format(i=i, e=e) for i in layers for e in experts]


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."

# Llama, Qwen2, Qwen3 (and the attention, norms and dense layers of Qwen3-MoE).
DENSE: dict[str, TensorName] = {
    "embed": TensorName("model.embed_tokens.weight"),
    "final_norm": TensorName("model.norm.weight"),
    "lm_head": TensorName("lm_head.weight", LINEAR),
    "input_layernorm": TensorName("model.layers.{i}.input_layernorm.weight"),
    "post_attention_layernorm": TensorName("model.layers.{i}.post_attention_layernorm.weight"),
    "q_proj": TensorName(_ATTN + "q_proj.weight", LINEAR),
    "k_proj": TensorName(_ATTN + "k_proj.weight", LINEAR),
    "v_proj": TensorName(_ATTN + "v_proj.weight", LINEAR),
    "o_proj": TensorName(_ATTN + "o_proj.weight", Transform("linear", n_in=2)),
    "q_bias": TensorName(_ATTN + "q_proj.bias", FLAT),
    "k_bias": TensorName(_ATTN + "k_proj.bias", FLAT),
    "v_bias": TensorName(_ATTN + "v_proj.bias", FLAT),
    "o_bias": TensorName(_ATTN + "o_proj.bias"),
    "q_norm": TensorName(_ATTN + "q_norm.weight"),
    "k_norm": TensorName(_ATTN + "k_norm.weight"),
    "gate_proj": TensorName(_MLP + "gate_proj.weight", LINEAR),
    "up_proj": TensorName(_MLP + "up_proj.weight", LINEAR),
    "down_proj": TensorName(_MLP + "down_proj.weight", LINEAR),
}

# The sparse MoE block: router, shared expert, and the routed experts in each layout.
_EXPERTS_LINEAR = Transform("linear", lead=1)
MOE: dict[str, TensorName] = {
    "router": TensorName(_MLP + "gate.weight", LINEAR),
    "shared_expert_gate_proj": TensorName(_MLP + "shared_expert.gate_proj.weight", LINEAR),
    "shared_expert_up_proj": TensorName(_MLP + "shared_expert.up_proj.weight", LINEAR),
    "shared_expert_down_proj": TensorName(_MLP + "shared_expert.down_proj.weight", LINEAR),
    "shared_expert_gate": TensorName(_MLP + "shared_expert_gate.weight", LINEAR),
}
EXPERTS: dict[ExpertLayout, dict[str, TensorName]] = {
    "per_expert": {
        "experts_gate_proj": TensorName(_MLP + "experts.{e}.gate_proj.weight", LINEAR),
        "experts_up_proj": TensorName(_MLP + "experts.{e}.up_proj.weight", LINEAR),
        "experts_down_proj": TensorName(_MLP + "experts.{e}.down_proj.weight", LINEAR),
    },
    "fused": {
        "experts_gate_proj": TensorName(_MLP + "experts.gate_up_proj", _EXPERTS_LINEAR, piece=(1, 0, 2)),
        "experts_up_proj": TensorName(_MLP + "experts.gate_up_proj", _EXPERTS_LINEAR, piece=(1, 1, 2)),
        "experts_down_proj": TensorName(_MLP + "experts.down_proj", _EXPERTS_LINEAR),
    },
}

_FAMILIES = {"llama": "dense", "qwen2": "dense", "qwen3": "dense", "qwen3_moe": "moe"}


def family_table(architecture: str, expert_layout: ExpertLayout = "per_expert") -> dict[str, TensorName]:
    """Our parameter name -> its HF tensor, for one architecture (`ModelConfig.architecture`)."""
    if architecture not in _FAMILIES:
        raise ValueError(f"no HF name table for architecture {architecture!r} (have {sorted(_FAMILIES)})")
    if expert_layout not in EXPERTS:
        raise ValueError(f"expert_layout must be one of {list(EXPERTS)}, got {expert_layout!r}")
    if _FAMILIES[architecture] == "dense":
        return dict(DENSE)
    return {**DENSE, **MOE, **EXPERTS[expert_layout]}


_FUSED = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


def expert_layout_of_names(names: Iterable[str], where: str = "checkpoint") -> ExpertLayout | None:
    """The routed experts' layout of a checkpoint from its tensor names; None when it has no experts."""
    fused = per_expert = False
    for name in names:
        fused = fused or bool(_FUSED.search(name))
        per_expert = per_expert or bool(_PER_EXPERT.search(name))
    if fused and per_expert:
        raise ValueError(f"{where}: holds experts in both the fused and the per-expert layout")
    return "fused" if fused else "per_expert" if per_expert else None
