"""Tiny random models of every supported family, written as real HF directories, for fast tests.

Each directory has config.json, model.safetensors and a byte-level tokenizer with a ChatML template,
so everything that takes a model path (loading, scoring, sampling, training) runs on it in seconds.
All weights are random (norm gains and biases too), so a wrong mapping of any tensor shows up.

Dense families are written by our own export (`save_hf`); Qwen3-MoE is built and saved by
`transformers`' own `Qwen3MoeConfig` / `Qwen3MoeForCausalLM` (`write_tiny_moe_model`), so its files
are what `transformers` writes, independent of our mapping.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sdft_jax.checkpoints.hf import save_hf
from sdft_jax.checkpoints.hf_names import ExpertLayout
from sdft_jax.models.config import ModelConfig, RopeScaling
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
    """A small config of one family: 2 layers, GQA (4 query heads over 2 KV heads)."""
    base = dict(
        architecture=architecture, vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False,
        qkv_bias=architecture == "qwen2", qk_norm=architecture in ("qwen3", "qwen3_moe"),
    )
    if architecture == "llama":
        base["rope_scaling"] = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64)
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
    `tiny_config`'s, or for qwen3_moe `write_tiny_moe_model`'s keywords."""
    if architecture == "qwen3_moe":
        return write_tiny_moe_model(out_dir, seed, **overrides)
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
    from safetensors.torch import save_file as save_torch
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
        for name in os.listdir(out_dir):
            if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
                os.remove(os.path.join(out_dir, name))
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (tie_word_embeddings and k == "lm_head.weight")}
        save_torch(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir
