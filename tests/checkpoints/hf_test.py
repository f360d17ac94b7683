"""HF directories: round trip, sharded loading, LoRA export, and clear errors on bad directories."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from sdft_jax.checkpoints.hf import checkpoint_expert_layout, export_tensors, load_hf, save_hf
from sdft_jax.checkpoints.safetensors_io import SafetensorsDir
from sdft_jax.errors import ModelError
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.sharding import make_mesh

from tests.models.transformer_test import MASK, our_logits, torch_logits


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_round_trip_is_bit_identical(architecture, tiny_model_dir, tmp_path):
    src = tiny_model_dir(architecture)
    save_hf(load_hf(src), tmp_path / "out", tokenizer_dir=src)
    a, b = SafetensorsDir(src), SafetensorsDir(tmp_path / "out")
    assert a.names == b.names
    for name in a.names:
        np.testing.assert_array_equal(np.asarray(a.read(name)), np.asarray(b.read(name)), err_msg=name)
    with open(os.path.join(src, "config.json")) as f1, open(tmp_path / "out" / "config.json") as f2:
        c1, c2 = json.load(f1), json.load(f2)
    assert {k: c1[k] for k in ("model_type", "hidden_size", "num_key_value_heads")} == \
        {k: c2[k] for k in ("model_type", "hidden_size", "num_key_value_heads")}
    assert os.path.exists(tmp_path / "out" / "tokenizer.json")


def test_sharded_export_writes_an_index(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    save_hf(load_hf(src), tmp_path / "out", max_shard_bytes=64 * 1024)
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    np.testing.assert_array_equal(our_logits(load_hf(tmp_path / "out")), our_logits(load_hf(src)))


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_loading_gives_same_logits(mesh_shape, tiny_model_dir):
    assert jax.device_count() == 8
    path = tiny_model_dir("qwen3")
    mesh = make_mesh(mesh_shape)
    sharded = load_hf(path, mesh=mesh)
    q = sharded.layers.q_proj[...]
    spec = q.sharding.spec
    assert spec[1] == "fsdp" and (spec[2] == "tensor") == (mesh_shape["tensor"] > 1)
    assert len({s.device for s in q.addressable_shards}) == 8
    np.testing.assert_allclose(our_logits(sharded), our_logits(load_hf(path)), atol=1e-5)


def test_lora_export_folds_adapters_and_transformers_agrees(tiny_model_dir, torch_model, tmp_path):
    path = tiny_model_dir("llama")
    model = load_hf(path, lora=LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj")))
    for name in ("q_proj_lora_b", "down_proj_lora_b"):
        var = getattr(model.layers, name)
        var[...] = 0.1 * jax.random.normal(jax.random.key(7), var.shape)
    save_hf(model, tmp_path / "merged", tokenizer_dir=path)
    ours = our_logits(model)
    ref = torch_logits(torch_model(str(tmp_path / "merged")))
    assert np.abs(ours - ref)[MASK].max() < 1e-4
    assert not np.allclose(ours, our_logits(load_hf(path)), atol=1e-3)  # the adapters changed the model


def test_export_refuses_to_overwrite(tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_hf(load_hf(tiny_model_dir("llama")), tmp_path / "out")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_missing_config(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    os.remove(d / "config.json")
    with pytest.raises(ModelError, match="missing config.json"):
        load_hf(d)


def test_error_not_a_directory(tmp_path):
    with pytest.raises(ModelError, match="not a model directory"):
        load_hf(tmp_path / "nope")


def test_error_no_weights(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    os.remove(d / "model.safetensors")
    with pytest.raises(ModelError, match="no model weights"):
        load_hf(d)


def test_error_pickle_checkpoint_is_never_loaded(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(ValueError, match="pickle checkpoints .*pytorch_model.bin.*never unpickles"):
        load_hf(d)


def test_error_unknown_architecture(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt_neox'"):
        load_hf(d)


def test_error_wrong_shape_names_the_tensor(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the weights have 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape .* expected"):
        load_hf(d)


def test_error_missing_tensor(tiny_model_dir, tmp_path):
    from safetensors.numpy import save_file

    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    tensors = {n: np.asarray(SafetensorsDir(d).read(n)) for n in SafetensorsDir(d).names}
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 tensors missing .*layers\.1\.self_attn\.k_proj\.weight"):
        load_hf(d)


def test_error_truncated_weights(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("llama"), tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_hf(d)


def test_export_tensors_names_match_transformers(tiny_model_dir, torch_model):
    path = tiny_model_dir("qwen2")
    ours = export_tensors(load_hf(path))
    ref = {k for k in torch_model(path).state_dict()}
    assert set(ours) == ref


# Qwen3-MoE: directories written by transformers (4 experts, top-2, layer 1 dense).


def _tensors(path):
    tensors = SafetensorsDir(path)
    return {n: np.asarray(tensors.read(n)) for n in tensors.names}


def _assert_same_bytes(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_moe_round_trip_is_bit_identical_in_either_layout(layout, tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen3_moe", expert_layout=layout)
    assert checkpoint_expert_layout(src) == layout
    save_hf(load_hf(src), tmp_path / "out", tokenizer_dir=src, expert_layout=checkpoint_expert_layout(src))
    assert checkpoint_expert_layout(tmp_path / "out") == layout
    _assert_same_bytes(_tensors(src), _tensors(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "qwen3_moe" and config["mlp_only_layers"] == [1]


def test_moe_layouts_hold_the_same_weights(tiny_model_dir):
    """A per-expert checkpoint exported fused is transformers' own in-memory state dict, and back."""
    per_expert = tiny_model_dir("qwen3_moe")
    fused = tiny_model_dir("qwen3_moe", expert_layout="fused")  # same seed: the same weights
    names = set(_tensors(per_expert))
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in names and "model.layers.1.mlp.gate_proj.weight" in names
    assert not any(n.startswith("model.layers.1.mlp.experts") for n in names)
    _assert_same_bytes(export_tensors(load_hf(per_expert), expert_layout="fused"), _tensors(fused))
    _assert_same_bytes(export_tensors(load_hf(fused)), _tensors(per_expert))


