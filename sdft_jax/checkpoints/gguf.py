"""GGUF -> HF directory: fp32 weights, config.json, and the tokenizer with its chat template.

llama.cpp stores Llama q/k projections with rows permuted for its interleaved RoPE; they are
permuted back here so the result uses the HF "rotate_half" layout like any HF checkpoint. Quantised
tensors are dequantised with the `gguf` package, so the output approximates the original model as
closely as the file allows.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from sdft_jax.cache import atomic_directory
from sdft_jax.checkpoints.hf import write_safetensors
from sdft_jax.errors import ModelError
from sdft_jax.models.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL_TOKEN = 3
# Bumped whenever the conversion's output changes, so cached conversions are rebuilt.
CONVERTER_VERSION = 2


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation for `n_heads` heads (HF [out, in] layout)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required and default is None:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _f32_decimal(value) -> float:
    """GGUF stores floats as fp32: 1e-5 reads back as 9.99999974e-06. Take the shortest decimal."""
    return float(str(np.float32(value)))


def read_config(reader) -> ModelConfig:
    """ModelConfig from GGUF metadata (`{arch}.*` keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    head_dim = _field(reader, f"{arch}.attention.key_length", default=hidden // heads, required=False)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(_field(reader, f"{arch}.vocab_size", default=vocab, required=False)),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", default=heads, required=False)),
        head_dim=int(head_dim),
        rms_norm_eps=_f32_decimal(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32_decimal(_field(reader, f"{arch}.rope.freq_base", default=10000.0, required=False)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", default=4096, required=False)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
    )


def read_tensors(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """All weights as fp32 arrays under HF names, q/k un-permuted for Llama."""
    import gguf

    out = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m:
            suffix = _LAYER_NAMES.get(m.group(2))
            name = f"model.layers.{m.group(1)}.{suffix}" if suffix else None
        else:
            name = _GLOBAL_NAMES.get(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":  # Llama 3 rope scaling factors, recomputed from config
                continue
            raise ValueError(f"GGUF tensor {t.name!r} has no HF counterpart")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if cfg.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_qk(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        out[name] = np.ascontiguousarray(w)
    return out


def build_tokenizer(reader):
    """A `transformers` fast tokenizer from GGUF byte-level BPE metadata (with chat template)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", default=[1] * len(tokens), required=False))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", default=[], required=False)]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, ignore_merges=False))
    pre = _field(reader, "tokenizer.ggml.pre", default="default", required=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in ("llama-bpe", "llama3"):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    elif pre == "qwen2":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level])
    elif pre in ("default", "gpt2"):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, llama-bpe, qwen2, gpt2)")
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN])

    def token(key):
        i = _field(reader, key, default=-1, required=False)
        return tokens[int(i)] if 0 <= int(i) < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template", default=None, required=False),
        clean_up_tokenization_spaces=False,
    )


def open_gguf(path: str) -> Any:
    """A `gguf.GGUFReader` of `path`, its tensors checked to lie inside the file's data section without
    overlapping; a `ModelError` naming the file (and tensor) for a file that is not a readable GGUF."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors (ValueError, IndexError...) on a corrupt file
        raise ModelError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from e
    # The reader refuses a tensor that runs past the end (its array cannot take its shape); checked
    # again here, with the tensor named, and overlaps, which the reader does not look for.
    size = os.path.getsize(path)
    spans = []
    for t in reader.tensors:
        start, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        if start < reader.data_offset or end > size or t.data.nbytes != t.n_bytes:
            raise ModelError(f"{path}: tensor {t.name!r}: bytes [{start}, {end}) lie outside the data section "
                             f"[{reader.data_offset}, {size}) (truncated or corrupt)")
        if end > start:
            spans.append((start, end, t.name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ModelError(f"{path}: tensors {a!r} and {b!r} overlap in the file (corrupt tensor offsets)")
    return reader


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Converts a GGUF file into an HF model directory (written atomically); returns the directory.
    A file that cannot be converted is a `ModelError` naming it."""
    gguf_path, out_dir = os.fspath(gguf_path), os.fspath(out_dir)
    if not os.path.isfile(gguf_path):
        raise ModelError(f"{gguf_path}: no such GGUF file")
    reader = open_gguf(gguf_path)
    try:  # everything below reads the file's metadata and tensors: a failure is the file's
        cfg = read_config(reader)
        tensors = read_tensors(reader, cfg)
        tokenizer = build_tokenizer(reader)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelError(f"{gguf_path}: {e}") from e
    with atomic_directory(out_dir) as tmp:
        config = cfg.to_hf_dict()
        config["torch_dtype"] = "float32"
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = _field(reader, f"tokenizer.ggml.{key}", default=None, required=False)
            if value is not None:
                config[key] = int(value)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        write_safetensors(tensors, tmp, max_shard_bytes=4 << 30)
        tokenizer.save_pretrained(tmp)
    return out_dir
