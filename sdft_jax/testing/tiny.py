"""Tiny random models of every supported family, written as real HF directories, for fast tests.

Each directory has config.json, model.safetensors and a byte-level tokenizer with a ChatML template,
so everything that takes a model path (loading, scoring, sampling, training) runs on it in seconds.
All weights are random (norm gains and biases too), so a wrong mapping of any tensor shows up.

Dense families are written by our own export (`save_hf`); Qwen3-MoE (`write_tiny_moe_model`) and
Qwen3.5 / Qwen3.5-MoE (`write_tiny_qwen3_5_model`) are built and saved by `transformers`' own classes,
so their files are what `transformers` writes, independent of our mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sdft_jax.checkpoints.hf import save_hf
from sdft_jax.checkpoints.hf_names import ExpertLayout, ModelLayout
from sdft_jax.models.config import ModelConfig, RopeScaling
from sdft_jax.models.gated_deltanet import DeltaNetConfig
from sdft_jax.models.moe import MoeConfig
from sdft_jax.models.transformer import Transformer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 320  # 256 bytes + 3 specials, padded (real vocabularies are padded too)


def tiny_config(architecture: str = "llama", **overrides) -> ModelConfig:
    """A small config of one family: 2 layers (Qwen3.5: 5, Gated DeltaNet and gated attention), GQA
    (4 query heads over 2 KV heads); MoE families 4 experts, top-2 (Qwen3.5-MoE with a shared expert)."""
    base = dict(
        architecture=architecture, vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False,
        qkv_bias=architecture == "qwen2", qk_norm=architecture in ("qwen3", "qwen3_moe"),
    )
    if architecture == "llama":
        base["rope_scaling"] = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64)
    if architecture in ("qwen3_moe", "qwen3_5_moe"):
        base["moe"] = MoeConfig(num_experts=4, top_k=2, expert_hidden=32,
                                shared_expert_hidden=24 if architecture == "qwen3_5_moe" else 0)
    if architecture in ("qwen3_5", "qwen3_5_moe"):  # as `write_tiny_qwen3_5_model`'s: DeltaNet x 3, attention, DeltaNet
        base.update(num_layers=len(QWEN3_5_LAYER_TYPES), qk_norm=True, attention_output_gate=True,
                    partial_rotary_factor=0.25, zero_centered_norms=True, rms_norm_eps=1e-6,
                    linear_layers=tuple(i for i, t in enumerate(QWEN3_5_LAYER_TYPES) if t == "linear_attention"),
                    deltanet=DeltaNetConfig(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=8,
                                            conv_kernel=4, norm_eps=1e-6))
    base.update(overrides)
    return ModelConfig(**base)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges) with ChatML special tokens and template."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHATML_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A Transformer whose every parameter is random (norm gains around 1)."""
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, sub = jax.random.split(key)
        noise = jax.random.normal(sub, var.shape, jnp.float32)
        name = path[-1]
        var[...] = 1.0 + 0.1 * noise if name.endswith("norm") else 0.02 * noise if "bias" not in name else 0.1 * noise
    return model


def write_tiny_model(out_dir: str | os.PathLike, architecture: str = "llama", seed: int = 0, **overrides) -> str:
    """Writes a tiny random HF model directory with tokenizer; returns its path. `overrides` are
    `tiny_config`'s, for qwen3_moe `write_tiny_moe_model`'s keywords, for qwen3_5 / qwen3_5_moe
    `write_tiny_qwen3_5_model`'s."""
    if architecture == "qwen3_moe":
        return write_tiny_moe_model(out_dir, seed, **overrides)
    if architecture in ("qwen3_5", "qwen3_5_moe"):
        return write_tiny_qwen3_5_model(out_dir, architecture, seed, **overrides)
    out_dir = os.fspath(out_dir)
    model = random_model(tiny_config(architecture, **overrides), seed)
    save_hf(model, out_dir)
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir


def write_tiny_moe_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    norm_topk_prob: bool = True,
    num_layers: int = 3,
    mlp_only_layers: Sequence[int] = (1,),
    num_experts: int = 4,
    top_k: int = 2,
    tie_word_embeddings: bool = False,
    expert_layout: ExpertLayout = "per_expert",
) -> str:
    """Writes a tiny random Qwen3-MoE directory built and saved by `transformers` (with the byte
    tokenizer); returns its path.

    Every weight is random (norm gains around 1, router, experts, the dense layers of `mlp_only_layers`).
    `per_expert` is what `save_pretrained` writes; `fused` writes the model's in-memory state dict
    instead (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]).
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out_dir = os.fspath(out_dir)
    config = Qwen3MoeConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=list(mlp_only_layers), rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings, hidden_act="silu", attention_bias=False,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, dtype=torch.float32)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * noise)
    model.save_pretrained(out_dir)
    if expert_layout == "fused":
        _write_state_dict(model, out_dir, skip=("lm_head.weight",) if tie_word_embeddings else ())
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir


def _write_state_dict(model, out_dir: str, skip=(), extra=None) -> None:
    """Replaces the weights `save_pretrained` wrote in `out_dir` by the model's in-memory state dict
    (fused experts), less the names in `skip`, plus the `extra` tensors."""
    from safetensors.torch import save_file as save_torch

    for name in os.listdir(out_dir):
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            os.remove(os.path.join(out_dir, name))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in skip}
    state.update(extra or {})
    save_torch(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


QWEN3_5_LAYER_TYPES = ("linear_attention", "linear_attention", "linear_attention", "full_attention",
                       "linear_attention")


def write_tiny_qwen3_5_model(
    out_dir: str | os.PathLike,
    architecture: str = "qwen3_5",
    seed: int = 0,
    *,
    layout: ModelLayout = "causal_lm",
    layer_types: Sequence[str] = QWEN3_5_LAYER_TYPES,
    num_experts: int = 4,
    top_k: int = 2,
    expert_layout: ExpertLayout = "per_expert",
    sizes: Mapping[str, Any] | None = None,
) -> str:
    """Writes a tiny random Qwen3.5 (`qwen3_5`) or Qwen3.5-MoE (`qwen3_5_moe`) directory built and
    saved by `transformers` (with the byte tokenizer); returns its path.

    `layout="causal_lm"`: `Qwen3_5[Moe]ForCausalLM` (model_type `qwen3_5[_moe]_text`, text under
    `model.`); `"conditional_generation"`: `Qwen3_5[Moe]ForConditionalGeneration`, the released
    checkpoints' layout (a composite config.json with `text_config`, text under
    `model.language_model.`, a one-block vision tower `model.visual.`), plus, as those checkpoints
    carry them, multi-token-prediction tensors `mtp.*` (which `transformers` ignores; random, with
    `mtp_num_hidden_layers: 1` in text_config). Layers per `layer_types` (Gated DeltaNet with 2 key
    heads over 4 value heads; gated attention with partial rotary 0.25); the MoE's every layer has
    `num_experts` experts, `top_k` of them per token, and a shared expert. Every weight is random at
    a scale that makes each part of the model matter (norm gains around their unit, A_log, dt_bias
    and the convolution too). `per_expert` is what `save_pretrained` writes; `fused` writes the
    in-memory state dict instead. `sizes` overrides text-config entries (`hidden_size`, head counts,
    `moe_intermediate_size`, `vocab_size`, ...): the same family at a benchmark's size.
    """
    import torch
    import transformers

    out_dir = os.fspath(out_dir)
    if architecture not in ("qwen3_5", "qwen3_5_moe"):
        raise ValueError(f"architecture must be qwen3_5 or qwen3_5_moe, got {architecture!r}")
    if layout not in ("causal_lm", "conditional_generation"):
        raise ValueError(f"layout must be causal_lm or conditional_generation, got {layout!r}")
    moe = architecture == "qwen3_5_moe"
    text = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, layer_types=list(layer_types),
        rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    if moe:
        text.update(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=32,
                    shared_expert_intermediate_size=24)
    else:
        text.update(intermediate_size=96)
    text.update(sizes or {})
    family = "Qwen3_5Moe" if moe else "Qwen3_5"
    if layout == "causal_lm":
        config = getattr(transformers, f"{family}TextConfig")(**text)
        model_class = getattr(transformers, f"{family}ForCausalLM")
    else:
        text["mtp_num_hidden_layers"] = 1
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
        config = getattr(transformers, f"{family}Config")(text_config=text, vision_config=vision,
                                                          tie_word_embeddings=False)
        model_class = getattr(transformers, f"{family}ForConditionalGeneration")
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_qwen3_5_random(name, param.shape))
    model.save_pretrained(out_dir)
    mtp = {}
    if layout == "conditional_generation":
        D = text["hidden_size"]
        mtp = {name: _qwen3_5_random(name, shape) for name, shape in (
            ("mtp.fc.weight", (D, 2 * D)), ("mtp.norm.weight", (D,)), ("mtp.pre_fc_norm_embedding.weight", (D,)),
            ("mtp.pre_fc_norm_hidden.weight", (D,)), ("mtp.layers.0.input_layernorm.weight", (D,)),
            ("mtp.layers.0.self_attn.q_proj.weight", (2 * 4 * 16, D)))}
    if expert_layout == "fused" or mtp:
        if expert_layout == "fused":
            _write_state_dict(model, out_dir, extra=mtp)
        else:
            from safetensors.torch import load_file, save_file as save_torch

            file = os.path.join(out_dir, "model.safetensors")
            save_torch({**load_file(file), **mtp}, file, metadata={"format": "pt"})
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir


def _qwen3_5_random(name: str, shape):
    """A random value for the Qwen3.5 weight `name`, each at a scale where it matters: matrices
    1/sqrt(fan-in), zero-centered norm gains (stored w, gain 1 + w) and the gated norm's plain gain
    around their unit, A_log and dt_bias spread over decays slow and fast."""
    import torch

    noise = torch.randn(shape, dtype=torch.float32)
    if name.endswith("linear_attn.norm.weight"):
        return 1.0 + 0.2 * noise
    if name.endswith("norm.weight") and ".visual." not in name:
        return 0.2 * noise
    if name.endswith(("A_log", "dt_bias")):
        return 0.5 * noise
    if name.endswith("conv1d.weight"):
        return 0.5 * noise
    if len(shape) < 2:
        return 0.1 * noise
    if name.endswith("embed_tokens.weight"):
        return noise
    return noise / shape[-1] ** 0.5  # [out, in], or fused experts [E, out, in]