def test_sharded_moe_loading_gives_same_logits(tiny_model_dir):
    path = tiny_model_dir("qwen3_moe")
    sharded = load_hf(path, mesh=make_mesh(dict(data=2, fsdp=2, tensor=2)))
    assert len({s.device for s in sharded.layers.experts_up_proj[...].addressable_shards}) == 8
    np.testing.assert_allclose(our_logits(sharded), our_logits(load_hf(path)), atol=1e-5)


def test_expert_layout_of_a_dense_model_is_none(tiny_model_dir):
    assert checkpoint_expert_layout(tiny_model_dir("qwen3")) is None


def test_transformers_loads_the_moe_export(tiny_model_dir, torch_model, tmp_path):
    src = tiny_model_dir("qwen3_moe", norm_topk_prob=False)
    model = load_hf(src)
    save_hf(model, tmp_path / "out", tokenizer_dir=src)
    ref = torch_logits(torch_model(str(tmp_path / "out")))
    assert np.abs(our_logits(model) - ref)[MASK].max() < 1e-4
    np.testing.assert_array_equal(ref, torch_logits(torch_model(src)))


def test_moe_lora_export_is_the_merged_weights(tiny_model_dir, torch_model, tmp_path):
    src = tiny_model_dir("qwen3_moe")
    lora = LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "gate_proj", "experts_gate_proj",
                                                   "experts_up_proj", "experts_down_proj"))
    model = load_hf(src, lora=lora)
    key = jax.random.key(7)
    for name in model.layers.adapted:
        key, sub = jax.random.split(key)
        var = getattr(model.layers, f"{name}_lora_b")
        var[...] = 0.1 * jax.random.normal(sub, var.shape)
    save_hf(model, tmp_path / "merged", tokenizer_dir=src)
    exported = _tensors(tmp_path / "merged")
    # By hand: W_e + scale * A_e @ B_e, in HF's [out, in], for expert 3 of sparse layer 2 (index 1 of the stack).
    layers = model.layers
    for ours, hf in (("experts_up_proj", "up_proj"), ("experts_down_proj", "down_proj")):
        w, a, b = (np.asarray(getattr(layers, n)[...])[1, 3] for n in (ours, f"{ours}_lora_a", f"{ours}_lora_b"))
        np.testing.assert_allclose(exported[f"model.layers.2.mlp.experts.3.{hf}.weight"], (w + 2.0 * a @ b).T,
                                   rtol=1e-6, atol=1e-7)
    assert not np.allclose(exported["model.layers.2.mlp.experts.3.up_proj.weight"],
                           _tensors(src)["model.layers.2.mlp.experts.3.up_proj.weight"], atol=1e-3)
    ours = our_logits(model)
    assert np.abs(ours - torch_logits(torch_model(str(tmp_path / "merged"))))[MASK].max() < 1e-4
    assert not np.allclose(ours, our_logits(load_hf(src)), atol=1e-3)  # the adapters changed the model


