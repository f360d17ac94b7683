"""The pure decode loop on rollout weights: traced inside other jitted code, and its cache checked against
the weights' layout. (Its tokens and log-probs against references: tests/sampling/sampler_test.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.models.attention import KVCache
from sdft_jax.sampling.decode import SamplingConfig, cache_length, sample
from sdft_jax.sampling.layer_copies import LayerCopies
from sdft_jax.sampling.rollout_weights import RolloutWeightsConfig, StackedWeights
from sdft_jax.sampling.sampler import Sampler

CFG = SamplingConfig(temperature=0.0, max_new_tokens=4)


def test_sample_inside_jit_equals_the_sampler_and_refuses_a_cache_of_another_layout(tiny_model_dir):
    model = load_hf(tiny_model_dir("llama"))
    spec = RolloutWeightsConfig(dtype="float32").spec(platform="cpu")
    stacked, copies = StackedWeights.make(model, spec), LayerCopies.make(model, spec)
    tokens = jnp.asarray([[0, 5, 6, 7], [1, 2, 3, 4]], jnp.int32)
    mask = tokens > 0
    run = jax.jit(lambda w, t, m: sample(w, t, m, jax.random.key(0), cfg=CFG, stop_ids=(), pad_id=0)[0])
    out = run(stacked, tokens, mask)
    ref = Sampler(stop_ids=(), pad_id=0).generate(copies, [[5, 6, 7], [1, 2, 3, 4]],
                                                  SamplingConfig(temperature=0.0, max_new_tokens=4, prompt_buckets=(4,),
                                                                 batch_buckets=(2,)), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens)
    stacked_cache = KVCache.zeros(model.cfg, 2, cache_length(4, 4), model.dtype)
    with pytest.raises(ValueError, match="a KVCache does not fit LayerCopies, which decodes on a LayerKVCache"):
        sample(copies, tokens, mask, jax.random.key(0), cfg=CFG, stop_ids=(), pad_id=0, cache=stacked_cache)
    small = KVCache.zeros(model.cfg, 2, cache_length(4, 4) - 1, model.dtype)
    with pytest.raises(ValueError, match="too small"):
        sample(stacked, tokens, mask, jax.random.key(0), cfg=CFG, stop_ids=(), pad_id=0, cache=small)
