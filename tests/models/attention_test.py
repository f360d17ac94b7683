"""RoPE against `transformers`' own frequency code, attention masking, and the two KV-cache layouts."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from sdft_jax.models import attention
from sdft_jax.testing.tiny import tiny_config


@pytest.mark.parametrize("rope", ["default", "llama3", "linear"])
def test_inv_freq_matches_transformers(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope, "rope_theta": 500000.0}
    if rope == "llama3":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    if rope == "linear":
        params.update(factor=4.0)
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=512,
                                  rope_parameters=params)
    from sdft_jax.models.config import ModelConfig

    ours = np.asarray(attention.rope_inv_freq(ModelConfig.from_hf(hf.to_dict())))
    if rope == "default":
        ref = 1.0 / (500000.0 ** (np.arange(0, 32, 2) / 32))
    else:
        ref = ROPE_INIT_FUNCTIONS[rope](hf, "cpu")[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_rope_rotates_half_pairs_by_position_angle():
    x = jnp.zeros((1, 2, 1, 4)).at[..., 0].set(1.0)  # unit vector on the first of pair (0, 2)
    inv = jnp.array([1.0, 0.5])
    out = np.asarray(attention.apply_rope(x, attention.rope_tables(jnp.array([[0, 3]]), inv)))
    np.testing.assert_allclose(out[0, 0, 0], [1, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(out[0, 1, 0], [np.cos(3), 0, np.sin(3), 0], atol=1e-6)


def test_query_without_visible_keys_gives_finite_output():
    q = jnp.ones((1, 2, 1, 1, 4))
    k = v = jnp.ones((1, 2, 1, 4))
    visible = attention.causal_visibility(jnp.arange(2), jnp.array([[False, True]]))
    out = attention.attention(q, k, v, visible)
    assert np.isfinite(np.asarray(out)).all()
    assert not bool(visible[0, 0].any()) and bool(visible[0, 1, 1])


def test_cache_shapes():
    cfg = tiny_config("llama")
    cache = attention.KVCache.zeros(cfg, batch=3, max_len=10)
    assert cache.k.shape == (cfg.num_layers, 3, 10, cfg.num_kv_heads, cfg.head_dim)
    assert cache.max_len == 10 and int(cache.index) == 0


def test_reserve_and_commit_keep_the_slots_of_either_layout():
    cfg = tiny_config("llama")
    stacked = attention.KVCache.zeros(cfg, batch=2, max_len=6)
    for cache in (stacked, attention.LayerKVCache.from_stacked(stacked)):
        assert cache.max_len == 6
        cache, visible = cache.reserve(jnp.array([[False, True, True], [True, True, True]]))  # row 0 left-padded
        np.testing.assert_array_equal(cache.valid, [[0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
        np.testing.assert_array_equal(visible[0], [[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]])
        cache = cache.commit(cache.k, cache.v, count=3)
        assert int(cache.index) == 3
        cache, visible = cache.reserve(jnp.array([[True], [False]]))  # one more token; row 1's is padding
        np.testing.assert_array_equal(cache.valid, [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
        np.testing.assert_array_equal(visible[:, 0], [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])


@pytest.mark.parametrize("tokens, B", [(1, 2), (3, 2), (1, 1)], ids=["decode", "prefill", "decode-batch-1"])
def test_layer_cache_attends_like_the_stacked_cache(tokens, B):
    cfg = tiny_config("llama")  # grouped-query: 2 query heads per KV head
    S, K, G, E = 9, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    keys = jax.random.split(jax.random.key(0), 5)
    stacked = attention.KVCache(
        k=jax.random.normal(keys[0], (cfg.num_layers, B, S, K, E)), v=jax.random.normal(keys[1], (cfg.num_layers, B, S, K, E)),
        valid=jnp.array([[True] * 5 + [False] * 4, [False] * 2 + [True] * 3 + [False] * 4][:B]), index=jnp.int32(5))
    layered = attention.LayerKVCache.from_stacked(stacked)
    # Row b's KV head h at b * K + h: keys [B * K, E, S], values [B * K, S, E].
    for b, h in [(0, 0), (0, K - 1), (B - 1, K - 1)]:
        np.testing.assert_array_equal(layered.k[1][b * K + h], np.asarray(stacked.k[1, b, :, h]).T)
        np.testing.assert_array_equal(layered.v[1][b * K + h], np.asarray(stacked.v[1, b, :, h]))
    q = jax.random.normal(keys[2], (B, tokens, K, G, E))
    k, v = jax.random.normal(keys[3], (2, B, tokens, K, E))
    valid = stacked.valid.at[:, 5:5 + tokens].set(True)
    visible = attention.causal_visibility(5 + jnp.arange(tokens), valid)
    ref, (k_all, v_all) = attention.attend_stacked(q, k, v, visible, k_all=stacked.k, v_all=stacked.v,
                                                   layer=jnp.int32(1), slot=stacked.index)
    out, (k_layer, v_layer) = attention.attend_layer(q, k, v, visible, k_cache=layered.k[1], v_cache=layered.v[1],
                                                     slot=stacked.index)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # Both wrote the new keys and values at slots 5.. of layer 1 and nowhere else.
    written = attention.LayerKVCache.from_stacked(attention.KVCache(k=k_all, v=v_all, valid=valid, index=stacked.index))
    np.testing.assert_array_equal(k_layer, written.k[1])
    np.testing.assert_array_equal(v_layer, written.v[1])
    np.testing.assert_array_equal(k_all[0], stacked.k[0])
    np.testing.assert_array_equal(k_all[1, :, 5:5 + tokens], k)


@pytest.mark.parametrize("length, query_block, blocks", [
    (11, 4, 3),  # ragged last block
    (12, 4, 3),
    (5, 8, 1),  # one block: the plain path
    (40, 1, 14),  # more than MAX_QUERY_BLOCKS blocks of 1 asked: blocks grow to 3 queries (14 blocks)
    (9, 0, 1),  # 0 = one block
])
def test_causal_attention_in_blocks_equals_attention(length, query_block, blocks, monkeypatch):
    """Values and gradients of the blocked path equal the plain `attention` with the same causal mask,
    left- and right-padded rows included, at every query that sees a key. A query that sees none (left
    padding) gets a finite average of the values its block reads, different from the plain path's
    average over all keys; nothing reads it."""
    B, K, G, hd = 3, 2, 2, 8
    rng = np.random.default_rng(length)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, length, K, G, hd), (B, length, K, hd), (B, length, K, hd)))
    mask = np.ones((B, length), bool)
    mask[1, :3] = False  # left padding
    mask[2, -2:] = False  # right padding
    visible = attention.causal_visibility(jnp.arange(length), jnp.asarray(mask))
    sees = np.asarray(visible.any(-1))  # [B, T]
    assert not sees[1, :3].any() and sees.sum() == B * length - 3  # right-pad queries see the real keys before them
    weights = jnp.asarray(rng.standard_normal((B, length, K, G, hd)) * sees[:, :, None, None, None], jnp.float32)

    calls = []
    plain_attention = attention.attention
    monkeypatch.setattr(attention, "attention", lambda *a: calls.append(a[0].shape[1]) or plain_attention(*a))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, visible) * weights)

    def value_and_grads(fn):  # jitted: op by op, 14 blocks' forward and backward took minutes to dispatch
        return jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)

    blocked = lambda q, k, v, visible: attention.causal_attention(q, k, v, visible, query_block=query_block)  # noqa: E731
    value, grads = value_and_grads(blocked)
    assert len(calls) == blocks and sum(calls) == length
    ref_value, ref_grads = value_and_grads(plain_attention)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)
    out = np.asarray(blocked(q, k, v, visible))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[sees], np.asarray(plain_attention(q, k, v, visible))[sees], rtol=1e-5, atol=1e-6)


def test_causal_attention_rejects_cross_attention(monkeypatch):
    q = jnp.ones((1, 2, 1, 1, 4))
    k = v = jnp.ones((1, 3, 1, 4))
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):  # the suite's shape checker sees it first
        attention.causal_attention(q, k, v, jnp.ones((1, 2, 3), bool), query_block=1)
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)  # as users run it: the function's own check
    with pytest.raises(ValueError, match="over itself"):
        attention.causal_attention(q, k, v, jnp.ones((1, 2, 3), bool), query_block=1)
