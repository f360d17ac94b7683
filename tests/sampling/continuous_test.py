"""Continuous batching against the static sampler, `transformers` greedy generation, and itself
across slot counts, meshes and a hybrid (Gated DeltaNet) model."""

import functools

import jax
import numpy as np
import pytest

from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.models.sharding import make_mesh
from sdft_jax.sampling.continuous import ContinuousSampler
from sdft_jax.sampling.rollout_weights import RolloutWeightsConfig
from sdft_jax.sampling.sampler import Sampler, SamplingConfig
from sdft_jax.tokenization import encode_chat, load_tokenizer, stop_token_ids

# Nine prompts of 1 to 13 tokens (ids within the tiny vocabulary): more rows than slots, so slots are
# refilled, and several prompt buckets. With 12 new tokens the ring is 16 + 11 = 27 slots: a call of
# 9 rows x 12 tokens on few slots wraps round it several times.
PROMPTS = [[5, 17, 200, 33, 90, 4], [12, 250, 60], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11], [77],
           [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3], [101, 102], [40, 41, 42, 43, 44], [250] * 7, [66, 6]]
BUCKETS = dict(prompt_buckets=(8, 16), batch_buckets=(4, 16))
SAMPLED = SamplingConfig(temperature=1.0, max_new_tokens=12, **BUCKETS)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12, **BUCKETS)


@functools.cache
def tiny_model(path):
    return load_hf(path)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def static_sampled(llama):
    """The static sampler's temperature-1 rows of PROMPTS, with every step's logits: the reference."""
    return Sampler(stop_ids=(), pad_id=0).generate(llama, PROMPTS, SAMPLED, jax.random.key(7), keep_logits=True)


def assert_same_rows(got, want, atol=1e-5):
    """Same tokens, lengths and stop reasons; log-probs equal to fp32 rounding (the rows' keys sit in
    other cache slots, so attention sums in another order)."""
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert got.stop_reasons == want.stop_reasons
    np.testing.assert_allclose(got.model_logprobs, want.model_logprobs, atol=atol)
    np.testing.assert_allclose(got.sampling_logprobs, want.sampling_logprobs, atol=atol)


