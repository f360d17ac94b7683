"""Per-layer copies: made once for many calls on the same weights, made again (into the old copies' memory)
when a weight is replaced, never read stale; their unrolled step equals the model's scanned one."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.models.attention import KVCache, LayerKVCache
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.sampling.layer_copies import LayerCopies
from sdft_jax.sampling.rollout_weights import RolloutWeightsConfig, StackedWeights
from sdft_jax.sampling.sampler import Sampler, SamplingConfig, decode_step

PROMPTS = [[5, 17, 200, 33, 90, 4], [12, 250, 60], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11], [77]]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=10, prompt_buckets=(16,), batch_buckets=(4,))
FP32_COPIES = RolloutWeightsConfig(dtype="float32", layers="copies")


def test_copies_are_kept_while_the_weights_stay_the_same(tiny_model_dir):
    model = load_hf(tiny_model_dir("llama"))  # its own: changed below
    sampler = Sampler(stop_ids=(), pad_id=0, weights=FP32_COPIES)
    first = sampler.generate(model, PROMPTS, GREEDY, jax.random.key(0))
    made = sampler.kept_weights
    assert isinstance(made, LayerCopies) and len(made.layers) == len(model.cfg.layer_kinds)
    graphdef, state = nnx.split(model)  # the train loop's form: the same arrays
    out = sampler.generate((graphdef, state), PROMPTS, GREEDY, jax.random.key(0))
    assert sampler.weights_made == 1 and sampler.kept_weights is made
    np.testing.assert_array_equal(out.tokens, first.tokens)

    # A train step hands back new arrays: the copies are made again, into the old ones' memory.
    w = model.layers.down_proj
    w[...] = w[...] * 1.5
    changed = sampler.generate(model, PROMPTS, GREEDY, jax.random.key(0))
    assert sampler.weights_made == 2 and all(x.is_deleted() for x in jax.tree.leaves(made.layers))
    fresh = Sampler(stop_ids=(), pad_id=0, weights=FP32_COPIES).generate(model, PROMPTS, GREEDY, jax.random.key(0))
    np.testing.assert_array_equal(changed.tokens, fresh.tokens)
    np.testing.assert_array_equal(changed.model_logprobs, fresh.model_logprobs)
    assert (changed.model_logprobs != out.model_logprobs).any()

    # A weight donated away (deleted) is never taken for the one the copies were made from.
    assert sampler.has_weights_of(model)
    model.layers.down_proj[...].delete()
    assert not sampler.has_weights_of(model)


def test_unrolled_step_equals_the_scanned_step(tiny_model_dir):
    """One prefill and one decode step of the copies' unrolled step on a `LayerKVCache` equal the model's
    own (scanned) cached forward on a stacked `KVCache`: hidden states and the cache's keys and values."""
    model = load_hf(tiny_model_dir("qwen3"))
    spec = FP32_COPIES.spec()
    copies, stacked = LayerCopies.make(model, spec), StackedWeights.make(model, spec)
    # fp32 on one device: nothing to cast or move, so the rest of the model is the very same arrays.
    assert all(a is b for a, b in zip(jax.tree.leaves(copies.state), jax.tree.leaves(nnx.state(model)), strict=True))
    tokens = jnp.asarray([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], jnp.int32)
    mask = jnp.asarray([[False, False, True, True, True], [True] * 5])
    hidden = {}
    for weights in (copies, stacked):
        m = weights.model()
        cache = weights.empty_cache(m, 2, 8)
        assert isinstance(cache, LayerKVCache if weights is copies else KVCache)
        step = weights.decode_step(m, cache.max_len)
        h0, cache = step(tokens, positions_from_mask(mask), mask, cache)
        h1, cache = step(jnp.asarray([[9], [10]]), jnp.asarray([[3], [5]]), jnp.ones((2, 1), bool), cache)
        k = jnp.stack(cache.k) if isinstance(cache, LayerKVCache) else cache.k
        # The two caches lay their buffers out differently: compare the keys' values, sorted.
        hidden[type(weights).__name__] = (h0, h1, jnp.sort(k.reshape(-1)))
    assert decode_step(model) is model  # the scanned step is the model's own cached forward
    for a, b in zip(hidden["LayerCopies"], hidden["StackedWeights"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
