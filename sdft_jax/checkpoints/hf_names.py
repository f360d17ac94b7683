"""Per-family tables: which HF tensor holds each of our parameters, and its layout there.

One table per family (as Tunix's `models/<family>/params.py`): our parameter name -> `TensorName`,
the HF tensor name (with `{i}` for the layer, `{e}` for the expert), the transform between the two
layouts, and for a tensor that HF fuses from several of ours, which `Piece` of it is ours. Llama,
Qwen2 and Qwen3 share one dense table (a model uses the rows of the parameters it has: Qwen2's
q/k/v biases, Qwen3's q/k norms); Qwen3-MoE adds the router and the routed experts; Qwen3.5 adds the
Gated DeltaNet layers (`linear_attn.`) and the gated attention; Qwen3.5-MoE both. The routed experts
come in one of two layouts (`ExpertLayout`):

- `per_expert`: one tensor per expert and projection, `mlp.experts.{e}.{gate,up,down}_proj.weight`
  ([F, D] / [D, F]); what `transformers`' `save_pretrained` writes (Qwen3-MoE and Qwen3.5-MoE) and
  vLLM loads;
- `fused`: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `mlp.experts.down_proj`
  [E, D, F]; `transformers`' in-memory layout.

Fused HF tensors (`Piece`): Qwen3.5's `linear_attn.in_proj_qkv.weight` holds the rows of q, k and v
(2 Hk Dk + Hv Dv rows: pieces of unequal sizes) and `linear_attn.conv1d.weight` [C, 1, K] their
convolution channels in the same order; its gated attention's `self_attn.q_proj.weight` [H 2 hd, D]
holds, per head, hd query rows then hd gate rows (ours `q_proj` and `q_gate_proj`, interleaved).

Text layouts (`ModelLayout`): `causal_lm` names the text model `model.` (`...ForCausalLM`);
`conditional_generation` (Qwen3.5's multimodal `...ForConditionalGeneration`, the released
checkpoints) `model.language_model.`, with `lm_head.weight` at the top either way. Tensors of such a
checkpoint that the text model does not use (the vision tower `model.visual.`, the multi-token-
prediction head `mtp.`) are `unused_prefixes`: kept aside at load and copied through on export.

Ours store every matrix `[in, out]`, HF's `nn.Linear` `[out, in]`; attention weights keep their
heads split (`q_proj` [D, H, head_dim]).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np

ExpertLayout = Literal["per_expert", "fused"]
ModelLayout = Literal["causal_lm", "conditional_generation"]
MODEL_LAYOUTS: tuple[ModelLayout, ...] = ("causal_lm", "conditional_generation")
Shapes = Mapping[str, tuple[int, ...]]  # our parameter name -> its shape per HF tensor (no layer / expert axis)


@dataclasses.dataclass(frozen=True)
class Transform:
    """Between an HF tensor and ours: `identity`; `flat` (HF holds ours flattened, e.g. a bias [H*E]
    of ours [H, E]); `linear` (HF [*lead, out, in] of ours [*lead, *in, *out], `n_in` input dims,
    `lead` leading axes kept as they are, e.g. the expert axis of a fused tensor); `conv` (a
    depthwise convolution's weight: HF `nn.Conv1d` [channels, 1, K] of ours [K, *channels])."""

    kind: Literal["identity", "flat", "linear", "conv"]
    n_in: int = 1
    lead: int = 0

    def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The HF tensor `x` as ours of `shape` (raises ValueError if its size does not fit)."""
        if self.kind == "linear":
            x = np.swapaxes(x, -1, -2)
        elif self.kind == "conv":
            x = np.swapaxes(x[:, 0, :], 0, 1)
        return x.reshape(shape)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape for ours of `shape`."""
        if self.kind == "identity":
            return tuple(shape)
        if self.kind == "flat":
            return (int(np.prod(shape)),)
        if self.kind == "conv":
            return (int(np.prod(shape[1:])), 1, shape[0])
        lead, n_in = self.lead, self.n_in
        return (*shape[:lead], int(np.prod(shape[lead + n_in:])), int(np.prod(shape[lead:lead + n_in])))

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        """Ours `y` as the HF tensor."""
        if self.kind == "identity":
            return y
        if self.kind == "flat":
            return y.reshape(-1)
        if self.kind == "conv":
            return np.swapaxes(y.reshape(y.shape[0], -1), 0, 1)[:, None, :]
        in_size = int(np.prod(y.shape[self.lead:self.lead + self.n_in]))
        return np.swapaxes(y.reshape(*y.shape[:self.lead], in_size, -1), -1, -2)


IDENTITY = Transform("identity")
FLAT = Transform("flat")
LINEAR = Transform("linear")
CONV = Transform("conv")


@dataclasses.dataclass(frozen=True)
class Piece:
    """An HF tensor fused from several of our parameters: along `axis` (of the HF tensor), the
    concatenation of `of`'s HF tensors in order, each as long as its own HF shape says (so pieces
    may differ in size: Qwen3.5's q, k, v). With `interleave_axis`, the fused axis is instead G
    equal blocks, G the length of our parameters' axis `interleave_axis` (their heads), each block
    the concatenation of every piece's block (Qwen3.5's q_proj: per head, query rows then gate rows).
    """

    axis: int
    of: tuple[str, ...]
    interleave_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class TensorName:
    """Where one of our parameters lives in an HF checkpoint.

    `hf_name` has `{i}` for a per-layer weight (ours stacked over layers) and `{e}` for a per-expert one
    (ours stacked over experts after the layers axis). `piece`: the HF tensor is fused from several of
    ours (`Piece`; `take_piece`, `join_pieces`).
    """

    hf_name: str
    transform: Transform = IDENTITY
    piece: Piece | None = None

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


def _piece_sizes(piece: Piece, table: Mapping[str, TensorName], shapes: Shapes) -> list[int]:
    """Each piece's length along the fused axis (all blocks together)."""
    return [table[n].transform.hf_shape(shapes[n])[piece.axis] for n in piece.of]


def _groups(piece: Piece, shapes: Shapes) -> int:
    if piece.interleave_axis is None:
        return 1
    groups = {shapes[n][piece.interleave_axis] for n in piece.of}
    if len(groups) != 1:
        raise ValueError(f"pieces {piece.of} are interleaved over axis {piece.interleave_axis} of unequal lengths")
    return groups.pop()


def hf_shape(name: str, table: Mapping[str, TensorName], shapes: Shapes) -> tuple[int, ...]:
    """The shape of the HF tensor holding our parameter `name` (the whole fused tensor for a piece);
    `shapes` has each parameter's shape per HF tensor (ours without its layers and expert axes)."""
    entry = table[name]
    shape = list(entry.transform.hf_shape(shapes[name]))
    if entry.piece is not None:
        shape[entry.piece.axis] = sum(_piece_sizes(entry.piece, table, shapes))
    return tuple(shape)


def take_piece(x: np.ndarray, name: str, table: Mapping[str, TensorName], shapes: Shapes) -> np.ndarray:
    """Our parameter `name`'s part of the HF tensor `x` (still in HF's layout); `x` itself when not fused."""
    piece = table[name].piece
    if piece is None:
        return x
    sizes = _piece_sizes(piece, table, shapes)
    groups = _groups(piece, shapes)
    k = piece.of.index(name)
    start, stop = sum(sizes[:k]) // groups, sum(sizes[:k + 1]) // groups
    axis = piece.axis
    blocks = x.reshape(*x.shape[:axis], groups, x.shape[axis] // groups, *x.shape[axis + 1:])
    part = blocks[(slice(None),) * (axis + 1) + (slice(start, stop),)]
    return part.reshape(*x.shape[:axis], sizes[k], *x.shape[axis + 1:])


def join_pieces(parts: Mapping[str, np.ndarray], piece: Piece, shapes: Shapes) -> np.ndarray:
    """The fused HF tensor from each piece's HF tensor (`parts`, by our parameter name): the inverse
    of `take_piece`."""
    missing = [n for n in piece.of if n not in parts]
    if missing:
        raise ValueError(f"the HF tensor fused from {list(piece.of)} lacks {missing}")
    groups, axis = _groups(piece, shapes), piece.axis
    blocks = [parts[n].reshape(*parts[n].shape[:axis], groups, -1, *parts[n].shape[axis + 1:]) for n in piece.of]
    joined = np.concatenate(blocks, axis=axis + 1)
    return joined.reshape(*joined.shape[:axis], -1, *joined.shape[axis + 2:])


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
_LINEAR_ATTN = "model.layers.{i}.linear_attn."

# Llama, Qwen2, Qwen3 (and the attention, norms and dense layers of Qwen3-MoE and Qwen3.5).
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
_GATE_UP = ("experts_gate_proj", "experts_up_proj")
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
        "experts_gate_proj": TensorName(_MLP + "experts.gate_up_proj", _EXPERTS_LINEAR, Piece(1, _GATE_UP)),
        "experts_up_proj": TensorName(_MLP + "experts.gate_up_proj", _EXPERTS_LINEAR, Piece(1, _GATE_UP)),
        "experts_down_proj": TensorName(_MLP + "experts.down_proj", _EXPERTS_LINEAR),
    },
}

