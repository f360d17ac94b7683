"""The fused attention kernels against the plain path (`attention.attention` / `causal_attention`):
values and gradients, fp32, GQA, ragged lengths, left / right / both-sides padding; the platform
selection; the whole model through the `attention` setting.

On CPU the dispatch runs `jax.nn.dot_product_attention(implementation="xla")`, and the splash kernel in
Pallas's interpreter. cuDNN runs only on an NVIDIA GPU (skipped elsewhere, with the reason).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdft_jax.models import attention, fused_attention
from sdft_jax.models.sharding import activation_sharding, make_mesh
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.testing.tiny import random_model, tiny_config

ON_GPU = jax.default_backend() == "gpu"
NEEDS_GPU = "cuDNN flash attention runs on an NVIDIA GPU only; this run's backend is " + jax.default_backend()


def _inputs(lengths, width, *, side, kv_heads=2, groups=3, head_dim=16, seed=0, dtype=jnp.float32):
    """Random q/k/v of rows with `lengths` real tokens padded to `width` on `side` ("left", "right",
    or "both": a left-padded prompt ++ a right-padded completion, as a train step's rows are)."""
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n:] = True
        elif side == "right":
            mask[i, :n] = True
        else:
            start = (width - n) // 2
            mask[i, start:start + n] = True
    B = len(lengths)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, width, kv_heads, groups, head_dim), dtype)
    k = jax.random.normal(kk, (B, width, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (B, width, kv_heads, head_dim), dtype)
    return q, k, v, jnp.asarray(mask)


def _real_rows_loss(fn, mask, weights):
    """A scalar of `fn`'s output over the real query rows only (padding rows are read by nothing)."""
    def loss(q, k, v):
        out = fn(q, k, v).astype(jnp.float32)
        return jnp.sum(out * weights * mask[:, :, None, None, None])
    return loss


def _check_parity(fused, plain, q, k, v, mask, *, atol, rtol):
    """Outputs on real query rows and gradients (q, k, v) of a loss over them: `fused` vs `plain`."""
    real = np.asarray(mask)[:, :, None, None, None]
    np.testing.assert_allclose(np.where(real, np.asarray(fused(q, k, v), np.float32), 0),
                               np.where(real, np.asarray(plain(q, k, v), np.float32), 0), atol=atol, rtol=rtol)
    weights = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
    grads_fused = jax.grad(_real_rows_loss(fused, mask, weights), argnums=(0, 1, 2))(q, k, v)
    grads_plain = jax.grad(_real_rows_loss(plain, mask, weights), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads_fused, grads_plain):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=rtol,
                                   err_msg=f"d loss / d {name}")


# --- selection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform, dtype, expected", [
    ("cpu", jnp.float32, "plain"), ("cpu", jnp.bfloat16, "plain"),
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float16, "cudnn"), ("gpu", jnp.float32, "plain"),
    ("tpu", jnp.bfloat16, "splash"), ("tpu", jnp.float32, "splash"),
])
def test_auto_selects_by_platform_and_dtype(platform, dtype, expected):
    assert fused_attention.select("auto", platform=platform, dtype=dtype) == expected


@pytest.mark.parametrize("setting, platform, dtype, match", [
    ("cudnn", "cpu", jnp.bfloat16, "NVIDIA GPUs; this program runs on cpu"),
    ("cudnn", "tpu", jnp.bfloat16, "runs on tpu"),
    ("cudnn", "gpu", jnp.float32, "bf16 / fp16 only; the model computes in float32"),
    ("splash", "gpu", jnp.bfloat16, "Pallas TPU kernel; this program runs on gpu"),
    ("splash", "cpu", jnp.float32, "runs on cpu"),
    ("flash", "gpu", jnp.bfloat16, r"attention must be one of \['auto', 'plain', 'xla', 'cudnn', 'splash'\]"),
])
def test_explicit_kernel_the_platform_cannot_run_is_refused(setting, platform, dtype, match):
    with pytest.raises(ValueError, match=match):
        fused_attention.select(setting, platform=platform, dtype=dtype)


@pytest.mark.parametrize("setting", ["plain", "xla"])
def test_plain_and_xla_run_everywhere(setting):
    for platform in ("cpu", "gpu", "tpu"):
        assert fused_attention.select(setting, platform=platform, dtype=jnp.float32) == setting