# The CPU default decodes on per-layer copies and a `LayerKVCache`; "stacked" on the layer scan and a
# stacked `KVCache` (the accelerator default): each layout's insert writes its own buffers.
@pytest.mark.parametrize("slots, layers", [(1, "copies"), (3, "copies"), (8, "copies"), (3, "stacked")])
def test_sampled_rows_do_not_depend_on_the_slot_count(slots, layers, llama, static_sampled):
    sampler = ContinuousSampler(stop_ids=(), pad_id=0, slots=slots, weights=RolloutWeightsConfig(layers=layers))
    out = sampler.generate(llama, PROMPTS, SAMPLED, jax.random.key(7), keep_logits=True)
    assert_same_rows(out, static_sampled)
    assert np.abs(out.logits - static_sampled.logits).max() < 1e-4
    # Every row ran its 12 tokens; fewer slots, more refills: 9 rows over `slots` slots.
    assert (out.lengths == 12).all()
    assert sampler.inserts == -(-len(PROMPTS) // slots) and sampler.chunks == sampler.inserts
    again = sampler.generate(llama, PROMPTS, SAMPLED, jax.random.key(8))
    assert (again.tokens != out.tokens).any()  # another key, other rows


def test_greedy_rows_equal_the_static_sampler_and_its_row_order(llama):
    ref = Sampler(stop_ids=(), pad_id=0).generate(llama, PROMPTS, GREEDY, jax.random.key(0))
    out = ContinuousSampler(stop_ids=(), pad_id=0, slots=2).generate(llama, PROMPTS, GREEDY, jax.random.key(0))
    assert_same_rows(out, ref)
    assert (out.sampling_logprobs == 0).all()
    # The prompts in another order: each row follows its prompt (greedy rows have no random stream).
    order = [4, 0, 8, 2, 6, 1, 3, 7, 5]
    shuffled = ContinuousSampler(stop_ids=(), pad_id=0, slots=3).generate(
        llama, [PROMPTS[i] for i in order], GREEDY, jax.random.key(0))
    np.testing.assert_array_equal(shuffled.tokens, ref.tokens[order])


def test_stop_ids_and_row_limits_end_rows_as_the_static_sampler(llama, static_sampled):
    free = static_sampled
    # Stop ids taken from the free rows: row 0's 4th token, rows 1 and 2's first.
    stops = {int(free.tokens[0, 3])} | {int(free.tokens[i, 0]) for i in (1, 2)}
    ref = Sampler(stop_ids=tuple(stops), pad_id=1).generate(llama, PROMPTS, SAMPLED, jax.random.key(7))
    assert "stop_token" in ref.stop_reasons and "length" in ref.stop_reasons
    sampler = ContinuousSampler(stop_ids=tuple(stops), pad_id=1, slots=3)
    out = sampler.generate(llama, PROMPTS, SAMPLED, jax.random.key(7))
    assert_same_rows(out, ref)
    for i, n in enumerate(out.lengths):  # frozen after the stop: pad, and no log-prob counted
        assert (out.tokens[i, n:] == 1).all() and (out.model_logprobs[i, n:] == 0).all()
    assert out.lengths[1] == 1 and out.lengths[2] == 1

    # A row limited to n new tokens is the first n of its unlimited row, ended by the length limit
    # (unless a stop id came first).
    limits = [1, 12, 3, 7, 2, 12, 5, 4, 9]
    limited = ContinuousSampler(stop_ids=(), pad_id=1, slots=3).generate(llama, PROMPTS, SAMPLED, jax.random.key(7),
                                                                         max_new_tokens=limits)
    np.testing.assert_array_equal(limited.lengths, limits)
    assert limited.stop_reasons == ["length"] * len(PROMPTS)
    for i, n in enumerate(limits):
        np.testing.assert_array_equal(limited.tokens[i, :n], free.tokens[i, :n])
        np.testing.assert_allclose(limited.model_logprobs[i, :n], free.model_logprobs[i, :n], atol=1e-5)
        assert (limited.tokens[i, n:] == 1).all() and (limited.model_logprobs[i, n:] == 0).all()
    with pytest.raises(ValueError, match=r"max_new_tokens\[1\] = 13: each row's limit must be in \[1, 12\]"):
        sampler.generate(llama, PROMPTS[:2], SAMPLED, jax.random.key(0), max_new_tokens=[1, 13])
    with pytest.raises(ValueError, match="max_new_tokens has 1 entries for 2 prompts"):
        sampler.generate(llama, PROMPTS[:2], SAMPLED, jax.random.key(0), max_new_tokens=[1])


def test_empty_and_overlong_prompts_raise_naming_the_row(llama):  # max_position_embeddings 512
    sampler = ContinuousSampler(stop_ids=(), pad_id=0, slots=2)
    cfg = SamplingConfig(max_new_tokens=8, prompt_buckets=(16, 600), batch_buckets=(4,))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate(llama, [[1, 2], []], cfg, jax.random.key(0))
    too_long = r"prompt 2: 510 prompt tokens \+ max_new_tokens 8 = 518, .*max_position_embeddings \(512\)"
    with pytest.raises(ValueError, match=too_long):
        sampler.generate(llama, [[1], [2], [3] * 510], cfg, jax.random.key(0))
    small = SamplingConfig(max_new_tokens=8, prompt_buckets=(16,), batch_buckets=(4,))
    with pytest.raises(ValueError, match=r"prompt 0 has 17 tokens, more than the largest prompt bucket \(16\)"):
        sampler.generate(llama, [[3] * 17], small, jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 0 has token ids outside the vocabulary"):
        sampler.generate(llama, [[llama.cfg.vocab_size]], small, jax.random.key(0))
    with pytest.raises(ValueError, match="no prompts"):
        sampler.generate(llama, [], small, jax.random.key(0))
    assert sampler.compilations == 0
    with pytest.raises(ValueError, match="ContinuousSampler.slots"):
        ContinuousSampler(stop_ids=(), pad_id=0, slots=0)


def test_sharded_mesh_equals_one_device(tiny_model_dir, static_sampled):
    assert jax.device_count() == 8
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_hf(tiny_model_dir("llama"), mesh=mesh)
    assert not sharded.layers.gate_proj[...].sharding.is_fully_replicated
    sampler = ContinuousSampler(stop_ids=(), pad_id=0, slots=3, mesh=mesh)
    assert sampler.slots == 4  # rounded up to the data-parallel size (data x fsdp)
    out = sampler.generate(sharded, PROMPTS, SAMPLED, jax.random.key(7))
    assert_same_rows(out, static_sampled, atol=1e-4)


def test_greedy_smollm2_equals_transformers_and_the_static_sampler(smollm2_dir, torch_model):
    import torch

    tokenizer = load_tokenizer(smollm2_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "List three prime numbers and explain why each is prime.", "Say hi."]
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
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
    assert any(len(e) < 24 for e in expected) and any(len(e) == 24 for e in expected)  # stopped and cut rows
    model = load_hf(smollm2_dir)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=24, prompt_buckets=(64,), batch_buckets=(4,))
    static = Sampler(stop_ids=stops, pad_id=tokenizer.pad_token_id).generate(model, prompts, cfg, jax.random.key(0))
    out = ContinuousSampler(stop_ids=stops, pad_id=tokenizer.pad_token_id, slots=2).generate(
        model, prompts, cfg, jax.random.key(0))
    assert out.completions() == expected
    assert static.completions() == expected
    np.testing.assert_allclose(out.model_logprobs, static.model_logprobs, atol=1e-4)


@pytest.mark.parametrize("temperature, layers", [(0.0, "copies"), (1.0, "copies"), (1.0, "stacked")])
def test_hybrid_qwen3_5_continuous_equals_static(temperature, layers, tiny_model_dir):
    """A tiny Qwen3.5 (Gated DeltaNet and gated attention layers, made by `transformers`): a slot's
    recurrent and convolution states are replaced when a new row is prefilled into it."""
    model = tiny_model(tiny_model_dir("qwen3_5"))
    assert model.cfg.linear_layers
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=8, **BUCKETS)
    ref = Sampler(stop_ids=(), pad_id=0).generate(model, PROMPTS, cfg, jax.random.key(3))
    sampler = ContinuousSampler(stop_ids=(), pad_id=0, slots=2, weights=RolloutWeightsConfig(layers=layers))
    out = sampler.generate(model, PROMPTS, cfg, jax.random.key(3), max_new_tokens=[8, 3, 8, 5, 8, 2, 8, 8, 1])
    # The limited rows free their slots early: later rows start in slots whose states held others'.
    for i, n in enumerate(out.lengths):
        np.testing.assert_array_equal(out.tokens[i, :n], ref.tokens[i, :n])
        np.testing.assert_allclose(out.model_logprobs[i, :n], ref.model_logprobs[i, :n], atol=1e-5)
    np.testing.assert_array_equal(out.lengths, [8, 3, 8, 5, 8, 2, 8, 8, 1])