# Qwen3.5's gated attention: q_proj's rows per head are hd query rows, then hd gate rows.
_Q_AND_GATE = Piece(0, ("q_proj", "q_gate_proj"), interleave_axis=1)
GATED_ATTENTION: dict[str, TensorName] = {
    "q_proj": TensorName(_ATTN + "q_proj.weight", LINEAR, _Q_AND_GATE),
    "q_gate_proj": TensorName(_ATTN + "q_proj.weight", LINEAR, _Q_AND_GATE),
}

# Qwen3.5's Gated DeltaNet (`gated_deltanet.py`'s table): q, k, v fused in one projection and one
# depthwise convolution, rows / channels q, then k, then v.
_QKV = Piece(0, ("linear_q_proj", "linear_k_proj", "linear_v_proj"))
_QKV_CONV = Piece(0, ("linear_q_conv", "linear_k_conv", "linear_v_conv"))
DELTANET: dict[str, TensorName] = {
    "linear_q_proj": TensorName(_LINEAR_ATTN + "in_proj_qkv.weight", LINEAR, _QKV),
    "linear_k_proj": TensorName(_LINEAR_ATTN + "in_proj_qkv.weight", LINEAR, _QKV),
    "linear_v_proj": TensorName(_LINEAR_ATTN + "in_proj_qkv.weight", LINEAR, _QKV),
    "linear_q_conv": TensorName(_LINEAR_ATTN + "conv1d.weight", CONV, _QKV_CONV),
    "linear_k_conv": TensorName(_LINEAR_ATTN + "conv1d.weight", CONV, _QKV_CONV),
    "linear_v_conv": TensorName(_LINEAR_ATTN + "conv1d.weight", CONV, _QKV_CONV),
    "linear_z_proj": TensorName(_LINEAR_ATTN + "in_proj_z.weight", LINEAR),
    "linear_b_proj": TensorName(_LINEAR_ATTN + "in_proj_b.weight", LINEAR),
    "linear_a_proj": TensorName(_LINEAR_ATTN + "in_proj_a.weight", LINEAR),
    "linear_dt_bias": TensorName(_LINEAR_ATTN + "dt_bias"),
    "linear_a_log": TensorName(_LINEAR_ATTN + "A_log"),
    "linear_norm": TensorName(_LINEAR_ATTN + "norm.weight"),
    "linear_out_proj": TensorName(_LINEAR_ATTN + "out_proj.weight", Transform("linear", n_in=2)),
}


