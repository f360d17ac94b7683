"""The sampler against full forwards, `transformers` greedy generation, its own contract, and meshes."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from flax import nnx

from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.models import attention
from sdft_jax.models import lora as lora_lib
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.sharding import make_mesh
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.sampling import processors
from sdft_jax.sampling.layer_copies import LayerCopies
from sdft_jax.sampling.rollout_weights import RolloutWeightsConfig, StackedWeights
from sdft_jax.sampling.sampler import Sampler, SamplingConfig
from sdft_jax.tokenization import encode_chat, load_tokenizer, stop_token_ids

# Prompts of different lengths (so the batch is left-padded); ids within the tiny vocabulary.
PROMPTS = [[5, 17, 200, 33, 90, 4], [12, 250, 60], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11], [77]]
SMALL = dict(prompt_buckets=(16,), batch_buckets=(4,))


GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=10, **SMALL)
STACKED = RolloutWeightsConfig(layers="stacked")
COPIES = RolloutWeightsConfig(layers="copies")
LAYERS = pytest.mark.parametrize("weights", [COPIES, STACKED], ids=["copies", "stacked"])


@functools.cache
def tiny_model(path):
    return load_hf(path)


@pytest.fixture(scope="module")
def free_sampler():
    """A sampler with no stop ids, shared so that tests reuse its compiled programs."""
    return Sampler(stop_ids=(), pad_id=0)


@pytest.fixture(scope="module")
def greedy_free(tiny_model_dir, free_sampler):
    """Greedy completions of PROMPTS by the tiny llama with no stop ids: the reference of several tests."""
    model = tiny_model(tiny_model_dir("llama"))
    return free_sampler.generate(model, PROMPTS, GREEDY, jax.random.key(0))


@pytest.fixture(scope="module")
def sampled_llama(tiny_model_dir, free_sampler):
    """Temperature-1 samples of PROMPTS by the tiny llama, with every step's logits."""
    model = tiny_model(tiny_model_dir("llama"))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, **SMALL)
    return free_sampler.generate(model, PROMPTS, cfg, jax.random.key(0), keep_logits=True)


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(ids, positions_from_mask(mask), mask)
    return model.logits(hidden)


