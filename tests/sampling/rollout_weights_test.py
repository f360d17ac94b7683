"""Rollout weights: the same tokens as the train state's in fp32, the layout the rules say on 8 devices, bf16
log-probs within a stated tolerance of fp32, and the settings resolved and checked."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from flax import nnx

from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.config import ConfigError, load_train_config
from sdft_jax.distill.train_state import OptimConfig, init_train_state, student_model
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.sharding import make_mesh
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.sampling.layer_copies import LayerCopies
from sdft_jax.sampling.rollout_weights import ROLLOUT_RULES, RolloutWeightsConfig, StackedWeights
from sdft_jax.sampling.sampler import Sampler, SamplingConfig
from sdft_jax.testing.configs import tiny_config
from sdft_jax.tokenization import encode_chat, load_tokenizer

PROMPTS = [[5, 17, 200, 33, 90, 4], [12, 250, 60], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11], [77]]


def spec_of(x) -> tuple:
    """`x`'s PartitionSpec, one entry per dimension."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def test_settings_resolve_by_platform_and_bad_ones_are_named(monkeypatch):
    auto = RolloutWeightsConfig()
    cpu, gpu, tpu = (auto.spec(platform=p) for p in ("cpu", "gpu", "tpu"))
    assert (cpu.dtype, cpu.layers) == (jnp.float32, "copies")
    assert (gpu.dtype, gpu.layers) == (tpu.dtype, tpu.layers) == (jnp.bfloat16, "stacked")
    explicit = RolloutWeightsConfig(dtype="bfloat16", layers="stacked").spec(platform="cpu")
    assert (explicit.dtype, explicit.layers) == (jnp.bfloat16, "stacked")
    assert cpu.rules == ROLLOUT_RULES
    rules = dict(RolloutWeightsConfig(sharding=("embed=fsdp", "mlp=", "vocab=tensor+expert")).rules())
    assert (rules["embed"], rules["mlp"], rules["vocab"], rules["q_heads"]) == ("fsdp", None, ("tensor", "expert"),
                                                                               "tensor")
    # The suite's shape checker refuses a bad literal before the config's own check does: check as users run it.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(ValueError, match="RolloutWeightsConfig.dtype"):
        RolloutWeightsConfig(dtype="float16")
    with pytest.raises(ValueError, match=r"RolloutWeightsConfig.sharding: 'embed=model'"):
        RolloutWeightsConfig(sharding=("embed=model",))
    with pytest.raises(ValueError, match=r"RolloutWeightsConfig.sharding: 'heads'"):
        RolloutWeightsConfig(sharding=("heads",))
    # In a trainer config, the error names the key.
    for key, value in [("rollout.dtype", "float16"), ("rollout.sharding", "embeds=fsdp")]:
        with pytest.raises(ConfigError, match=f"config.{key}"):
            load_train_config(tiny_config("/nonexistent", "/tmp/run", **{key: value}))
    cfg = load_train_config(tiny_config("/nonexistent", "/tmp/run", **{"rollout.dtype": "bfloat16",
                                                                        "rollout.sharding": "embed=fsdp"}))
    assert cfg.rollout.weights() == RolloutWeightsConfig(dtype="bfloat16", sharding=("embed=fsdp",))