@dataclasses.dataclass(frozen=True)
class _Family:
    moe: bool = False
    hybrid: bool = False  # Qwen3.5: Gated DeltaNet layers, gated attention, the multimodal layout


_FAMILIES = {"llama": _Family(), "qwen2": _Family(), "qwen3": _Family(), "qwen3_moe": _Family(moe=True),
             "qwen3_5": _Family(hybrid=True), "qwen3_5_moe": _Family(moe=True, hybrid=True)}
_TEXT_PREFIX: dict[ModelLayout, str] = {"causal_lm": "model.", "conditional_generation": "model.language_model."}
# Tensors of a Qwen3.5 checkpoint that the text model does not use: the vision tower, the MTP head.
_UNUSED_PREFIXES = ("model.visual.", "mtp.")


def _family(architecture: str) -> _Family:
    if architecture not in _FAMILIES:
        raise ValueError(f"no HF name table for architecture {architecture!r} (have {sorted(_FAMILIES)})")
    return _FAMILIES[architecture]


def family_table(architecture: str, expert_layout: ExpertLayout = "per_expert",
                 layout: ModelLayout = "causal_lm") -> dict[str, TensorName]:
    """Our parameter name -> its HF tensor, for one architecture (`ModelConfig.architecture`), its
    routed experts in `expert_layout` and its text model named as in `layout`."""
    family = _family(architecture)
    if expert_layout not in EXPERTS:
        raise ValueError(f"expert_layout must be one of {list(EXPERTS)}, got {expert_layout!r}")
    if layout not in MODEL_LAYOUTS:
        raise ValueError(f"layout must be one of {list(MODEL_LAYOUTS)}, got {layout!r}")
    if layout != "causal_lm" and not family.hybrid:
        raise ValueError(f"{architecture} checkpoints have the causal_lm layout only, not {layout!r}")
    table = dict(DENSE)
    if family.moe:
        table.update({**MOE, **EXPERTS[expert_layout]})
    if family.hybrid:
        table.update({**GATED_ATTENTION, **DELTANET})
    if layout == "causal_lm":
        return table
    text = _TEXT_PREFIX[layout]
    return {name: dataclasses.replace(entry, hf_name=text + entry.hf_name.removeprefix("model."))
            if entry.hf_name.startswith("model.") else entry for name, entry in table.items()}


