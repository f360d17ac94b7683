"""The attention token mixer against `transformers`' Qwen3.5 gated attention (output gate from q_proj,
partial RoPE, zero-centered q/k norms), values and gradients, on a left-padded batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.models import attention as attn
from sdft_jax.models import self_attention
from sdft_jax.models.norm import rms_norm
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.testing.tiny import tiny_config

torch = pytest.importorskip("torch")

D, H, K, HD, ROTARY_FACTOR = 64, 4, 2, 16, 0.5
MASK = np.array([[True] * 7, [False] * 3 + [True] * 4])


def _hf_attention():
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    config = Qwen3_5TextConfig(
        vocab_size=64, hidden_size=D, intermediate_size=96, num_hidden_layers=4, num_attention_heads=H,
        num_key_value_heads=K, head_dim=HD, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": ROTARY_FACTOR,
                         "mrope_section": [2, 1, 1]})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    module = hf.Qwen3_5Attention(config, layer_idx=3).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn_like(p))  # norms too: zero-centered gains around 1 + 0
    return config, module, hf.Qwen3_5TextRotaryEmbedding(config)


HF_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def _our_weights(hf: dict) -> dict[str, np.ndarray]:
    """Ours `[in, out]` with heads split, from HF's tensors (`nn.Linear` rows, or their gradients);
    q_proj's rows hold, per head, the head's queries then its gate."""
    hf = {n: t.detach().numpy() for n, t in hf.items()}
    q = hf["q_proj"].reshape(H, 2 * HD, D)
    return {
        "q_proj": q[:, :HD].transpose(2, 0, 1),
        "q_gate_proj": q[:, HD:].transpose(2, 0, 1),
        "k_proj": hf["k_proj"].T.reshape(D, K, HD),
        "v_proj": hf["v_proj"].T.reshape(D, K, HD),
        "o_proj": hf["o_proj"].T.reshape(H, HD, D),
        "q_norm": hf["q_norm"],
        "k_norm": hf["k_norm"],
    }


def _config():
    return dataclasses.replace(tiny_config("qwen3", hidden_size=D, num_heads=H, num_kv_heads=K, head_dim=HD),
                               attention_output_gate=True, partial_rotary_factor=ROTARY_FACTOR,
                               zero_centered_norms=True, rms_norm_eps=1e-6)


def _ours(cfg, w, x):
    mask = jnp.asarray(MASK)
    rope = attn.rope_tables(positions_from_mask(mask), attn.rope_inv_freq(cfg))
    visible = attn.causal_visibility(jnp.arange(x.shape[1]), mask)
    out, _ = self_attention.self_attention(x, w, rope, visible, None, cfg=cfg, lora=None, query_block=0)
    return out


def _theirs(config, module, rotary, x):
    positions = torch.tensor(np.asarray(positions_from_mask(jnp.asarray(MASK))))
    cos, sin = rotary(x, positions)
    T = x.shape[1]
    allowed = np.tril(np.ones((T, T), bool))[None] & MASK[:, None, :]
    bias = torch.tensor(np.where(allowed, 0.0, -1e9)[:, None].astype(np.float32))
    out, _ = module(x, (cos, sin), bias)
    return out


def test_param_shapes_add_the_gate_only_when_asked():
    assert "q_gate_proj" not in self_attention.param_shapes(tiny_config("qwen3"))
    assert self_attention.param_shapes(_config())["q_gate_proj"] == ((D, H, HD), ("embed", "q_heads", "head_dim"))


def test_partial_rope_rotates_the_first_dims_only():
    cfg = _config()
    assert cfg.rotary_dim == 8 and attn.rope_inv_freq(cfg).shape == (4,)
    x = jax.random.normal(jax.random.key(0), (1, 3, 2, HD))
    rotated = attn.apply_rope(x, attn.rope_tables(jnp.array([[0, 5, 9]]), attn.rope_inv_freq(cfg)))
    np.testing.assert_array_equal(np.asarray(rotated[..., 8:]), np.asarray(x[..., 8:]))
    assert np.abs(np.asarray(rotated[:, 1:, :, :8] - x[:, 1:, :, :8])).max() > 1e-2


def test_zero_centered_norm_scales_by_one_plus_the_weight():
    x = jax.random.normal(jax.random.key(1), (3, 8))
    w = jax.random.normal(jax.random.key(2), (8,))
    plain = rms_norm(x, 1.0 + w, 1e-6)
    np.testing.assert_allclose(np.asarray(rms_norm(x, w, 1e-6, zero_centered=True)), np.asarray(plain), rtol=1e-6)


def test_gated_attention_equals_transformers_values_and_gradients():
    config, module, rotary = _hf_attention()
    cfg = _config()
    w = {n: jnp.asarray(a) for n, a in _our_weights({n: getattr(module, n).weight for n in HF_NAMES}).items()}
    x = np.random.default_rng(0).normal(size=(2, 7, D)).astype(np.float32)
    cot = np.random.default_rng(1).normal(size=(2, 7, D)).astype(np.float32) * MASK[..., None]

    x_t = torch.tensor(x, requires_grad=True)
    ref = _theirs(config, module, rotary, x_t)
    (ref * torch.tensor(cot)).sum().backward()
    ours = _ours(cfg, w, jnp.asarray(x))
    assert np.abs(np.asarray(ours) - ref.detach().numpy())[MASK].max() < 1e-5

    grads = jax.grad(lambda w, x: jnp.sum(_ours(cfg, w, x) * cot), argnums=(0, 1))(w, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grads[1]), x_t.grad.numpy(), atol=1e-5)
    ref_grads = _our_weights({n: getattr(module, n).weight.grad for n in HF_NAMES})
    for name, g in ref_grads.items():
        scale = np.abs(g).max()
        assert scale > 0, name
        np.testing.assert_allclose(np.asarray(grads[0][name]), g, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