@pytest.mark.parametrize("layout, name", [
    ("per_expert", "model.layers.2.mlp.experts.3.up_proj.weight"),
    ("fused", "model.layers.2.mlp.experts.gate_up_proj"),
    ("per_expert", "model.layers.0.mlp.gate.weight"),
])
def test_moe_error_missing_expert_tensor_names_it(layout, name, tiny_model_dir, tmp_path):
    from safetensors.numpy import save_file

    d = _copy(tiny_model_dir("qwen3_moe", expert_layout=layout), tmp_path / "m")
    tensors = _tensors(d)
    del tensors[name]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 tensors missing .*" + name.replace(".", r"\.")):
        load_hf(d)


@pytest.mark.parametrize("layout, name, shape", [
    ("per_expert", "model.layers.2.mlp.experts.3.up_proj.weight", (33, 64)),
    ("per_expert", "model.layers.0.mlp.experts.1.down_proj.weight", (32, 64)),  # transposed
    ("fused", "model.layers.2.mlp.experts.gate_up_proj", (4, 62, 64)),
    ("fused", "model.layers.0.mlp.experts.down_proj", (3, 64, 32)),
])
def test_moe_error_wrong_shape_names_the_tensor(layout, name, shape, tiny_model_dir, tmp_path):
    from safetensors.numpy import save_file

    d = _copy(tiny_model_dir("qwen3_moe", expert_layout=layout), tmp_path / "m")
    tensors = _tensors(d)
    tensors[name] = np.zeros(shape, np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + r" has shape .* expected"):
        load_hf(d)


def test_moe_error_mixed_expert_layouts(tiny_model_dir, tmp_path):
    from safetensors.numpy import save_file

    d = _copy(tiny_model_dir("qwen3_moe"), tmp_path / "m")
    tensors = _tensors(d)
    tensors["model.layers.0.mlp.experts.down_proj"] = np.zeros((4, 64, 32), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="both the fused and the per-expert layout"):
        load_hf(d)


# Qwen3.5 / Qwen3.5-MoE: directories written by transformers, as a causal LM or in the released
# checkpoints' multimodal layout (text under model.language_model., a vision tower, an MTP head).


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("architecture, layout, expert_layout", [
    ("qwen3_5", "causal_lm", "per_expert"), ("qwen3_5", "conditional_generation", "per_expert"),
    ("qwen3_5_moe", "causal_lm", "fused"), ("qwen3_5_moe", "conditional_generation", "per_expert"),
    ("qwen3_5_moe", "conditional_generation", "fused"),
])
def test_qwen3_5_round_trip_is_bit_identical_with_the_unused_tensors(architecture, layout, expert_layout,
                                                                      tiny_model_dir, tmp_path):
    src = tiny_model_dir(architecture, layout=layout, expert_layout=expert_layout)
    save_hf(load_hf(src), tmp_path / "out", tokenizer_dir=src, source_dir=src)
    ours, theirs = _tensors(tmp_path / "out"), _tensors(src)
    _assert_same_bytes(ours, theirs)
    if layout == "conditional_generation":
        assert any(n.startswith("model.visual.") for n in ours) and any(n.startswith("mtp.") for n in ours)
    assert _json(tmp_path / "out" / "config.json") == _json(os.path.join(src, "config.json"))


def test_qwen3_5_load_logs_the_unused_tensors_once(tiny_model_dir, caplog):
    src = tiny_model_dir("qwen3_5", layout="conditional_generation")
    visual = sum(n.startswith("model.visual.") for n in SafetensorsDir(src).names)
    with caplog.at_level("INFO", logger="sdft_jax.checkpoints.hf"):
        load_hf(src)
    lines = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(lines) == 1 and f"{visual + 6} tensors" in lines[0]
    assert f"model.visual.*: {visual}, mtp.*: 6" in lines[0]


def test_qwen3_5_export_without_source_is_a_causal_lm(tiny_model_dir, torch_model, tmp_path):
    """A multimodal checkpoint exported without its source: the text model as `Qwen3_5ForCausalLM`."""
    src = tiny_model_dir("qwen3_5", layout="conditional_generation")
    model = load_hf(src)
    save_hf(model, tmp_path / "out", tokenizer_dir=src)
    config = _json(tmp_path / "out" / "config.json")
    assert config["model_type"] == "qwen3_5_text" and config["architectures"] == ["Qwen3_5ForCausalLM"]
    text = {n.replace("model.language_model.", "model."): v for n, v in _tensors(src).items()
            if not n.startswith(("model.visual.", "mtp."))}
    _assert_same_bytes(_tensors(tmp_path / "out"), text)
    ref = torch_logits(torch_model(str(tmp_path / "out")))
    assert type(torch_model(str(tmp_path / "out"))).__name__ == "Qwen3_5ForCausalLM"
    np.testing.assert_array_equal(ref, torch_logits(torch_model(src)))