def unused_prefixes(architecture: str) -> tuple[str, ...]:
    """Name prefixes of the tensors a checkpoint of `architecture` may hold that the model does not
    use (Qwen3.5: the vision tower and the MTP head); an export copies them through."""
    return _UNUSED_PREFIXES if _family(architecture).hybrid else ()


def model_layout_of_names(names: Iterable[str], where: str = "checkpoint") -> ModelLayout:
    """The text model's layout of a checkpoint from its tensor names (`conditional_generation` when
    they are under `model.language_model.`)."""
    names = list(names)
    nested = any(n.startswith(_TEXT_PREFIX["conditional_generation"]) for n in names)
    flat = any(n.startswith("model.") and not n.startswith(("model.language_model.", *_UNUSED_PREFIXES))
               for n in names)
    if nested and flat:
        raise ValueError(f"{where}: holds text-model tensors both under model.language_model. and model.")
    return "conditional_generation" if nested else "causal_lm"


_FUSED = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


def expert_layout_of_names(names: Iterable[str], where: str = "checkpoint") -> ExpertLayout | None:
    """The routed experts' layout of a checkpoint from its tensor names; None when it has no experts."""
    fused = per_expert = False
    for name in names:
        if name.startswith(_UNUSED_PREFIXES):  # an MTP head's own experts say nothing of the model's
            continue
        fused = fused or bool(_FUSED.search(name))
        per_expert = per_expert or bool(_PER_EXPERT.search(name))
    if fused and per_expert:
        raise ValueError(f"{where}: holds experts in both the fused and the per-expert layout")
    return "fused" if fused else "per_expert" if per_expert else None