def test_config_refuses_cudnn_without_bf16_and_unknown_kernels():
    from sdft_jax.config import ModelSection

    assert ModelSection().attention == "auto"
    assert ModelSection(attention="cudnn", dtype="bfloat16").attention == "cudnn"
    with pytest.raises(ValueError, match="ModelSection.attention 'cudnn' runs bf16 only"):
        ModelSection(attention="cudnn")
    with pytest.raises(ValueError, match="ModelSection.attention must be one of"):
        ModelSection(attention="flash")


def test_transformer_refuses_an_unknown_setting():
    from sdft_jax.models.transformer import Transformer

    # The suite's runtime type checker sees the Literal first (a TypeError); without it, check_choice.
    with pytest.raises((ValueError, TypeError), match="attention"):
        Transformer(tiny_config("llama"), rngs=nnx.Rngs(0), attention="flash")


def test_plain_is_not_a_fused_kernel():
    q, k, v, mask = _inputs([3], 4, side="right")
    with pytest.raises(ValueError, match="plain path is attention.attention"):
        fused_attention.attend(q, k, v, attention.causal_visibility(jnp.arange(4), mask), kernel="plain", causal=True)


# --- the uncached path: xla through the dispatch equals the plain path --------------------------------


@pytest.mark.parametrize("side", ["left", "right", "both"])
@pytest.mark.parametrize("lengths, width", [([7, 3, 1], 7), ([9, 5], 12), ([4], 4)])
def test_xla_kernel_equals_plain_causal_attention(side, lengths, width):
    q, k, v, mask = _inputs(lengths, width, side=side)
    visible = attention.causal_visibility(jnp.arange(width), mask)
    plain = lambda q, k, v: attention.causal_attention(q, k, v, visible, query_block=3)  # noqa: E731
    fused = lambda q, k, v: attention.causal_attention(q, k, v, visible, query_block=3, kernel="xla")  # noqa: E731
    _check_parity(jax.jit(fused), jax.jit(plain), q, k, v, mask, atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(fused(q, k, v))).all()  # padding rows too


@pytest.mark.parametrize("slot", [0, 3])
def test_xla_kernel_equals_plain_prefill_over_a_cache(slot):
    """A prefill of left-padded prompts into a stacked cache (slot 0, and after earlier tokens): the
    fused kernel over the cache's slots equals the plain path, and writes the same buffers."""
    cfg = tiny_config("llama")
    T, S = 5, 12
    q, k, v, mask = _inputs([5, 2], T, side="left", kv_heads=cfg.num_kv_heads, groups=cfg.num_groups,
                            head_dim=cfg.head_dim)
    cache = attention.KVCache.zeros(cfg, batch=2, max_len=S)
    earlier = jax.random.normal(jax.random.key(3), cache.k.shape)
    cache = dataclasses.replace(cache, k=earlier, v=-earlier, index=jnp.int32(slot),
                                valid=cache.valid.at[:, :slot].set(True))
    cache, visible = cache.reserve(mask)
    run = {kernel: attention.attend_stacked(q, k, v, visible, k_all=cache.k, v_all=cache.v, layer=jnp.int32(1),
                                            slot=cache.index, kernel=kernel)
           for kernel in ("plain", "xla")}
    (out_plain, bufs_plain), (out_xla, bufs_xla) = run["plain"], run["xla"]
    real = np.asarray(mask)[:, :, None, None, None]
    np.testing.assert_allclose(np.where(real, out_xla, 0), np.where(real, out_plain, 0), atol=1e-5, rtol=1e-5)
    for a, b in zip(bufs_xla, bufs_plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_decoded_token_stays_on_the_plain_path():
    cfg = tiny_config("llama")
    q, k, v, mask = _inputs([1, 1], 1, side="left", kv_heads=cfg.num_kv_heads, groups=cfg.num_groups,
                            head_dim=cfg.head_dim)
    cache, visible = attention.KVCache.zeros(cfg, batch=2, max_len=4).reserve(mask)
    kwargs = dict(k_all=cache.k, v_all=cache.v, layer=jnp.int32(0), slot=cache.index)
    jaxpr = str(jax.make_jaxpr(lambda q: attention.attend_stacked(q, k, v, visible, kernel="xla", **kwargs))(q))
    assert jaxpr == str(jax.make_jaxpr(lambda q: attention.attend_stacked(q, k, v, visible, **kwargs))(q))


@pytest.mark.parametrize("architecture", ["llama", "qwen3", pytest.param("qwen3_5", marks=pytest.mark.slow)])
def test_whole_model_with_xla_attention_equals_plain(architecture):
    """The `attention` setting through the model (Qwen3.5: gated attention with partial RoPE between
    its Gated DeltaNet layers), on a train step's layout of rows (left-padded prompt ++ right-padded
    completion): hidden states and every weight's gradient of a loss over the real tokens."""
    cfg = tiny_config(architecture)
    model = random_model(cfg, seed=1)
    _, _, _, mask = _inputs([9, 4, 6], 10, side="both")
    tokens = jax.random.randint(jax.random.key(2), mask.shape, 0, cfg.vocab_size)
    positions = positions_from_mask(mask)

    results = {}
    for setting in ("plain", "xla"):
        model.attention = setting
        graphdef, params = nnx.split(model)

        def loss(params, graphdef=graphdef):
            hidden, _ = nnx.merge(graphdef, params)(tokens, positions, mask)
            return jnp.sum(jnp.where(mask[..., None], jnp.tanh(hidden), 0.0)), hidden

        (value, hidden), grads = jax.value_and_grad(loss, has_aux=True)(params)
        results[setting] = [value, np.where(np.asarray(mask)[..., None], hidden, 0), *jax.tree.leaves(grads)]
    assert len(results["xla"]) > 10  # every weight's gradient
    for a, b in zip(results["xla"], results["plain"], strict=True):
        # fp32 sums in another order: errors of a few ulps of the array's largest entries (the embedding
        # gradient sums terms ~100 into entries ~0.1), so the absolute tolerance follows that scale.
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6 * max(scale, 1.0), rtol=2e-5)