@pytest.mark.parametrize("architecture, layout", [("qwen3_5", "conditional_generation"), ("qwen3_5_moe", "causal_lm")])
def test_transformers_loads_the_qwen3_5_lora_export(architecture, layout, tiny_model_dir, torch_model, tmp_path):
    src = tiny_model_dir(architecture, layout=layout)
    targets = ("q_proj", "q_gate_proj", "o_proj", "linear_q_proj", "linear_v_proj", "linear_z_proj",
               "linear_a_proj", "linear_out_proj", "down_proj", "experts_up_proj", "shared_expert_down_proj")
    model = load_hf(src, lora=LoraConfig(rank=2, alpha=4.0, targets=targets))
    key = jax.random.key(7)
    for name in model.layers.adapted:
        key, sub = jax.random.split(key)
        var = getattr(model.layers, f"{name}_lora_b")
        var[...] = 0.3 * jax.random.normal(sub, var.shape)
    save_hf(model, tmp_path / "merged", tokenizer_dir=src, source_dir=src)
    ref = torch_model(str(tmp_path / "merged"))
    assert type(ref).__name__.endswith("ForCausalLM" if layout == "causal_lm" else "ForConditionalGeneration")
    ours = our_logits(model)
    assert np.abs(ours - torch_logits(ref))[MASK].max() < 1e-4
    assert not np.allclose(ours, our_logits(load_hf(src)), atol=1e-3)  # the adapters changed the model
    merged, source = _tensors(tmp_path / "merged"), _tensors(src)
    for name in source:  # what the adapters do not touch is copied exactly
        if name.startswith(("model.visual.", "mtp.")) or name.endswith(("A_log", "conv1d.weight", "norm.weight")):
            assert merged[name].tobytes() == source[name].tobytes(), name


def test_qwen3_5_export_refuses_a_source_of_another_model(tiny_model_dir, tmp_path):
    model = load_hf(tiny_model_dir("qwen3_5"))
    with pytest.raises(ValueError, match=r"describes another model .*'moe'"):
        save_hf(model, tmp_path / "out", source_dir=tiny_model_dir("qwen3_5_moe"))


def _rewrite(d, change):
    from safetensors.numpy import save_file

    tensors = _tensors(d)
    change(tensors)
    save_file(tensors, str(d / "model.safetensors"))


@pytest.mark.parametrize("layout, name", [
    ("causal_lm", "model.layers.1.linear_attn.in_proj_qkv.weight"),
    ("conditional_generation", "model.language_model.layers.4.linear_attn.A_log"),
    ("conditional_generation", "model.language_model.layers.3.self_attn.q_proj.weight"),
])
def test_qwen3_5_error_missing_tensor_names_it(layout, name, tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("qwen3_5", layout=layout), tmp_path / "m")
    _rewrite(d, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"1 tensors missing .*" + name.replace(".", r"\.")):
        load_hf(d)


@pytest.mark.parametrize("name, shape", [
    ("model.language_model.layers.3.self_attn.q_proj.weight", (64, 64)),  # without the gate rows
    ("model.language_model.layers.0.linear_attn.in_proj_qkv.weight", (48, 64)),  # v rows missing
    ("model.language_model.layers.2.linear_attn.conv1d.weight", (64, 1, 3)),  # another kernel width
    ("model.language_model.layers.4.linear_attn.dt_bias", (2,)),
])
def test_qwen3_5_error_wrong_shape_names_the_tensor(name, shape, tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("qwen3_5", layout="conditional_generation"), tmp_path / "m")
    _rewrite(d, lambda t: t.update({name: np.zeros(shape, np.float32)}))
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + r" has shape .* expected"):
        load_hf(d)


def test_qwen3_5_error_unknown_layer_type_names_the_field(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("qwen3_5", layout="conditional_generation"), tmp_path / "m")
    config = _json(d / "config.json")
    config["text_config"]["layer_types"][1] = "sliding_attention"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layer_types .*sliding_attention"):
        load_hf(d)


def test_qwen3_5_error_text_tensors_in_both_layouts(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir("qwen3_5", layout="conditional_generation"), tmp_path / "m")
    _rewrite(d, lambda t: t.update({"model.norm.weight": t["model.language_model.norm.weight"]}))
    with pytest.raises(ValueError, match="both under model.language_model. and model."):
        load_hf(d)
