"""The decoder built from layer kinds: the segment plan, the per-part stacking, and the scanned stack
against a plain loop over layers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdft_jax.models import attention as attn
from sdft_jax.models import decoder
from sdft_jax.models.config import LayerKind
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.moe import MoeConfig
from sdft_jax.models.transformer import Transformer, positions_from_mask
from sdft_jax.testing.tiny import random_model, tiny_config

MLP = LayerKind("attention", "mlp")
MOE = LayerKind("attention", "moe")
TINY_MOE = MoeConfig(num_experts=4, top_k=2, expert_hidden=24)


def _plan(kinds):
    return [(s.start, s.period, s.repeats) for s in decoder.plan_segments(tuple(kinds))]


def test_segment_plan_of_a_uniform_stack_is_one_scan():
    assert _plan([MOE] * 48) == [(0, (MOE,), 48)]


def test_segment_plan_puts_a_leading_dense_layer_in_its_own_segment():
    assert _plan([MLP] + [MOE] * 47) == [(0, (MLP,), 1), (1, (MOE,), 47)]


def test_segment_plan_finds_a_repeating_period():
    # Qwen3.5-like: three of one kind, then one of another, repeated.
    kinds = [MOE, MOE, MOE, MLP] * 10
    assert _plan(kinds) == [(0, (MOE, MOE, MOE, MLP), 10)]


def test_segment_plan_of_alternating_kinds_with_a_tail():
    assert _plan([MLP, MOE] * 3 + [MOE]) == [(0, (MLP, MOE), 3), (6, (MOE,), 1)]


def _moe_config(**overrides):
    return dataclasses.replace(tiny_config("qwen3", num_layers=4), architecture="qwen3_moe", moe=TINY_MOE,
                               **overrides)


def test_weights_are_stacked_over_the_layers_that_have_their_part():
    cfg = _moe_config(dense_layers=(1,))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.layers.q_proj.shape[0] == 4
    assert model.layers.gate_proj.shape[0] == 1
    assert model.layers.experts_gate_proj.shape == (3, 4, cfg.hidden_size, 24)
    assert model.layers.router.shape == (3, cfg.hidden_size, 4)
    assert decoder.part_layers(cfg)["moe"] == (0, 2, 3)


def test_a_lora_target_the_model_lacks_is_skipped_but_none_is_an_error():
    cfg = tiny_config("llama")
    model = Transformer(cfg, rngs=nnx.Rngs(0), lora=LoraConfig(rank=2, targets=("q_proj", "experts_up_proj")))
    assert model.layers.adapted == ("q_proj",)
    with pytest.raises(ValueError, match="name no projection"):
        Transformer(cfg, rngs=nnx.Rngs(0), lora=LoraConfig(rank=2, targets=("experts_up_proj",)))


@nnx.jit
def _loop_forward(model, tokens, mask):
    """The decoder written as a Python loop over layers, on `split_layers`' per-layer weights. Jitted like
    the model: run op by op, XLA:CPU rounds differently (one MoE hybrid output off by 1.05e-5 on some CPUs),
    while the jitted loop equals the scan bit for bit there."""
    cfg = model.cfg
    positions = positions_from_mask(mask)
    x = model.embed_tokens(tokens)
    visible = attn.causal_visibility(jnp.arange(tokens.shape[1]), mask)
    rope = model.rope_tables(positions)
    for weights, kind in zip(model.layers.layer_copies(), cfg.layer_kinds, strict=True):
        x, _, _ = decoder.decoder_layer(x, weights, rope, visible, None, cfg=cfg, kind=kind, lora=model.layers.lora,
                                        dtype=model.dtype, token_mask=mask)
    return model.normalize(x)


@pytest.mark.parametrize("dense_layers", [(), (0,), (1,), (0, 2), (3,)])
def test_scanned_segments_equal_a_loop_over_layers(dense_layers):
    cfg = _moe_config(dense_layers=dense_layers)
    model = random_model(cfg, seed=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, cfg.vocab_size)
    mask = jnp.array([[True] * 7, [False] * 2 + [True] * 5])
    scanned, _ = model(tokens, positions_from_mask(mask), mask)
    looped = _loop_forward(model, tokens, mask)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), atol=1e-5)


def test_router_statistics_are_summed_over_moe_layers_counting_real_tokens():
    cfg = _moe_config(dense_layers=(2,))
    model = random_model(cfg, seed=2)
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    mask = jnp.array([[True] * 5, [False] * 3 + [True] * 2])
    out = model.forward(tokens, positions_from_mask(mask), mask)
    stats = out.router_stats
    moe_layers = 3
    assert float(stats.tokens) == moe_layers * 7  # 7 real tokens in each of the 3 MoE layers
    assert float(stats.assignments.sum()) == moe_layers * 7 * TINY_MOE.top_k
    np.testing.assert_allclose(float(stats.prob_sum.sum()), moe_layers * 7, rtol=1e-5)
    assert float(out.aux_loss) == 0.0  # load_balance_coef 0 (the fine-tuning default)


def test_gradients_flow_to_every_stacked_weight_of_a_mixed_stack():
    cfg = _moe_config(dense_layers=(0,))
    model = random_model(cfg, seed=3)
    tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, cfg.vocab_size)
    mask = jnp.ones((2, 6), bool)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        m = nnx.merge(graphdef, p)
        hidden, _ = m(tokens, positions_from_mask(mask), mask)
        return jnp.sum(m.logits(hidden) ** 2)

    def loop_loss(p):
        m = nnx.merge(graphdef, p)
        return jnp.sum(m.logits(_loop_forward(m, tokens, mask)) ** 2)

    grads = nnx.to_flat_state(jax.grad(loss)(params))
    ref = dict(nnx.to_flat_state(jax.grad(loop_loss)(params)))
    for path, g in grads:
        r = np.asarray(ref[path][...])
        assert float(jnp.abs(g[...]).max()) > 0, path
        # Same math, summed in another order: agreement to fp32 precision of each weight's gradient scale.
        np.testing.assert_allclose(np.asarray(g[...]), r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=str(path))


def test_rematerialised_forward_and_gradients_equal_the_plain_ones():
    cfg = _moe_config(dense_layers=(1,))
    plain = random_model(cfg, seed=4)
    tokens = jax.random.randint(jax.random.key(3), (1, 6), 0, cfg.vocab_size)
    mask = jnp.ones((1, 6), bool)

    def loss(model):
        hidden, _ = model(tokens, positions_from_mask(mask), mask)
        return jnp.sum(model.logits(hidden) ** 2)

    remat = random_model(cfg, seed=4)
    remat.remat = "full"
    g_plain = nnx.to_flat_state(nnx.grad(loss)(plain))
    g_remat = dict(nnx.to_flat_state(nnx.grad(loss)(remat)))
    for path, g in g_plain:
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(g_remat[path][...]), rtol=1e-5, atol=1e-7)


def test_cached_moe_decoding_equals_the_full_forward():
    cfg = _moe_config(dense_layers=(1,))
    model = random_model(cfg, seed=5)
    tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, cfg.vocab_size)
    mask = jnp.array([[True] * 6, [False, True, True, True, True, True]])
    positions = positions_from_mask(mask)
    full, _ = model(tokens, positions, mask)
    cache = attn.KVCache.zeros(cfg, batch=2, max_len=8)
    step = functools.partial(model)
    hidden, cache = step(tokens[:, :3], positions[:, :3], mask[:, :3], cache)
    outs = [hidden]
    for t in range(3, 6):
        hidden, cache = step(tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(hidden)
    cached = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(cached)[np.asarray(mask)], np.asarray(full)[np.asarray(mask)], atol=1e-5)


def _hybrid_config(moe: bool = False):
    """A tiny Qwen3.5-style model: Gated DeltaNet in layers 0, 1, 2 and 4, gated attention in 3 and 5."""
    from sdft_jax.models.gated_deltanet import DeltaNetConfig

    base = tiny_config("qwen3", num_layers=6)
    return dataclasses.replace(
        base, architecture="qwen3_5_moe" if moe else "qwen3_5", attention_output_gate=True,
        partial_rotary_factor=0.5, zero_centered_norms=True, linear_layers=(0, 1, 2, 4),
        deltanet=DeltaNetConfig(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=8),
        moe=MoeConfig(num_experts=4, top_k=2, expert_hidden=24, shared_expert_hidden=16) if moe else None)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_hybrid_stack_scans_its_period_and_equals_a_loop(moe):
    cfg = _hybrid_config(moe)
    model = random_model(cfg, seed=6)
    assert model.layers.linear_q_proj.shape[0] == 4 and model.layers.q_gate_proj.shape[0] == 2
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, cfg.vocab_size)
    mask = jnp.array([[True] * 9, [False] * 4 + [True] * 5])
    scanned, _ = model(tokens, positions_from_mask(mask), mask)
    looped = _loop_forward(model, tokens, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(scanned)[real], np.asarray(looped)[real], atol=1e-5)
    # A left-padded row's real tokens come out as the row alone.
    alone, _ = model(tokens[1:, 4:], positions_from_mask(mask[1:, 4:]), mask[1:, 4:])
    np.testing.assert_allclose(np.asarray(scanned)[1, 4:], np.asarray(alone)[0], atol=1e-5)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cached_hybrid_decoding_equals_the_full_forward(moe):
    cfg = _hybrid_config(moe)
    model = random_model(cfg, seed=7)
    tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, cfg.vocab_size)
    mask = jnp.array([[True] * 8, [False, False, True, True, True, True, True, True]])
    positions = positions_from_mask(mask)
    full, _ = model(tokens, positions, mask)
    cache = attn.KVCache.zeros(cfg, batch=2, max_len=10)
    assert cache.k.shape[0] == 2 and cache.linear.recurrent.shape[:2] == (4, 2)
    hidden, cache = model(tokens[:, :5], positions[:, :5], mask[:, :5], cache)
    outs = [hidden]
    for t in range(5, 8):
        hidden, cache = model(tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(hidden)
    cached = jnp.concatenate(outs, axis=1)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)


@pytest.mark.parametrize("which,remat", [("mixed", "none"), ("hybrid", "dots"), ("hybrid-lora", "full")])
def test_grad_sum_comes_back_with_the_stacked_gradients_added(which, remat):
    """`grad_sum` through the forward (micro-batch accumulation, `summed_scan`): seeded with a running sum,
    its cotangent is that sum plus the plain gradients of every stacked array, over several segments
    (a dense layer before MoE layers) and periods of several layers (the hybrid's blocks of rows); the
    other weights' gradients are the plain ones."""
    cfg = _moe_config(dense_layers=(0,)) if which == "mixed" else _hybrid_config(moe=True)
    lora = LoraConfig(rank=2, targets=("q_proj", "linear_q_proj", "experts_down_proj")) if which == "hybrid-lora" else None
    model = Transformer(cfg, rngs=nnx.Rngs(7), lora=lora, remat=remat)
    trainable = nnx.LoRAParam if lora else nnx.Param
    graphdef, params, rest = nnx.split(model, trainable, ...)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), params)
    tokens = jax.random.randint(jax.random.key(6), (2, 7), 0, cfg.vocab_size)
    mask = jnp.array([[True] * 7, [False] * 3 + [True] * 4])

    def loss(p, grad_sum=None):
        m = nnx.merge(graphdef, p, rest)
        out = m.forward(tokens, positions_from_mask(mask), mask, grad_sum=grad_sum)
        return jnp.sum(m.logits(out.hidden) ** 2) + out.aux_loss, out.grad_sum

    plain = jax.jit(jax.grad(lambda p: loss(p)[0]))(params)
    stacked = {name: v[...] for name, v in params["layers"].items()}
    running = {name: jax.random.normal(jax.random.key(i), x.shape) for i, (name, x) in enumerate(stacked.items())}
    seeded = jax.jit(lambda p, r: jax.vjp(loss, p, r)[1]((jnp.ones(()), r)))
    d_params, d_sums = seeded(params, running)
    assert d_sums.keys() == running.keys() and (lora is None or len(running) == 6)
    for name, g in plain["layers"].items():
        want = running[name] + g[...]
        np.testing.assert_allclose(d_sums[name], want, rtol=1e-5, atol=1e-5 * float(jnp.abs(g[...]).max()),
                                   err_msg=name)
        assert float(jnp.abs(d_params["layers"][name][...]).max()) == 0.0  # in the sum instead
    for key in set(plain) - {"layers"}:
        np.testing.assert_allclose(d_params[key][...], plain[key][...], rtol=1e-5, err_msg=key)


def test_grad_sum_is_refused_with_a_cache_or_an_unknown_name():
    cfg = _moe_config()
    model = random_model(cfg, seed=8)
    tokens = jnp.zeros((1, 3), jnp.int32)
    mask = jnp.ones((1, 3), bool)
    cache = attn.KVCache.zeros(cfg, batch=1, max_len=4)
    with pytest.raises(ValueError, match="grad_sum is for the uncached"):
        model.forward(tokens, positions_from_mask(mask), mask, cache, grad_sum={"q_proj": model.layers.q_proj[...]})
    with pytest.raises(ValueError, match=r"grad_sum names \['nope'\]"):
        model.forward(tokens, positions_from_mask(mask), mask, grad_sum={"nope": jnp.zeros(3)})