# --- splash: the Pallas kernel, in the interpreter on CPU ------------------------------------------------


@pytest.mark.parametrize("side, lengths, width", [("left", [100, 37], 100), ("right", [130, 1], 130),
                                                  ("both", [128, 60], 128)])
def test_splash_kernel_equals_plain_causal_attention(side, lengths, width):
    """Values and gradients on the real rows; lengths padded to the 128 tile (100, 130) and not (128)."""
    q, k, v, mask = _inputs(lengths, width, side=side, head_dim=32)
    visible = attention.causal_visibility(jnp.arange(width), mask)
    plain = lambda q, k, v: attention.attention(q, k, v, visible)  # noqa: E731
    splash = lambda q, k, v: fused_attention.splash_attention(q, k, v, mask, interpret=True)  # noqa: E731
    _check_parity(splash, plain, q, k, v, mask, atol=2e-5, rtol=2e-5)


def test_splash_kernel_under_a_mesh_equals_one_device():
    """Under `activation_sharding` the kernel runs per device in a shard_map (rows over data x fsdp,
    KV heads over tensor): the same values as without a mesh."""
    q, k, v, mask = _inputs([64, 20, 50, 7], 64, side="left", head_dim=32)
    one = fused_attention.splash_attention(q, k, v, mask, interpret=True)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with activation_sharding(mesh):
        sharded = jax.jit(lambda q, k, v, m: fused_attention.splash_attention(q, k, v, m, interpret=True))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), atol=1e-6, rtol=1e-6)


def test_splash_on_a_cache_prefill_runs_xla():
    """Splash's causal mask is static; a cache's visibility is not, so a prefill with "splash" is the
    XLA kernel (the same program)."""
    q, k, v, mask = _inputs([4, 2], 4, side="left")
    visible = attention.causal_visibility(jnp.arange(4), mask)
    as_splash = jax.make_jaxpr(lambda q: fused_attention.attend(q, k, v, visible, kernel="splash", causal=False))(q)
    as_xla = jax.make_jaxpr(lambda q: fused_attention.attend(q, k, v, visible, kernel="xla", causal=False))(q)
    assert str(as_splash) == str(as_xla)


# --- cuDNN: only on an NVIDIA GPU -----------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason=NEEDS_GPU)
@pytest.mark.parametrize("side, lengths, width", [("left", [33, 17], 33), ("both", [64, 20], 64)])
def test_cudnn_kernel_matches_plain_in_bf16(side, lengths, width):
    """bf16 through cuDNN vs the plain path on the same bf16 inputs; odd lengths padded by one."""
    q, k, v, mask = _inputs(lengths, width, side=side, head_dim=64, dtype=jnp.bfloat16)
    visible = attention.causal_visibility(jnp.arange(width), mask)
    plain = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, visible, query_block=0))
    fused = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, visible, query_block=0, kernel="cudnn"))
    _check_parity(fused, plain, q, k, v, mask, atol=3e-2, rtol=3e-2)
