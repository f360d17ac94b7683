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

from sdft_jax.models.moe import MoeConfig
from sdft_jax.validation import check_int

Architecture = Literal["llama", "qwen2", "qwen3", "qwen3_moe"]

# model_type in config.json -> our architecture family.
_MODEL_TYPES: dict[str, Architecture] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM"}

_MOE_ARCHITECTURES = ("qwen3_moe",)

TokenMixer = Literal["attention"]
ChannelMixer = Literal["mlp", "moe"]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What one decoder layer is made of: its token mixer (across positions) and its channel mixer
    (per position). `moe` is the sparse mixture of experts, with a shared expert when the config has one."""

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
    moe: MoeConfig | None = None  # the sparse MoE of every layer not in `dense_layers`; None = all dense
    dense_layers: tuple[int, ...] = ()  # with `moe`: layers whose channel mixer is the dense MLP

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
        if self.moe is not None and not isinstance(self.moe, MoeConfig):
            raise ValueError(f"ModelConfig.moe must be a MoeConfig or None, got {type(self.moe).__name__}")
        if (self.moe is not None) != (self.architecture in _MOE_ARCHITECTURES):
            raise ValueError(f"ModelConfig.moe: {self.architecture} models "
                             + ("need a MoeConfig" if self.moe is None else "have no experts (moe must be None)"))
        if self.dense_layers and self.moe is None:
            raise ValueError("ModelConfig.dense_layers lists exceptions to `moe`; set moe or leave it empty")
        for i in self.dense_layers:
            check_int("ModelConfig.dense_layers", i, minimum=0, maximum=self.num_layers - 1,
                      hint="layer indices of this model")
        if list(self.dense_layers) != sorted(set(self.dense_layers)):
            raise ValueError(f"ModelConfig.dense_layers must be increasing and distinct, got {self.dense_layers}")

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """Each layer's kind, in order."""
        def channel(i: int) -> ChannelMixer:
            return "moe" if self.moe is not None and i not in self.dense_layers else "mlp"

        return tuple(LayerKind("attention", channel(i)) for i in range(self.num_layers))

    @property
    def attention_layers(self) -> int:
        """How many layers attend (and so hold a slice of the KV cache)."""
        return sum(kind.token_mixer == "attention" for kind in self.layer_kinds)

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> "ModelConfig":
        """Reads an HF `config.json` (a model directory, the file, or its parsed dict)."""
        raw = _read_raw(path_or_dict)
        where = path_or_dict if not isinstance(path_or_dict, dict) else "config"
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
        moe, dense_layers = _moe_from_hf(hf, where) if arch == "qwen3_moe" else (None, ())
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
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
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            moe=moe,
            dense_layers=dense_layers,
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
        hf = AutoConfig.for_model(self.architecture, **kwargs)
        return hf.to_dict()


def _moe_from_hf(hf, where: Any) -> tuple[MoeConfig, tuple[int, ...]]:
    """A Qwen3-MoE config's experts, and its dense layers: those in `mlp_only_layers`, and those that
    `decoder_sparse_step` skips (layer i is sparse when (i + 1) % step == 0)."""
    experts = int(getattr(hf, "num_experts", 0) or 0)
    if experts < 1:
        raise ValueError(f"{where}: a qwen3_moe config with num_experts={experts}; dense models are qwen3")
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    mlp_only = set(getattr(hf, "mlp_only_layers", None) or ())
    dense = tuple(i for i in range(hf.num_hidden_layers) if i in mlp_only or (i + 1) % step)
    coef = float(getattr(hf, "router_aux_loss_coef", 0.0)) if getattr(hf, "output_router_logits", False) else 0.0
    return MoeConfig(num_experts=experts, top_k=int(hf.num_experts_per_tok),
                     expert_hidden=int(hf.moe_intermediate_size), norm_topk_prob=bool(hf.norm_topk_prob),
                     load_balance_coef=coef), dense


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