@pytest.mark.parametrize("layers", ["copies", "stacked"])
def test_sampling_on_rollout_weights_gives_the_train_states_tokens(layers, tiny_model_dir):
    """fp32 on a data x fsdp x tensor mesh: rollout weights made from a LoRA train state (whole over fsdp,
    adapters and frozen base alike) sample what the train state's own arrays, in their FSDP layout, sample."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_hf(tiny_model_dir("llama"), mesh=mesh, lora=LoraConfig(rank=4, alpha=8.0))
    key = jax.random.key(0)
    for name in model.layers.adapted:  # B = 0 at first: give the adapters a part in the output
        key, sub = jax.random.split(key)
        b = getattr(model.layers, f"{name}_lora_b")
        b[...] = jax.device_put(0.05 * jax.random.normal(sub, b.shape), b[...].sharding)
    graphdef, state = init_train_state(model, OptimConfig(), seed=0)
    student = student_model(graphdef, state)
    weights_cfg = RolloutWeightsConfig(dtype="float32", layers=layers)
    sampler = Sampler(stop_ids=(), pad_id=0, mesh=mesh, weights=weights_cfg)
    weights = sampler.rollout_weights(student)
    assert isinstance(weights, LayerCopies if layers == "copies" else StackedWeights)
    trained = student.layers.gate_proj[...]
    assert spec_of(trained) == (None, "fsdp", "tensor")  # the train layout
    moved = weights.layers[0]["gate_proj"] if layers == "copies" else weights.model().layers.gate_proj[...]
    assert spec_of(moved)[-2:] == (None, "tensor") and moved.dtype == jnp.float32
    # On the train state: its arrays as they are (no cast, no move), decoded by the model's scan.
    on_state = StackedWeights(graphdef=nnx.split(student)[0], state=nnx.state(student))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=10, prompt_buckets=(16,), batch_buckets=(4,))
    got = sampler.generate(weights, PROMPTS, cfg, jax.random.key(1))
    ref = Sampler(stop_ids=(), pad_id=0, mesh=mesh).generate(on_state, PROMPTS, cfg, jax.random.key(1))
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.model_logprobs, ref.model_logprobs, atol=1e-5)
    assert sampler.weights_made == 1  # generate on made weights makes none


@pytest.mark.parametrize("override", [False, True], ids=["rules", "embed=fsdp"])
def test_layout_is_what_the_rules_say(override, tiny_model_dir):
    """8 devices, fsdp x expert x tensor = 2 x 2 x 2, a MoE model (and a dense layer) with LoRA on attention
    and experts: each rollout weight's NamedSharding spec, written out by hand from the rollout rules (whole
    over fsdp, split over tensor and expert), for the stacked weights and each layer's copies; bf16 throughout."""
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "experts_gate_proj", "experts_down_proj"))
    model = load_hf(tiny_model_dir("qwen3_moe"), mesh=mesh, lora=lora)
    assert spec_of(model.embed[...]) == ("tensor", "fsdp")  # the train layout splits `embed` over fsdp
    fsdp = "fsdp" if override else None  # where the rules put `embed`
    expected = {  # by name: logical axes -> mesh axes, the layers axis first
        "embed": ("tensor", fsdp), "lm_head": (fsdp, "tensor"), "final_norm": (fsdp,),
        "q_proj": (None, fsdp, "tensor", None), "k_proj": (None, fsdp, "tensor", None),
        "v_proj": (None, fsdp, "tensor", None), "o_proj": (None, "tensor", None, fsdp),
        "q_norm": (None, None), "k_norm": (None, None),
        "input_layernorm": (None, fsdp), "post_attention_layernorm": (None, fsdp), "router": (None, fsdp, None),
        "experts_gate_proj": (None, "expert", fsdp, "tensor"), "experts_up_proj": (None, "expert", fsdp, "tensor"),
        "experts_down_proj": (None, "expert", "tensor", fsdp),
        "gate_proj": (None, fsdp, "tensor"), "up_proj": (None, fsdp, "tensor"), "down_proj": (None, "tensor", fsdp),
        "q_proj_lora_a": (None, fsdp, None), "q_proj_lora_b": (None, None, "tensor", None),
        "experts_gate_proj_lora_a": (None, "expert", fsdp, None),
        "experts_gate_proj_lora_b": (None, "expert", None, "tensor"),
        "experts_down_proj_lora_a": (None, "expert", "tensor", None),
        "experts_down_proj_lora_b": (None, "expert", None, fsdp),
    }
    weights_cfg = RolloutWeightsConfig(dtype="bfloat16", sharding=("embed=fsdp",) if override else ())
    spec = weights_cfg.spec(mesh)
    stacked, copies = StackedWeights.make(model, spec), LayerCopies.make(model, spec)
    leaves = {path[-1]: x for path, x in nnx.to_flat_state(stacked.state)}
    assert set(leaves) == set(expected)
    for name, x in leaves.items():
        assert (name, spec_of(x)) == (name, expected[name])
        assert x.dtype == jnp.bfloat16
    # Each layer's copies: its parts' weights (the dense layer's MLP, the others' experts).
    assert set().union(*copies.layers) == {n for n in expected if n not in ("embed", "lm_head", "final_norm")}
    for layer in copies.layers:
        for name, x in layer.items():
            assert (name, spec_of(x)) == (name, expected[name][1:]) and x.dtype == jnp.bfloat16
    outside = {path[-1]: x for path, x in nnx.to_flat_state(copies.state) if "layers" not in path}
    assert {n: spec_of(x) for n, x in outside.items()} == {n: expected[n] for n in outside}


@functools.partial(jax.jit, static_argnums=0)
def _completion_logprobs(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(ids, positions_from_mask(mask), mask)
    return jax.nn.log_softmax(model.logits(hidden), axis=-1)


def test_bf16_logprobs_are_within_tolerance_of_fp32(smollm2_dir):
    """SmolLM2-135M sampling at temperature 1 on bf16 rollout weights: the log-probs it reports for its tokens
    against the fp32 model's log-probs of the same tokens (one uncached fp32 forward).

    Tolerance: mean |difference| <= 0.1 nats and max <= 0.5 nats. bf16 keeps 8 significant bits, so every
    weight, activation and cached key/value is rounded by up to 2^-9 (0.2%), through 30 layers; measured
    here (fp32 rollout weights on the same check: at most 4e-5) it is 0.04 mean and 0.19 max. The bounds
    leave 2.5x that for other CPUs' rounding, and stay far below what a wrong cast or cache layout does
    (several nats, and tokens that are nonsense)."""
    tokenizer = load_tokenizer(smollm2_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "List three prime numbers and explain why each is prime.", "Name a colour."]
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    model = load_hf(smollm2_dir)
    n = 24
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=n, prompt_buckets=(64,), batch_buckets=(4,))
    sampler = Sampler(stop_ids=(), pad_id=0, weights=RolloutWeightsConfig(dtype="bfloat16", layers="stacked"))
    out = sampler.generate(model, prompts, cfg, jax.random.key(3))
    bf16 = sampler.kept_weights
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.state))
    assert bf16.model().dtype == jnp.bfloat16 and sampler.kept_cache.k.dtype == jnp.bfloat16
    rows = [list(p) + list(c) for p, c in zip(prompts, out.tokens, strict=True)]
    ids, mask = np.zeros((len(rows), max(map(len, rows))), np.int32), np.zeros((len(rows), max(map(len, rows))), bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    fp32 = np.asarray(_completion_logprobs(*nnx.split(model), ids, mask))
    diff = np.stack([np.abs(out.model_logprobs[i] - fp32[i, len(p) - 1:len(p) - 1 + n][np.arange(n), out.tokens[i]])
                     for i, p in enumerate(prompts)])
    assert diff.mean() <= 0.1 and diff.max() <= 0.5, (diff.mean(), diff.max())
    assert diff.max() > 1e-3  # the rollout did compute in bf16