def full_forward_logits(model, prompts, completions):
    """Per row, the fp32 logits predicting each completion token, from one uncached forward over
    prompt ++ completion (right-padded batch)."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, True
    logits = np.asarray(_forward_logits(*nnx.split(model), ids, mask))
    starts = [len(p) - 1 for p in prompts]
    return [logits[i, s:s + len(c)] for i, (s, c) in enumerate(zip(starts, completions, strict=True))]


def log_softmax(x):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32), axis=-1))


def check_against_full_forward(model, out, settings):
    n = out.tokens.shape[1]
    for i, ref in enumerate(full_forward_logits(model, PROMPTS, out.tokens)):
        # Every decode step's logits, not only the sampled token's.
        assert np.abs(out.logits[i] - ref).max() < 1e-4
        picked = (np.arange(n), out.tokens[i])
        np.testing.assert_allclose(out.model_logprobs[i], log_softmax(ref)[picked], atol=1e-4)
        processed = processors.sampling_logits(jnp.asarray(ref), **settings)
        np.testing.assert_allclose(out.sampling_logprobs[i], log_softmax(processed)[picked], atol=1e-4)


def test_cached_steps_and_logprobs_equal_a_full_forward(sampled_llama, tiny_model_dir):
    out = sampled_llama
    assert (out.lengths == 12).all() and out.stop_reasons == ["length"] * 4
    check_against_full_forward(tiny_model(tiny_model_dir("llama")), out, dict(temperature=1.0))
    # At temperature 1 with nothing cut, the two log-probs are one distribution.
    np.testing.assert_array_equal(out.sampling_logprobs, out.model_logprobs)


def test_stacked_and_copied_layers_decode_the_same(sampled_llama, tiny_model_dir, free_sampler):
    # The default on CPU: fp32 per-layer copies, unrolled (the fixtures decode so).
    assert free_sampler.spec.layers == "copies" and free_sampler.spec.dtype == jnp.float32
    model = tiny_model(tiny_model_dir("llama"))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, **SMALL)
    out = Sampler(stop_ids=(), pad_id=0, weights=STACKED).generate(model, PROMPTS, cfg, jax.random.key(0),
                                                                   keep_logits=True)
    np.testing.assert_array_equal(out.tokens, sampled_llama.tokens)
    assert np.abs(out.logits - sampled_llama.logits).max() < 1e-5


@LAYERS
def test_cache_and_weights_are_handed_to_the_next_call(weights, tiny_model_dir, greedy_free):
    model = tiny_model(tiny_model_dir("llama"))
    sampler = Sampler(stop_ids=(), pad_id=0, weights=weights)
    sampler.generate(model, PROMPTS, GREEDY, jax.random.key(0))
    kept = sampler.kept_cache
    copies = weights.layers == "copies"
    assert isinstance(kept, attention.LayerKVCache if copies else attention.KVCache)
    assert isinstance(sampler.kept_weights, LayerCopies if copies else StackedWeights)
    made = sampler.kept_weights
    out = sampler.generate(model, PROMPTS[:3], GREEDY, jax.random.key(0))  # same buckets: reused
    assert sampler.weights_made == 1 and sampler.kept_weights is made  # the same weights: made once
    np.testing.assert_array_equal(out.tokens, greedy_free.tokens[:3])
    # The cache's keys and values were donated to the second call.
    assert all(x.is_deleted() for x in jax.tree.leaves((kept.k, kept.v)))
    assert sampler.compilations == 1
    sampler.generate(model, PROMPTS, dataclasses.replace(GREEDY, max_new_tokens=4), jax.random.key(0))
    assert sampler.kept_cache.valid.shape == (4, 16 + 4 - 1)  # another shape: a new cache
    sampler.clear_cache()
    assert sampler.kept_cache is None and sampler.kept_weights is None


def test_processed_logprobs_equal_a_full_forward(tiny_model_dir):
    model = tiny_model(tiny_model_dir("qwen3"))
    settings = dict(temperature=0.8, top_k=40, top_p=0.9)
    cfg = SamplingConfig(max_new_tokens=12, **settings, **SMALL)
    out = Sampler(stop_ids=(), pad_id=0).generate(model, PROMPTS, cfg, jax.random.key(1), keep_logits=True)
    check_against_full_forward(model, out, settings)
    assert (out.sampling_logprobs > out.model_logprobs).mean() > 0.5  # a sharper distribution than the model's


def test_stop_ids_end_rows_and_freeze_them(greedy_free, tiny_model_dir):
    model = tiny_model(tiny_model_dir("llama"))
    free = greedy_free
    assert free.stop_reasons == ["length"] * 4 and (free.lengths == 10).all()
    # Row 0 stops at its 4th token (or earlier if that token came before); every other row stops
    # at its first token unless that token never appears: the loop then ends as soon as all stop.
    stops = {int(free.tokens[0, 3])} | {int(free.tokens[i, 0]) for i in (1, 2)}
    out = Sampler(stop_ids=tuple(stops), pad_id=1).generate(model, PROMPTS, GREEDY, jax.random.key(0))
    for i in range(len(PROMPTS)):
        row = free.tokens[i].tolist()
        n = next((t + 1 for t, tok in enumerate(row) if tok in stops), 10)
        assert out.lengths[i] == n
        assert out.stop_reasons[i] == ("stop_token" if any(tok in stops for tok in row) else "length")
        # Up to the stop the row is unchanged; afterwards it is frozen: pad, and no log-prob counted.
        np.testing.assert_array_equal(out.tokens[i, :n], free.tokens[i, :n])
        np.testing.assert_allclose(out.model_logprobs[i, :n], free.model_logprobs[i, :n], atol=1e-6)
        assert (out.tokens[i, n:] == 1).all() and (out.model_logprobs[i, n:] == 0).all()
        assert (out.sampling_logprobs[i, n:] == 0).all()
        assert out.completions()[i] == row[:n]
    assert out.lengths[0] <= 4 and out.lengths[1] == 1 and out.lengths[2] == 1


def test_empty_and_overlong_prompts_raise_naming_the_row(tiny_model_dir):
    model = tiny_model(tiny_model_dir("llama"))  # max_position_embeddings 512
    sampler = Sampler(stop_ids=(), pad_id=0)
    cfg = SamplingConfig(max_new_tokens=8, prompt_buckets=(16, 600), batch_buckets=(4,))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate(model, [[1, 2], []], cfg, jax.random.key(0))
    too_long = r"prompt 2: 510 prompt tokens \+ max_new_tokens 8 = 518, .*max_position_embeddings \(512\)"
    with pytest.raises(ValueError, match=too_long):
        sampler.generate(model, [[1], [2], [3] * 510], cfg, jax.random.key(0))
    small = SamplingConfig(max_new_tokens=8, **SMALL)
    with pytest.raises(ValueError, match=r"prompt 0 has 17 tokens, more than the largest prompt bucket \(16\)"):
        sampler.generate(model, [[3] * 17], small, jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 0 has token ids outside the vocabulary"):
        sampler.generate(model, [[model.cfg.vocab_size]], small, jax.random.key(0))
    assert sampler.compilations == 0


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_new_tokens", 0),
    ("prompt_buckets", ()), ("prompt_buckets", (64, 32)), ("batch_buckets", (0, 4)), ("batch_buckets", [1, 2]),
])
def test_sampling_config_rejects_bad_fields(field, value, monkeypatch):
    # The suite's shape checker rejects a list where a tuple is declared before the config's own check does.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match=f"SamplingConfig|{field}"):
        SamplingConfig(**{field: value})
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)  # as users run it: the config's own check
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
        SamplingConfig(**{field: value})


def test_buckets_compile_once_per_shape(tiny_model_dir, free_sampler, greedy_free, caplog):
    model = tiny_model(tiny_model_dir("llama"))
    sampler = free_sampler  # has compiled GREEDY for batch bucket 4 x prompt bucket 16 (greedy_free)
    before = sampler.compilations
    with caplog.at_level(logging.INFO, logger="sdft_jax.sampling.sampler"):
        for batch, length in [(3, 9), (4, 16), (2, 12), (1, 10)]:  # all round up to batch 4 x prompt 16
            cfg = GREEDY if batch > 1 else SamplingConfig(temperature=0.0, max_new_tokens=10, prompt_buckets=(8, 16),
                                                          batch_buckets=(4, 8))
            split = nnx.split(model) if batch == 2 else model  # the (graphdef, state) form works too
            out = sampler.generate(split, [[7] * length] * batch, cfg, jax.random.key(batch))
            assert out.tokens.shape == (batch, 10)
        assert sampler.compilations == before
        sampler.generate(model, [[7] * 5], SamplingConfig(temperature=0.0, max_new_tokens=10, prompt_buckets=(8, 16),
                                                          batch_buckets=(2,)), jax.random.key(0))
        assert sampler.compilations == before + 1  # batch 2 x prompt 8 is a new shape
    assert [r.message for r in caplog.records if "compiled program" in r.message][0].startswith(
        f"sampler: compiled program {before + 1} (batch 2 x prompt 8, 10 new tokens")


def test_batches_above_the_largest_bucket_run_in_parts(sampled_llama, tiny_model_dir):
    model = tiny_model(tiny_model_dir("llama"))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, prompt_buckets=(16,), batch_buckets=(2,))
    parts = Sampler(stop_ids=(), pad_id=0).generate(model, PROMPTS, cfg, jax.random.key(0))
    # Two calls of 2 rows give what one call of 4 gave: row i draws from its own stream.
    np.testing.assert_array_equal(parts.tokens, sampled_llama.tokens)
    np.testing.assert_allclose(parts.model_logprobs, sampled_llama.model_logprobs, atol=1e-5)


def test_greedy_smollm2_equals_transformers_generate(smollm2_dir, torch_model):
    import torch

    tokenizer = load_tokenizer(smollm2_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "List three prime numbers and explain why each is prime."]
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    assert len(set(map(len, prompts))) == 3
    stops = stop_token_ids(tokenizer)
    ref_model = torch_model(smollm2_dir)
    expected = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's thread pool crawls when the 2 cores are shared with other work
    for p in prompts:
        with torch.no_grad():
            out = ref_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     do_sample=False, max_new_tokens=24, eos_token_id=list(stops),
                                     pad_token_id=tokenizer.pad_token_id)
        expected.append(out[0, len(p):].tolist())
    torch.set_num_threads(threads)
    model = load_hf(smollm2_dir)
    sampler = Sampler(stop_ids=stops, pad_id=tokenizer.pad_token_id)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=24, prompt_buckets=(64,), batch_buckets=(4,))
    alone = [sampler.generate(model, [p], cfg, jax.random.key(0)).completions()[0] for p in prompts]
    together = sampler.generate(model, prompts, cfg, jax.random.key(0)).completions()
    assert alone == expected
    assert together == expected


@LAYERS
@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4, alpha=8.0)], ids=["full", "lora"])
def test_sharded_greedy_equals_single_device(lora, weights, tiny_model_dir, free_sampler, greedy_free, caplog):
    assert jax.device_count() == 8
    path = tiny_model_dir("llama")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_hf(path, mesh=mesh, lora=lora)
    assert not sharded.layers.gate_proj[...].sharding.is_fully_replicated
    ref = greedy_free
    if lora is not None:
        # Adapters start with B = 0; give them values so they change the output. The reference is
        # then a single-device model with the adapters folded into its weights.
        merged = load_hf(path)
        key = jax.random.key(0)
        for name in sharded.layers.adapted:
            key, sub = jax.random.split(key)
            b = getattr(sharded.layers, f"{name}_lora_b")
            b[...] = jax.device_put(0.05 * jax.random.normal(sub, b.shape), b[...].sharding)
            w = getattr(merged.layers, name)
            single_device = lambda x: jnp.asarray(jax.device_get(x))  # noqa: E731
            w[...] = lora_lib.merged_weight(w[...], single_device(getattr(sharded.layers, f"{name}_lora_a")[...]),
                                            single_device(b[...]), lora.scale)
        assert not sharded.layers.up_proj_lora_b[...].sharding.is_fully_replicated
        ref = free_sampler.generate(merged, PROMPTS, GREEDY, jax.random.key(0))
        assert (ref.tokens != greedy_free.tokens).any()  # the adapters matter
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=10, prompt_buckets=(16,), batch_buckets=(3,))
    sampler = Sampler(stop_ids=(), pad_id=0, mesh=mesh, weights=weights)
    with caplog.at_level(logging.INFO, logger="sdft_jax.sampling.sampler"):
        out = sampler.generate(sharded, PROMPTS, cfg, jax.random.key(0))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.model_logprobs, ref.model_logprobs, atol=1e-4)
    # The second call reuses the program and the sharded buffers the first one handed back.
    kept = sampler.kept_cache
    assert not kept.valid.sharding.is_fully_replicated  # split over the batch
    # The rollout weights are laid out by the rollout rules: whole over fsdp, split over tensor (the
    # stacked parameter is also split over fsdp). tests/sampling/rollout_weights_test.py checks every rule.
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
    assert spec(sharded.layers.gate_proj[...]) == (None, "fsdp", "tensor")
    made = sampler.kept_weights
    if weights.layers == "copies":
        assert spec(made.layers[0]["gate_proj"]) == (None, "tensor")
    else:
        assert spec(made.model().layers.gate_proj[...]) == (None, None, "tensor")
    again = sampler.generate(sharded, PROMPTS[:2], cfg, jax.random.key(0))
    np.testing.assert_array_equal(again.tokens, ref.tokens[:2])
    assert sampler.compilations == 1 and all(x.is_deleted() for x in jax.tree.leaves((kept.k, kept.v)))
    assert sampler.weights_made == 1  # the same weights: made once
    # New weights (as after a train step): made again (copies: into the sharded old ones).
    w = sharded.layers.down_proj
    w[...] = w[...] * 1.5
    changed = sampler.generate(sharded, PROMPTS, cfg, jax.random.key(0))
    fresh = Sampler(stop_ids=(), pad_id=0, mesh=mesh, weights=weights).generate(sharded, PROMPTS, cfg,
                                                                                 jax.random.key(0))
    assert sampler.weights_made == 2
    np.testing.assert_array_equal(changed.model_logprobs, fresh.model_logprobs)
    assert (changed.model_logprobs != out.model_logprobs).any()
    # The batch bucket 3 is rounded up to a multiple of the data-parallel size (data x fsdp = 4).
    assert "batch 4 x prompt 16" in caplog.text


# Every family with the CPU default (copies); the scan once, on the family with both kinds of layer and
# experts (test_stacked_and_copied_layers_decode_the_same checks the two alike on llama).
@pytest.mark.parametrize("architecture, weights", [("qwen3_moe", COPIES), ("qwen3_5", COPIES),
                                                   ("qwen3_5_moe", COPIES), ("qwen3_5_moe", STACKED)],
                         ids=["qwen3_moe-copies", "qwen3_5-copies", "qwen3_5_moe-copies", "qwen3_5_moe-stacked"])
def test_greedy_equals_transformers_generate_for_moe_and_hybrid_models(architecture, weights, tiny_model_dir,
                                                                        torch_model):
    """Tiny models made by `transformers`: Qwen3-MoE (a dense layer among sparse ones), Qwen3.5 and
    Qwen3.5-MoE (Gated DeltaNet and gated attention layers): our batched greedy decoding (left-padded,
    cached: KV for attention, recurrent and conv state for DeltaNet) equals `generate` of each prompt alone."""
    import torch

    path = tiny_model_dir(architecture)
    ref = torch_model(path)
    expected = []
    for p in PROMPTS:
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, max_new_tokens=GREEDY.max_new_tokens, pad_token_id=0,
                               eos_token_id=None)
        expected.append(out[0, len(p):].tolist())
    model = tiny_model(path)
    assert model.cfg.moe is not None or model.cfg.linear_layers
    got = Sampler(stop_ids=(), pad_id=0, weights=weights).generate(model, PROMPTS, GREEDY, jax.random.key(0))
    assert got.completions() == expected


def test_moe_sampling_with_lora_equals_a_full_forward_copied_or_stacked(tiny_model_dir):
    """LoRA on attention and on every expert: each decode step's logits and log-probs equal an uncached
    forward over prompt ++ completion, whether the decode loop reads per-layer copies or stacked weights."""
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "experts_gate_proj", "experts_up_proj",
                                                  "experts_down_proj", "down_proj"))
    model = load_hf(tiny_model_dir("qwen3_moe"), lora=lora)
    key = jax.random.key(5)
    for name in model.layers.adapted:
        key, sub = jax.random.split(key)
        b = getattr(model.layers, f"{name}_lora_b")
        b[...] = 0.05 * jax.random.normal(sub, b.shape)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, **SMALL)
    outs = [Sampler(stop_ids=(), pad_id=0, weights=weights).generate(model, PROMPTS, cfg, jax.random.key(1),
                                                                     keep_logits=True)
            for weights in (COPIES, STACKED)]
    check_against_full_forward(model, outs[0], dict(temperature=1.0))
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    assert np.abs(outs[0].logits - outs[1].logits).max() < 1e-5


def test_hybrid_deltanet_sampling_equals_a_full_forward_and_reuses_its_cache():
    """A tiny Qwen3.5-style hybrid (Gated DeltaNet and gated attention layers, MoE with a shared expert):
    every step's logits equal an uncached forward, copied or stacked layers; a second call of the same shape,
    on the donated cache whose DeltaNet states hold the first call's summaries, samples the same."""
    from sdft_jax.testing.tiny import random_model, tiny_config

    model = random_model(tiny_config("qwen3_5_moe"), seed=8)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, **SMALL)
    outs = []
    for weights in (COPIES, STACKED):
        sampler = Sampler(stop_ids=(), pad_id=0, weights=weights)
        first = sampler.generate(model, PROMPTS, cfg, jax.random.key(2), keep_logits=True)
        assert sampler.kept_cache is not None and sampler.kept_cache.linear is not None
        again = sampler.generate(model, PROMPTS, cfg, jax.random.key(2), keep_logits=True)
        np.testing.assert_array_equal(again.tokens, first.tokens)
        np.testing.assert_array_equal(again.logits, first.logits)
        outs.append(first)
    check_against_full_forward(model, outs[0], dict(temperature=1.0))
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    assert np.abs(outs[0].logits - outs[1].logits).max() < 1e-5
