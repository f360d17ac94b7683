"""`ModelConfig`: the single description of a decoder architecture.

The model, the HF weight mapping and the sharding rules all read this; nothing else parses
`config.json`. Parsing goes through `transformers.AutoConfig` (never with remote code), which
normalises the many historical spellings of a config (e.g. `rope_scaling` vs `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from sdft_jax.models.gated_deltanet import DeltaNetConfig
from sdft_jax.models.moe import MoeConfig
from sdft_jax.validation import check_bool, check_int, check_number

Architecture = Literal["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"]

# model_type in config.json -> our architecture family. Qwen3.5's causal LM saves its text config
# (`qwen3_5_text`); its multimodal `...ForConditionalGeneration` the composite one, text under `text_config`.
_MODEL_TYPES: dict[str, Architecture] = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
    "qwen3_5_text": "qwen3_5", "qwen3_5": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe", "qwen3_5_moe": "qwen3_5_moe",
}
_COMPOSITE_TYPES = ("qwen3_5", "qwen3_5_moe")  # config.json with a nested text_config
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM",
                     "qwen3_5_moe": "Qwen3_5MoeForCausalLM"}
_QWEN3_5 = ("qwen3_5", "qwen3_5_moe")

_MOE_ARCHITECTURES = ("qwen3_moe", "qwen3_5_moe")

TokenMixer = Literal["attention", "deltanet"]
ChannelMixer = Literal["mlp", "moe"]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What one decoder layer is made of: its token mixer (across positions: softmax attention, or Gated
    DeltaNet linear attention) and its channel mixer (per position: the dense MLP, or `moe`, the sparse
    mixture of experts, with a shared expert when the config has one)."""

    token_mixer: TokenMixer
    channel_mixer: ChannelMixer


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`) or linear position interpolation."""

    rope_type: Literal["llama3", "linear"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer (Llama / Qwen2 / Qwen3 / Qwen3-MoE).

    Every layer has a `LayerKind` (`layer_kinds`): self-attention, then the dense MLP, or the sparse
    MoE (`moe`) in every layer not listed in `dense_layers`. `intermediate_size` is the dense MLP's
    hidden size (unused when every layer is sparse).
    """

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has q/k/v biases; Llama has them when attention_bias is set.
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
    attention_output_gate: bool = False  # Qwen3.5: q_proj also gives a sigmoid gate on the attention output
    partial_rotary_factor: float = 1.0  # the fraction of each head's dims RoPE rotates (the first ones)
    zero_centered_norms: bool = False  # Qwen3.5: RMSNorm gains stored as w with the scale 1 + w (fp32)
    moe: MoeConfig | None = None  # the sparse MoE of every layer not in `dense_layers`; None = all dense
    dense_layers: tuple[int, ...] = ()  # with `moe`: layers whose channel mixer is the dense MLP
    deltanet: DeltaNetConfig | None = None  # the Gated DeltaNet of the `linear_layers`
    linear_layers: tuple[int, ...] = ()  # layers whose token mixer is Gated DeltaNet (the rest attend)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim")
        for name in positive:
            check_int(f"ModelConfig.{name}", getattr(self, name), minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        check_number("ModelConfig.partial_rotary_factor", self.partial_rotary_factor, low=0.0, high=1.0,
                     low_open=True)
        if self.rotary_dim % 2:
            raise ValueError(f"ModelConfig: head_dim {self.head_dim} x partial_rotary_factor "
                             f"{self.partial_rotary_factor} = {self.rotary_dim} rotary dims, must be even")
        check_bool("ModelConfig.attention_output_gate", self.attention_output_gate)
        check_bool("ModelConfig.zero_centered_norms", self.zero_centered_norms)
        if self.moe is not None and not isinstance(self.moe, MoeConfig):
            raise ValueError(f"ModelConfig.moe must be a MoeConfig or None, got {type(self.moe).__name__}")
        if (self.moe is not None) != (self.architecture in _MOE_ARCHITECTURES):
            raise ValueError(f"ModelConfig.moe: {self.architecture} models "
                             + ("need a MoeConfig" if self.moe is None else "have no experts (moe must be None)"))
        if (self.deltanet is not None) != bool(self.linear_layers):
            raise ValueError("ModelConfig.linear_layers lists the Gated DeltaNet layers: set both deltanet and "
                             "linear_layers, or neither")
        for field in ("dense_layers", "linear_layers"):
            layers = getattr(self, field)
            for i in layers:
                check_int(f"ModelConfig.{field}", i, minimum=0, maximum=self.num_layers - 1,
                          hint="layer indices of this model")
            if list(layers) != sorted(set(layers)):
                raise ValueError(f"ModelConfig.{field} must be increasing and distinct, got {layers}")
        if self.dense_layers and self.moe is None:
            raise ValueError("ModelConfig.dense_layers lists exceptions to `moe`; set moe or leave it empty")

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """Each layer's kind, in order."""
        def channel(i: int) -> ChannelMixer:
            return "moe" if self.moe is not None and i not in self.dense_layers else "mlp"

        def token(i: int) -> TokenMixer:
            return "deltanet" if i in self.linear_layers else "attention"

        return tuple(LayerKind(token(i), channel(i)) for i in range(self.num_layers))

    @property
    def attention_layers(self) -> int:
        """How many layers attend (and so hold a slice of the KV cache)."""
        return sum(kind.token_mixer == "attention" for kind in self.layer_kinds)

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims RoPE rotates (all but with partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> "ModelConfig":
        """Reads an HF `config.json` (a model directory, the file, or its parsed dict)."""
        raw = _read_raw(path_or_dict)
        where = path_or_dict if not isinstance(path_or_dict, dict) else "config"
        if raw.get("model_type") in _COMPOSITE_TYPES:
            if not isinstance(raw.get("text_config"), dict):
                raise ValueError(f"{where}: a {raw['model_type']} config.json without a text_config")
            text = {k: v for k, v in raw["text_config"].items() if k != "model_type"}
            if "tie_word_embeddings" in raw:  # the multimodal model ties by its top-level setting
                text["tie_word_embeddings"] = raw["tie_word_embeddings"]
            raw = {"model_type": raw["model_type"] + "_text", **text}
        model_type = raw.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"{where}: unsupported architecture model_type={model_type!r} "
                f"(supported: {', '.join(sorted(_MODEL_TYPES))})"
            )
        from transformers import AutoConfig

        hf = AutoConfig.for_model(**raw)
        arch = _MODEL_TYPES[model_type]
        if getattr(hf, "use_sliding_window", False):
            raise ValueError(f"{where}: sliding-window attention is not supported")
        if getattr(hf, "mlp_bias", False):
            raise ValueError(f"{where}: mlp_bias=True is not supported")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act={act!r} is not supported (only silu)")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        attention_bias = bool(getattr(hf, "attention_bias", False))
        moe, dense_layers = _moe_from_hf(hf, where) if arch in _MOE_ARCHITECTURES else (None, ())
        deltanet, linear_layers = _deltanet_from_hf(hf, where) if arch in _QWEN3_5 else (None, ())
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=getattr(hf, "intermediate_size", None) or hf.moe_intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(rope, where),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=attention_bias if arch == "llama" else False,
            qk_norm=arch in ("qwen3", "qwen3_moe", *_QWEN3_5),
            attention_output_gate=arch in _QWEN3_5,
            partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)) if arch in _QWEN3_5 else 1.0,
            zero_centered_norms=arch in _QWEN3_5,
            moe=moe,
            dense_layers=dense_layers,
            deltanet=deltanet,
            linear_layers=linear_layers,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents `transformers` needs to rebuild this architecture."""
        from transformers import AutoConfig

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling))
            if self.rope_scaling.rope_type == "linear":
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    rope.pop(key)
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            architectures=[_HF_ARCHITECTURES[self.architecture]],
        )
        if self.architecture == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError("Llama configs have one attention_bias for q/k/v/o")
            kwargs["attention_bias"] = self.qkv_bias
        elif self.architecture in ("qwen3", "qwen3_moe"):
            kwargs["attention_bias"] = self.qkv_bias
        model_type = self.architecture
        if self.architecture in _QWEN3_5:
            model_type = self.architecture + "_text"
            rope["partial_rotary_factor"] = self.partial_rotary_factor
            kwargs["attention_bias"] = self.qkv_bias
            kwargs.update(
                layer_types=["linear_attention" if kind.token_mixer == "deltanet" else "full_attention"
                             for kind in self.layer_kinds],
                linear_num_key_heads=self.deltanet.num_key_heads,
                linear_num_value_heads=self.deltanet.num_value_heads,
                linear_key_head_dim=self.deltanet.key_head_dim, linear_value_head_dim=self.deltanet.value_head_dim,
                linear_conv_kernel_dim=self.deltanet.conv_kernel,
            )
        if self.architecture == "qwen3_5_moe":
            if self.dense_layers or not self.moe.norm_topk_prob:
                raise ValueError("a qwen3_5_moe config has every layer sparse, with norm_topk_prob")
            kwargs.pop("intermediate_size")
            kwargs.update(num_experts=self.moe.num_experts, num_experts_per_tok=self.moe.top_k,
                          moe_intermediate_size=self.moe.expert_hidden,
                          shared_expert_intermediate_size=self.moe.shared_expert_hidden,
                          output_router_logits=self.moe.load_balance_coef > 0,
                          router_aux_loss_coef=self.moe.load_balance_coef or 0.001)
        if self.architecture == "qwen3_moe":
            if self.moe is None or self.moe.shared_expert_hidden:
                raise ValueError("a qwen3_moe config needs `moe`, without a shared expert")
            kwargs.update(
                num_experts=self.moe.num_experts, num_experts_per_tok=self.moe.top_k,
                moe_intermediate_size=self.moe.expert_hidden, norm_topk_prob=self.moe.norm_topk_prob,
                decoder_sparse_step=1, mlp_only_layers=list(self.dense_layers),
                output_router_logits=self.moe.load_balance_coef > 0,
                router_aux_loss_coef=self.moe.load_balance_coef or 0.001,
            )
        hf = AutoConfig.for_model(model_type, **kwargs)
        return hf.to_dict()


def _moe_from_hf(hf, where: Any) -> tuple[MoeConfig, tuple[int, ...]]:
    """A Qwen3-MoE / Qwen3.5-MoE config's experts, and its dense layers: those in `mlp_only_layers`, and
    those that `decoder_sparse_step` skips (layer i is sparse when (i + 1) % step == 0)."""
    experts = int(getattr(hf, "num_experts", 0) or 0)
    if experts < 1:
        raise ValueError(f"{where}: a MoE config with num_experts={experts}")
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    mlp_only = set(getattr(hf, "mlp_only_layers", None) or ())
    dense = tuple(i for i in range(hf.num_hidden_layers) if i in mlp_only or (i + 1) % step)
    coef = float(getattr(hf, "router_aux_loss_coef", 0.0)) if getattr(hf, "output_router_logits", False) else 0.0
    return MoeConfig(num_experts=experts, top_k=int(hf.num_experts_per_tok),
                     expert_hidden=int(hf.moe_intermediate_size),
                     norm_topk_prob=bool(getattr(hf, "norm_topk_prob", True)),  # Qwen3.5-MoE: always
                     shared_expert_hidden=int(getattr(hf, "shared_expert_intermediate_size", 0) or 0),
                     load_balance_coef=coef), dense


def _deltanet_from_hf(hf, where: Any) -> tuple[DeltaNetConfig, tuple[int, ...]]:
    """A Qwen3.5 config's Gated DeltaNet and the layers that have it (`layer_types`)."""
    kinds = list(hf.layer_types)
    unknown = sorted(set(kinds) - {"linear_attention", "full_attention"})
    if unknown or len(kinds) != hf.num_hidden_layers:
        raise ValueError(f"{where}: layer_types must list linear_attention / full_attention for each of the "
                         f"{hf.num_hidden_layers} layers, got {unknown or len(kinds)}")
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only silu)")
    cfg = DeltaNetConfig(num_key_heads=hf.linear_num_key_heads, num_value_heads=hf.linear_num_value_heads,
                         key_head_dim=hf.linear_key_head_dim, value_head_dim=hf.linear_value_head_dim,
                         conv_kernel=hf.linear_conv_kernel_dim, norm_eps=float(hf.rms_norm_eps))
    return cfg, tuple(i for i, kind in enumerate(kinds) if kind == "linear_attention")


def _read_raw(path_or_dict: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: config.json is not valid JSON ({e})") from e


def _rope_scaling(rope: dict[str, Any], where: Any) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type == "llama3":
        return RopeScaling(
            rope_type="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    if rope_type == "linear":
        return RopeScaling(rope_type="linear", factor=float(rope["factor"]))
    raise ValueError(f"{where}: unsupported rope_type={rope_type!r} (supported: default, llama3, linear)")
