"""GGUF -> HF: a tiny GGUF written here round-trips exactly; SmolLM2's GGUF matches `transformers`."""

import os

import gguf
import numpy as np
import pytest

from sdft_jax.checkpoints.gguf import gguf_to_hf, unpermute_qk
from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.checkpoints.safetensors_io import SafetensorsDir
from sdft_jax.models.config import ModelConfig
from sdft_jax.testing.tiny import CHATML_TEMPLATE, byte_tokenizer
from sdft_jax.tokenization import load_tokenizer

from tests.models.transformer_test import MASK, our_logits, torch_logits


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The permutation llama.cpp applies when it writes Llama q/k (the inverse of `unpermute_qk`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf_like_llama_cpp(hf_dir, out_file):
    """Writes a Llama HF directory as llama.cpp would: GGUF names, permuted q/k, tokenizer metadata."""
    cfg = ModelConfig.from_hf(hf_dir)
    tensors = SafetensorsDir(hf_dir)
    w = gguf.GGUFWriter(str(out_file), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    tok = byte_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<pad{i}>" for i in range(cfg.vocab_size - len(vocab))]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([])
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_chat_template(CHATML_TEMPLATE)
    for name in sorted(tensors.names):
        value = np.asarray(tensors.read(name), np.float32)
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                value = permute_qk(value, cfg.num_heads if "q_proj" in rest else cfg.num_kv_heads)
            gname = f"blk.{i}.{_TO_GGUF[rest]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_permutation_is_inverted():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not np.array_equal(permute_qk(w, 4), w)


def test_tiny_gguf_round_trip_is_exact(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama", rope_scaling=None)
    write_gguf_like_llama_cpp(src, tmp_path / "tiny.gguf")
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    a, b = SafetensorsDir(src), SafetensorsDir(out)
    assert a.names == b.names
    for name in a.names:
        np.testing.assert_array_equal(np.asarray(a.read(name)), np.asarray(b.read(name)), err_msg=name)
    assert ModelConfig.from_hf(out) == ModelConfig.from_hf(src)
    tok, ref = load_tokenizer(out), byte_tokenizer()
    text = "Hi there, 42 <|im_end|>"
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.eos_token == "<|im_end|>"


def test_convert_cli(tiny_model_dir, tmp_path, capsys):
    from sdft_jax.convert import main

    write_gguf_like_llama_cpp(tiny_model_dir("llama", rope_scaling=None), tmp_path / "tiny.gguf")
    assert main(["gguf", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")]) == 0
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(SystemExit):
        main(["gguf", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")])  # exists already
    assert "already exists" in capsys.readouterr().err


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        gguf_to_hf(tmp_path / "bad.gguf", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_smollm2_from_gguf_matches_transformers(smollm2_dir, torch_model):
    model = load_hf(smollm2_dir)
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    tokens = np.array([[504, 3575, 282, 4649, 314, 7042, 30, 2, 0, 0, 0, 0, 0, 0, 0, 0]] * 3)
    tokens[1] = np.roll(tokens[1], 8)
    mask = MASK.copy()[:, :8].repeat(2, axis=1)
    ours = our_logits(model, tokens, mask)
    ref = torch_logits(torch_model(smollm2_dir), tokens, mask)
    assert np.abs(ours - ref)[mask].max() < 1e-3
