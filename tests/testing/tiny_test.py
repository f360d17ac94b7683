"""Tiny model directories are complete and really random."""

import numpy as np

from sdft_jax.checkpoints.safetensors_io import SafetensorsDir
from sdft_jax.tokenization import encode_chat, load_tokenizer


def test_directory_is_complete_and_every_tensor_is_random(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    tensors = SafetensorsDir(path)
    for name in tensors.names:
        value = np.asarray(tensors.read(name))
        assert value.std() > 0, name  # norms and biases too, so a mis-mapped one shows up
    tok = load_tokenizer(path)
    ids = encode_chat(tok, [{"role": "user", "content": "hi"}])
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and max(ids) < 320


def test_moe_directory_is_transformers_own_and_every_tensor_is_random(tiny_model_dir):
    import json

    path = tiny_model_dir("qwen3_moe")
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["mlp_only_layers"] == [1]
    assert config["num_experts_per_tok"] == 2 and config["norm_topk_prob"] is True
    tensors = SafetensorsDir(path)
    names = tensors.names
    for i in (0, 2):  # sparse layers: router and 4 experts, per expert as save_pretrained writes them
        assert f"model.layers.{i}.mlp.gate.weight" in names
        experts = {f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
                   for e in range(4) for p in ("gate", "up", "down")}
        assert experts <= names
    assert "model.layers.1.mlp.gate_proj.weight" in names and "model.layers.1.mlp.gate.weight" not in names
    for name in names:
        value = np.asarray(tensors.read(name))
        assert value.std() > 0, name  # router, experts and norm gains too
    assert max(encode_chat(load_tokenizer(path), [{"role": "user", "content": "hi"}])) < 320


def test_moe_fused_directory_holds_the_in_memory_layout(tiny_model_dir):
    tensors = SafetensorsDir(tiny_model_dir("qwen3_moe", expert_layout="fused"))
    assert tensors.shape("model.layers.0.mlp.experts.gate_up_proj") == (4, 64, 64)  # [E, 2F, D]
    assert tensors.shape("model.layers.2.mlp.experts.down_proj") == (4, 64, 32)  # [E, D, F]
    assert not any(".experts.0." in n for n in tensors.names)


def test_qwen3_5_directories_are_transformers_own_and_every_tensor_is_random(tiny_model_dir):
    import json

    causal = tiny_model_dir("qwen3_5")
    with open(f"{causal}/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["model_type"] == "qwen3_5_text"
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention", "linear_attention"]
    names = SafetensorsDir(causal).names
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert "model.layers.3.self_attn.q_proj.weight" in names
    assert not any(n.startswith(("model.visual.", "mtp.", "model.language_model.")) for n in names)

    nested = tiny_model_dir("qwen3_5_moe", layout="conditional_generation")
    with open(f"{nested}/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3_5MoeForConditionalGeneration"] and config["model_type"] == "qwen3_5_moe"
    text = config["text_config"]
    assert (text["num_experts"], text["num_experts_per_tok"], text["shared_expert_intermediate_size"]) == (4, 2, 24)
    tensors = SafetensorsDir(nested)
    names = tensors.names
    assert "lm_head.weight" in names and "model.language_model.embed_tokens.weight" in names
    experts = {f"model.language_model.layers.{i}.mlp.experts.{e}.up_proj.weight" for i in range(5) for e in range(4)}
    assert experts <= names
    assert "model.language_model.layers.4.mlp.shared_expert_gate.weight" in names
    assert any(n.startswith("model.visual.") for n in names) and "mtp.fc.weight" in names
    for name in names:
        value = np.asarray(tensors.read(name))
        assert value.std() > 0, name  # norms, A_log, dt_bias, conv, router and experts too
    for path in (causal, nested):
        assert max(encode_chat(load_tokenizer(path), [{"role": "user", "content": "hi"}])) < 320


def test_qwen3_5_fused_directory_holds_the_in_memory_layout(tiny_model_dir):
    tensors = SafetensorsDir(tiny_model_dir("qwen3_5_moe", layout="conditional_generation", expert_layout="fused"))
    assert tensors.shape("model.language_model.layers.0.mlp.experts.gate_up_proj") == (4, 64, 64)  # [E, 2F, D]
    assert tensors.shape("model.language_model.layers.3.mlp.experts.down_proj") == (4, 64, 32)  # [E, D, F]
    assert not any(".experts.0." in n for n in tensors.names) and "mtp.fc.weight" in tensors.names
