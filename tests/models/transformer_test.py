"""The decoder against `transformers` torch, cached decoding against the full forward, LoRA, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdft_jax.checkpoints.hf import export_tensors, load_hf
from sdft_jax.models.attention import KVCache
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.transformer import Transformer, positions_from_mask
from sdft_jax.testing.tiny import tiny_config

# A padded batch: right padding, left padding, and a full row.
TOKENS = np.array([[5, 17, 200, 33, 90, 4, 0, 0], [0, 0, 0, 12, 250, 60, 7, 88], [9, 8, 7, 6, 5, 4, 3, 2]])
MASK = np.array([[1] * 6 + [0] * 2, [0] * 3 + [1] * 5, [1] * 8], bool)


def our_logits(model, tokens=TOKENS, mask=MASK):
    mask = jnp.asarray(mask)
    hidden, _ = model(jnp.asarray(tokens), positions_from_mask(mask), mask)
    return np.asarray(model.logits(hidden))


def torch_logits(ref, tokens=TOKENS, mask=MASK):
    import torch

    mask_t = torch.tensor(mask.astype(np.int64))
    # Positions as ours (0 at each row's first real token); HF would otherwise count padding.
    positions = torch.tensor(np.asarray(positions_from_mask(jnp.asarray(mask))))
    with torch.no_grad():
        return ref(input_ids=torch.tensor(tokens), attention_mask=mask_t, position_ids=positions).logits.float().numpy()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("query_block", [0, 3], ids=["one_block", "blocks_of_3"])
def test_logits_match_transformers_on_padded_batch(architecture, query_block, tiny_model_dir, torch_model):
    path = tiny_model_dir(architecture)
    ours = our_logits(load_hf(path, query_block=query_block))  # 8 tokens: blocks of 3, 3, 2 queries
    ref = torch_logits(torch_model(path))
    assert np.abs(ours - ref)[MASK].max() < 1e-4


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_logits_match_transformers(norm_topk_prob, tiny_model_dir, torch_model):
    """Qwen3-MoE (4 experts, top-2, the middle layer dense) as transformers builds it, both routings."""
    path = tiny_model_dir("qwen3_moe", norm_topk_prob=norm_topk_prob)
    model = load_hf(path)
    assert model.cfg.moe.norm_topk_prob is norm_topk_prob and model.cfg.dense_layers == (1,)
    ours = our_logits(model)
    ref = torch_logits(torch_model(path))
    assert np.abs(ours - ref)[MASK].max() < 1e-4


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_gradients_of_every_weight_match_transformers(norm_topk_prob, tiny_model_dir, torch_model):
    path = tiny_model_dir("qwen3_moe", norm_topk_prob=norm_topk_prob)
    _gradients_match_transformers(path, torch_model)


def _gradients_match_transformers(path, torch_model, layout="causal_lm"):
    """d(sum of logits * fixed random weights over real tokens) / d(every weight), ours mapped to HF
    names by the export's mapping (fused experts: torch's in-memory layout), against torch autograd."""
    import torch

    weights = np.random.default_rng(0).normal(size=(*TOKENS.shape, 320)).astype(np.float32) * MASK[..., None]

    def loss(model):
        mask = jnp.asarray(MASK)
        hidden, _ = model(jnp.asarray(TOKENS), positions_from_mask(mask), mask)
        return jnp.sum(model.logits(hidden) * weights)

    model = load_hf(path)
    nnx.update(model, nnx.grad(loss)(model))  # the model now holds its gradients
    ours = export_tensors(model, expert_layout="fused", layout=layout)

    ref = torch_model(path)
    ref.zero_grad()
    positions = torch.tensor(np.asarray(positions_from_mask(jnp.asarray(MASK))))
    logits = ref(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK.astype(np.int64)),
                 position_ids=positions).logits
    (logits * torch.tensor(weights)).sum().backward()
    grads = {name: p.grad.numpy() for name, p in ref.named_parameters() if p.grad is not None}
    untouched = [name for name, p in ref.named_parameters() if p.grad is None]
    ref.zero_grad()
    assert all(name.startswith("model.visual.") for name in untouched), untouched  # text only
    assert set(ours) == set(grads)
    for name, g in grads.items():
        assert np.abs(g).max() > 0, name  # every weight takes part
        if ".experts." in name:
            assert (np.abs(g).max(axis=(1, 2)) > 0).all(), name  # each expert gets tokens
        assert np.abs(ours[name] - g).max() / np.abs(g).max() < 1e-4, name


# Qwen3.5: Gated DeltaNet in layers 0, 1, 2 and 4, gated attention (partial rotary) in layer 3, written
# by transformers' causal LM or its multimodal class (text under model.language_model., a vision tower).
QWEN3_5_CASES = [("qwen3_5", "causal_lm"), ("qwen3_5", "conditional_generation"),
                 ("qwen3_5_moe", "causal_lm"), ("qwen3_5_moe", "conditional_generation")]


@pytest.mark.parametrize("architecture, layout", QWEN3_5_CASES)
def test_qwen3_5_logits_match_transformers_on_padded_batch(architecture, layout, tiny_model_dir, torch_model):
    path = tiny_model_dir(architecture, layout=layout)
    model = load_hf(path)
    assert model.cfg.linear_layers == (0, 1, 2, 4) and model.cfg.partial_rotary_factor == 0.25
    assert (model.cfg.moe is not None) == (architecture == "qwen3_5_moe")
    ref = torch_model(path)
    assert type(ref).__name__.endswith("ForCausalLM" if layout == "causal_lm" else "ForConditionalGeneration")
    assert np.abs(our_logits(model) - torch_logits(ref))[MASK].max() < 1e-4


@pytest.mark.parametrize("architecture, layout", [("qwen3_5", "causal_lm"), ("qwen3_5_moe", "conditional_generation")])
def test_qwen3_5_gradients_of_every_weight_match_transformers(architecture, layout, tiny_model_dir, torch_model):
    _gradients_match_transformers(tiny_model_dir(architecture, layout=layout), torch_model, layout)


def test_tied_embeddings_match_transformers(tiny_model_dir, torch_model):
    path = tiny_model_dir("qwen2", tie_word_embeddings=True)
    model = load_hf(path)
    assert model.lm_head is None
    assert np.abs(our_logits(model) - torch_logits(torch_model(path)))[MASK].max() < 1e-4


def test_padding_does_not_change_real_tokens(tiny_model_dir):
    model = load_hf(tiny_model_dir("llama"))
    row = TOKENS[1:2, 3:]
    alone = our_logits(model, row, np.ones_like(row, bool))
    padded = our_logits(model)[1:2, 3:]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"])
def test_cached_decoding_equals_full_forward_at_every_step(architecture, tiny_model_dir):
    model = load_hf(tiny_model_dir(architecture))
    full = our_logits(model)
    mask = jnp.asarray(MASK)
    positions = positions_from_mask(mask)
    tokens = jnp.asarray(TOKENS)
    cache = KVCache.zeros(model.cfg, batch=3, max_len=12)
    # Prefill 4 slots, then one token per call.
    hidden, cache = model(tokens[:, :4], positions[:, :4], mask[:, :4], cache)
    steps = [np.asarray(model.logits(hidden))]
    for t in range(4, 8):
        hidden, cache = model(tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(np.asarray(model.logits(hidden)))
    cached = np.concatenate(steps, axis=1)
    assert int(cache.index) == 8
    assert np.abs(cached - full)[MASK].max() < 1e-4


def test_cached_forward_of_a_rematerialised_model_is_the_plain_one(tiny_model_dir):
    """`remat` shapes the backward of training forwards only; a cached (inference) forward ignores it."""
    path = tiny_model_dir("llama")
    mask = jnp.asarray(MASK)
    positions = positions_from_mask(mask)
    outs = []
    for model in (load_hf(path), load_hf(path, remat="full")):
        cache = KVCache.zeros(model.cfg, batch=3, max_len=12)
        hidden, cache = model(jnp.asarray(TOKENS), positions, mask, cache)
        outs.append((np.asarray(hidden), np.asarray(cache.k), int(cache.index)))
    np.testing.assert_array_equal(outs[1][0], outs[0][0])
    np.testing.assert_array_equal(outs[1][1], outs[0][1])
    assert outs[0][2] == outs[1][2] == 8


def test_lora_starts_at_base_and_matches_merged_weights(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    base = load_hf(path)
    adapted = load_hf(path, lora=LoraConfig(rank=4, alpha=8.0))
    np.testing.assert_array_equal(our_logits(adapted), our_logits(base))  # B = 0 at init
    # Give B values, then compare with a plain model whose weights have the update folded in by hand.
    layers = adapted.layers
    key = jax.random.key(3)
    for name in layers.adapted:
        key, sub = jax.random.split(key)
        b = getattr(layers, f"{name}_lora_b")
        b[...] = 0.05 * jax.random.normal(sub, b.shape)
        a = np.asarray(getattr(layers, f"{name}_lora_a")[...])
        w = getattr(base.layers, name)
        delta = np.stack([np.tensordot(a[i], np.asarray(b[...])[i], axes=1) for i in range(a.shape[0])])
        w[...] = np.asarray(w[...]) + 2.0 * delta  # scale = alpha / rank = 8 / 4
    np.testing.assert_allclose(our_logits(adapted), our_logits(base), atol=2e-5)


def test_bf16_compute_stays_close_to_fp32(tiny_model_dir):
    path = tiny_model_dir("llama")
    fp32 = our_logits(load_hf(path))
    bf16 = our_logits(load_hf(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    assert bf16.dtype == np.float32  # logits are always fp32
    assert np.abs(bf16 - fp32)[MASK].max() < 0.05
    assert np.abs(bf16 - fp32)[MASK].max() > 0  # really computed in bf16


@pytest.mark.slow
def test_qwen3_5_bf16_error_is_no_larger_than_transformers_bf16_error(tiny_model_dir, torch_model):
    """Qwen3.5-MoE in bf16 (projections, convolution, attention and experts in bf16; the delta rule in
    fp32, as HF's): its distance to fp32 is that of `transformers` in bf16 on the same weights. (This
    random model amplifies rounding: both move logits of scale ~4 by up to ~1 on the full row.)"""
    import torch
    import transformers

    path = tiny_model_dir("qwen3_5_moe")
    fp32 = our_logits(load_hf(path))
    bf16 = our_logits(load_hf(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    torch_fp32, torch_bf16 = torch_logits(torch_model(path)), torch_logits(ref)
    ours, theirs = np.abs(bf16 - fp32)[MASK].max(), np.abs(torch_bf16 - torch_fp32)[MASK].max()
    assert 0 < ours < 1.5 * theirs, (ours, theirs)


@pytest.mark.parametrize("architecture", ["llama", "qwen3_5_moe"])
def test_remat_gives_same_values_and_gradients(architecture, tiny_model_dir):
    path = tiny_model_dir(architecture)

    def loss(model):
        mask = jnp.asarray(MASK)
        hidden, _ = model(jnp.asarray(TOKENS), positions_from_mask(mask), mask)
        return jnp.mean(model.logits(hidden) ** 2)

    plain, remat = load_hf(path), load_hf(path, remat="full")
    v1, g1 = nnx.value_and_grad(loss)(plain)
    v2, g2 = nnx.value_and_grad(loss)(remat)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        if architecture == "llama":  # the same program: bit-identical here
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        else:  # XLA fuses the recomputed Gated DeltaNet / MoE differently: fp32 rounding, which this random
            # model amplifies ~100x (see the bf16 test), moves every gradient by ~1e-5 of its tensor's largest
            np.testing.assert_allclose(a, b, rtol=0, atol=3e-5 * np.abs(a).max())


def test_random_init_has_logical_axes_on_every_param():
    model = Transformer(tiny_config("qwen3"), rngs=nnx.Rngs(0), lora=LoraConfig(rank=2))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        assert len(var.axes) == var.ndim, path
