"""The Gated DeltaNet mixer: the chunked delta rule against the per-token recurrence (values and
gradients, ragged lengths, padding), both rules and the whole mixer against `transformers`' Qwen3.5 torch
code, and a prefill continued token by token with the state against the full forward."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from sdft_jax.models import gated_deltanet as gdn
from sdft_jax.models import lora

D = 24  # hidden size of the mixer tests
CFG = gdn.DeltaNetConfig(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=6, conv_kernel=4)


def assert_close(actual, expected, rel=1e-5, what=""):
    """max |actual - expected| <= rel * max |expected| (a relative bound that elements near 0 do not break)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    err, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * {scale:.3g}"


def rule_inputs(seed, B, T, Hk=2, Hv=4, Dk=8, Dv=6):
    """Random q, k (L2-normed, as the mixer passes them), v, log-decays g < 0, beta in (0, 1), a state."""
    k = jax.random.split(jax.random.key(seed), 6)
    q = gdn.l2norm(jax.random.normal(k[0], (B, T, Hk, Dk)))
    key = gdn.l2norm(jax.random.normal(k[1], (B, T, Hk, Dk)))
    v = jax.random.normal(k[2], (B, T, Hv, Dv))
    g = -0.4 * jnp.abs(jax.random.normal(k[3], (B, T, Hv)))
    beta = jax.nn.sigmoid(jax.random.normal(k[4], (B, T, Hv)))
    state = jax.random.normal(k[5], (B, Hv, Dk, Dv))
    return q, key, v, g, beta, state


def chunked(chunk_size):
    return functools.partial(gdn.chunked_gated_delta_rule, chunk_size=chunk_size)


def rule_value_and_grads(rule, inputs, cotangents):
    """(output, final state, grads w.r.t. q, k, v, g, beta and the initial state) of
    <output, c_out> + <state, c_state>."""
    def objective(*args):
        out, state = rule(*args[:5], initial_state=args[5])
        return jnp.sum(out * cotangents[0]) + jnp.sum(state * cotangents[1]), (out, state)

    (_, (out, state)), grads = jax.jit(jax.value_and_grad(objective, argnums=tuple(range(6)), has_aux=True))(*inputs)
    return out, state, grads


def left_pad_rules(inputs, lengths):
    """Padding of the first T - length tokens of each row as the mixer marks it: g = beta = 0 there."""
    q, k, v, g, beta, state = inputs
    T = q.shape[1]
    real = jnp.arange(T)[None, :] >= T - jnp.asarray(lengths)[:, None]
    return q, k, v, jnp.where(real[..., None], g, 0.0), jnp.where(real[..., None], beta, 0.0), state


# ---------------------------------------------------------------- the delta rule


@pytest.mark.parametrize("n", [1, 5, 16, 37, 64, 100])
def test_unit_lower_inverse(n):
    """Against numpy's inverse in float64, at sizes below, at, and between the substitution blocks, of
    matrices as the chunked rule builds them: beta_i k_i.k_j exp(G_i - G_j) below the diagonal."""
    rng = np.random.default_rng(n)
    k = rng.standard_normal((3, n, 8))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1 / (1 + np.exp(-rng.standard_normal((3, n, 1))))
    cum = np.cumsum(-0.05 * rng.random((3, n)), axis=-1)
    strict = np.tril(beta * k @ k.swapaxes(1, 2) * np.exp(cum[:, :, None] - cum[:, None, :]), -1).astype(np.float32)
    expected = np.linalg.inv(np.eye(n) + strict.astype(np.float64))
    assert_close(gdn.unit_lower_inverse(jnp.asarray(strict)), expected, rel=2e-6, what=f"n={n}")


@pytest.mark.parametrize("T, chunk_size", [(37, 16), (32, 16), (5, 16), (64, 64)])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_chunked_equals_recurrence_values_and_gradients(T, chunk_size, padded):
    inputs = rule_inputs(0, 3, T)
    if padded:
        inputs = left_pad_rules(inputs, [T, T - 3, 1])
    c = jax.random.split(jax.random.key(1), 2)
    cotangents = (jax.random.normal(c[0], (3, T, 4, 6)), jax.random.normal(c[1], (3, 4, 8, 6)))
    out, state, grads = rule_value_and_grads(chunked(chunk_size), inputs, cotangents)
    ref, ref_state, ref_grads = rule_value_and_grads(gdn.recurrent_gated_delta_rule, inputs, cotangents)
    assert_close(out, ref, what="out")
    assert_close(state, ref_state, what="final state")
    for name, grad, ref_grad in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, ref_grads):
        assert_close(grad, ref_grad, rel=2e-5, what=f"d {name}")
        assert np.any(np.asarray(ref_grad) != 0), name


@pytest.mark.parametrize("rule", ["chunked", "recurrent"])
def test_padding_tokens_leave_the_state_unchanged(rule):
    """Tokens with g = beta = 0 (random q, k, v) inserted anywhere: the real tokens' outputs and the final
    state are those of the row without them."""
    fn = chunked(8) if rule == "chunked" else gdn.recurrent_gated_delta_rule
    q, k, v, g, beta, state = rule_inputs(2, 1, 30)
    real = np.ones(30, bool)
    real[[0, 1, 2, 9, 10, 17, 29]] = False
    g, beta = jnp.where(real[None, :, None], g, 0.0), jnp.where(real[None, :, None], beta, 0.0)
    out, final = fn(q, k, v, g, beta, initial_state=state)
    alone, alone_final = fn(q[:, real], k[:, real], v[:, real], g[:, real], beta[:, real], initial_state=state)
    assert_close(out[:, real], alone, what="outputs")
    assert_close(final, alone_final, what="final state")


class _OneBf16PassEinsum:
    """`jax.numpy` as the delta rule sees it on a TPU at default precision: every fp32 einsum rounds its
    operands to bf16 and accumulates in fp32 (XLA:CPU ignores a matmul's precision, so the rounding is
    explicit here)."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def einsum(spec, *operands, **kwargs):
        rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) if x.dtype == jnp.float32 else x for x in operands]
        return jnp.einsum(spec, *rounded, **kwargs)


def test_one_bf16_pass_per_matmul_keeps_the_chunked_rule_within_a_few_bf16_roundings(monkeypatch):
    """The chunked rule's fp32 matmuls run as one bf16 pass on a TPU (default precision). Its outputs and
    gradients must then stay within a few bf16 roundings (2^-6 of their largest entry: bf16 keeps 8
    significant bits) of the fp32 recurrence, at the model's head size over 8 chunks: an error that grew
    with the chunk count or through the chunk's inverse would not. For scale, the recurrence itself on
    bf16-rounded q, k, v (what a bf16 model's activations are) is 1e-3 to 3e-3 away here; this is 2e-3 to
    7e-3 (measured 2026-12-02)."""
    T = 512
    inputs = rule_inputs(3, 1, T, Hk=2, Hv=4, Dk=128, Dv=128)
    c = jax.random.split(jax.random.key(4), 2)
    cotangents = (jax.random.normal(c[0], (1, T, 4, 128)), jax.random.normal(c[1], (1, 4, 128, 128)))
    ref = rule_value_and_grads(gdn.recurrent_gated_delta_rule, inputs, cotangents)
    monkeypatch.setattr(gdn, "jnp", _OneBf16PassEinsum())
    one_pass = rule_value_and_grads(gdn.chunked_gated_delta_rule, inputs, cotangents)
    names = ("out", "final state", "d q", "d k", "d v", "d g", "d beta", "d initial_state")
    for name, got, want in zip(names, jax.tree.leaves(one_pass), jax.tree.leaves(ref)):
        assert_close(got, want, rel=2**-6, what=name)
        assert np.any(np.asarray(got) != np.asarray(want)), f"{name}: the rounding did not happen"


def test_rules_match_transformers():
    """Both forms against HF's torch chunked and recurrent rules (with their in-kernel L2 norm), grouped heads,
    a ragged length, an initial state."""
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5.modeling_qwen3_5 import (torch_chunk_gated_delta_rule,
                                                              torch_recurrent_gated_delta_rule)

    k = jax.random.split(jax.random.key(3), 2)
    q_raw, k_raw = (3.0 * jax.random.normal(key, (2, 45, 2, 8)) for key in k)
    _, _, v, g, beta, state = rule_inputs(4, 2, 45)
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    args = (t(q_raw), t(k_raw), t(v), t(g), t(beta))
    kw = dict(initial_state=t(state), output_final_state=True, use_qk_l2norm_in_kernel=True)
    expected = {"chunk": torch_chunk_gated_delta_rule(*args, chunk_size=16, **kw),
                "recurrent": torch_recurrent_gated_delta_rule(*args, **kw)}
    ours = {"chunked": chunked(16), "recurrent": gdn.recurrent_gated_delta_rule}
    for name, fn in ours.items():
        out, final = jax.jit(fn)(gdn.l2norm(q_raw), gdn.l2norm(k_raw), v, g, beta, initial_state=state)
        for hf_name, (hf_out, hf_state) in expected.items():
            assert_close(out, hf_out.numpy(), what=f"{name} out vs HF {hf_name}")
            assert_close(final, hf_state.numpy(), what=f"{name} state vs HF {hf_name}")


# ---------------------------------------------------------------- the mixer


def make_weights(key, cfg=CFG, lora_rank=0):
    """Random weights of one layer (adapters with B nonzero when `lora_rank`)."""
    shapes = {name: shape for name, (shape, _) in gdn.param_shapes(D, cfg).items()}
    keys = jax.random.split(key, 2 * len(shapes))
    w = {name: 0.3 * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}
    w["linear_norm"] = 1.0 + w["linear_norm"]
    w["linear_a_log"] = jnp.log(jnp.linspace(0.05, 4.0, cfg.num_value_heads))
    if lora_rank:
        for i, name in enumerate(gdn.LINEAR_PROJECTIONS):
            a_shape, b_shape = lora.adapter_shapes(name, shapes[name], lora_rank)
            w[f"{name}_lora_a"] = 0.3 * jax.random.normal(keys[len(shapes) + i], a_shape)
            w[f"{name}_lora_b"] = 0.3 * jax.random.normal(keys[-1 - i], b_shape)
    return w


def left_mask(lengths, T):
    return jnp.arange(T)[None, :] >= T - jnp.asarray(lengths)[:, None]


def mixer_value_and_grads(fn, x, w, mask, cotangent, **kwargs):
    def objective(x, w):
        out, state = fn(x, w, CFG, mask=mask, **kwargs)
        return jnp.sum(out * cotangent), (out, state)

    (_, (out, state)), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(x, w)
    return out, state, grads


@pytest.mark.parametrize("lora_rank", [0, 3])
def test_mixer_chunked_equals_reference(lora_rank):
    w = make_weights(jax.random.key(5), lora_rank=lora_rank)
    k = jax.random.split(jax.random.key(6), 2)
    x = jax.random.normal(k[0], (3, 21, D))
    cotangent = jax.random.normal(k[1], x.shape)
    mask = left_mask([21, 15, 2], 21)
    # (only the scale, alpha / rank = 2, is read here: which adapters apply is what `w` holds)
    scale = lora.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, targets=("linear_q_proj",)) if lora_rank else None
    out, state, grads = mixer_value_and_grads(functools.partial(gdn.gated_deltanet, chunk_size=8), x, w, mask,
                                              cotangent, lora=scale)
    ref, ref_state, ref_grads = mixer_value_and_grads(gdn.reference_gated_deltanet, x, w, mask, cotangent,
                                                      lora=scale)
    assert_close(out, ref, what="out")
    for field in ("recurrent", "q_tail", "k_tail", "v_tail"):
        assert_close(getattr(state, field), getattr(ref_state, field), what=field)
    assert_close(grads[0], ref_grads[0], rel=2e-5, what="d x")
    assert set(grads[1]) == set(w)
    for name in w:
        assert_close(grads[1][name], ref_grads[1][name], rel=2e-5, what=f"d {name}")
        assert np.any(np.asarray(grads[1][name]) != 0), name
    if lora_rank:  # the adapters count, as W + scale * A @ B folded into the base weights
        base = {n: a for n, a in w.items() if "_lora_" not in n}
        merged = {n: a + scale.scale * jnp.tensordot(w[f"{n}_lora_a"], w[f"{n}_lora_b"], axes=1)
                  if n in gdn.LINEAR_PROJECTIONS else a for n, a in base.items()}
        assert_close(gdn.gated_deltanet(x, merged, CFG, mask=mask, chunk_size=8)[0], out, what="adapters folded in")
        assert np.max(np.abs(gdn.gated_deltanet(x, base, CFG, mask=mask, chunk_size=8)[0] - out)) > 1e-2


def test_padded_rows_equal_the_rows_alone():
    """Left and right padding: each row's real tokens give the outputs and state of the row alone."""
    w = make_weights(jax.random.key(7))
    x = jax.random.normal(jax.random.key(8), (3, 19, D))
    mask = jnp.stack([jnp.arange(19) >= 0, jnp.arange(19) >= 7, jnp.arange(19) < 12])  # full, left, right
    out, state = jax.jit(functools.partial(gdn.gated_deltanet, cfg=CFG, chunk_size=8))(x, w, mask=mask)
    for row in range(3):
        real = np.asarray(mask[row])
        alone, alone_state = gdn.gated_deltanet(x[row:row + 1, real], w, CFG, chunk_size=8)
        assert_close(out[row:row + 1, real], alone, what=f"row {row} outputs")
        for field in ("recurrent", "q_tail", "k_tail", "v_tail"):
            assert_close(getattr(state, field)[row:row + 1], getattr(alone_state, field), what=f"row {row} {field}")
    # The mask is what keeps padding out: unmasked, the padded rows' outputs change.
    unmasked = gdn.gated_deltanet(x, w, CFG, chunk_size=8)[0]
    assert np.max(np.abs(unmasked[1, 7:] - out[1, 7:])) > 1e-2


def test_prefill_then_decode_equals_full_forward():
    """A left-padded batch: prefill 11 tokens (or 5 then 6), then 7 tokens one at a time with the state;
    every step's output equals the full forward's at that position."""
    w = make_weights(jax.random.key(9))
    x = jax.random.normal(jax.random.key(10), (3, 18, D))
    mask = left_mask([18, 14, 9], 18)
    full, full_state = jax.jit(functools.partial(gdn.gated_deltanet, cfg=CFG, chunk_size=4))(x, w, mask=mask)
    step = jax.jit(functools.partial(gdn.gated_deltanet, cfg=CFG, chunk_size=4))
    for prefill in ([11], [5, 6]):
        state, t = None, 0
        for n in prefill:
            out, state = step(x[:, t:t + n], w, mask=mask[:, t:t + n], state=state)
            assert_close(out, full[:, t:t + n], what=f"prefill {prefill} tokens {t}..{t + n}")
            t += n
        for t in range(t, 18):
            out, state = step(x[:, t:t + 1], w, mask=mask[:, t:t + 1], state=state)
            assert_close(out, full[:, t:t + 1], what=f"decode step at {t}")
        for field in ("recurrent", "q_tail", "k_tail", "v_tail"):
            assert_close(getattr(state, field), getattr(full_state, field), what=field)


def test_masked_decode_step_keeps_the_state():
    w = make_weights(jax.random.key(11))
    x = jax.random.normal(jax.random.key(12), (2, 6, D))
    _, state = gdn.gated_deltanet(x, w, CFG)
    _, after = gdn.gated_deltanet(x[:, :1], w, CFG, mask=jnp.array([[False], [True]]), state=state)
    for field in ("recurrent", "q_tail", "k_tail", "v_tail"):
        np.testing.assert_array_equal(getattr(after, field)[0], getattr(state, field)[0], err_msg=field)
        assert np.any(np.asarray(getattr(after, field)[1] != getattr(state, field)[1])), field


@pytest.mark.parametrize("field, value, message", [
    ("num_key_heads", 0, r"DeltaNetConfig\.num_key_heads must be an integer >= 1"),
    ("num_value_heads", 3, r"DeltaNetConfig\.num_value_heads must be a multiple of num_key_heads \(2\), got 3"),
    ("key_head_dim", 0, r"DeltaNetConfig\.key_head_dim must be an integer >= 1"),
    ("value_head_dim", -1, r"DeltaNetConfig\.value_head_dim must be an integer >= 1"),
    ("conv_kernel", 0, r"DeltaNetConfig\.conv_kernel must be an integer >= 1"),
    ("norm_eps", 0.0, r"DeltaNetConfig\.norm_eps must be a finite number > 0\.0"),
    ("conv_kernel", 2.0, r"DeltaNetConfig\.conv_kernel must be an integer >= 1|parameter 'conv_kernel'"),
])
def test_config_validation_names_the_field(field, value, message):
    good = dict(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=6)
    gdn.DeltaNetConfig(**good)
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match=message):
        gdn.DeltaNetConfig(**{**good, field: value})


# ---------------------------------------------------------------- against transformers (torch)


def hf_mixer(seed):
    """`transformers`' Qwen3.5 Gated DeltaNet (CFG's sizes, hidden D), random weights, fp32."""
    torch = pytest.importorskip("torch")
    import transformers
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    config = transformers.Qwen3_5TextConfig(
        hidden_size=D, linear_num_key_heads=CFG.num_key_heads, linear_num_value_heads=CFG.num_value_heads,
        linear_key_head_dim=CFG.key_head_dim, linear_value_head_dim=CFG.value_head_dim,
        linear_conv_kernel_dim=CFG.conv_kernel, rms_norm_eps=CFG.norm_eps, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(seed)
    mixer = Qwen3_5GatedDeltaNet(config, layer_idx=0).float().eval()
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name == "A_log":  # decays from slow to fast, as HF's init draws A in [0.01, 16]
                p.copy_(torch.log(torch.linspace(0.01, 16.0, p.shape[0])))
            elif name == "norm.weight":
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return mixer


def from_hf(t: dict[str, np.ndarray], cfg=CFG) -> dict[str, jax.Array]:
    """Our layout (module docstring) from the HF mixer's tensors (weights or their gradients) by HF name."""
    Hk, Hv, Dk, Dv, K = cfg.num_key_heads, cfg.num_value_heads, cfg.key_head_dim, cfg.value_head_dim, cfg.conv_kernel
    kd = Hk * Dk
    qkv, conv = t["in_proj_qkv.weight"], t["conv1d.weight"][:, 0, :]  # [2kd + vd, D], [2kd + vd, K]
    w = {
        "linear_q_proj": qkv[:kd].T.reshape(D, Hk, Dk),
        "linear_k_proj": qkv[kd:2 * kd].T.reshape(D, Hk, Dk),
        "linear_v_proj": qkv[2 * kd:].T.reshape(D, Hv, Dv),
        "linear_z_proj": t["in_proj_z.weight"].T.reshape(D, Hv, Dv),
        "linear_b_proj": t["in_proj_b.weight"].T,
        "linear_a_proj": t["in_proj_a.weight"].T,
        "linear_q_conv": conv[:kd].T.reshape(K, Hk, Dk),
        "linear_k_conv": conv[kd:2 * kd].T.reshape(K, Hk, Dk),
        "linear_v_conv": conv[2 * kd:].T.reshape(K, Hv, Dv),
        "linear_dt_bias": t["dt_bias"],
        "linear_a_log": t["A_log"],
        "linear_norm": t["norm.weight"],
        "linear_out_proj": t["out_proj.weight"].T.reshape(Hv, Dv, D),
    }
    return {n: jnp.asarray(a) for n, a in w.items()}


def test_param_shapes_cover_the_hf_mixer():
    mixer = hf_mixer(0)
    w = from_hf({n: p.detach().numpy() for n, p in mixer.named_parameters()})
    shapes = gdn.param_shapes(D, CFG)
    assert {n: a.shape for n, a in w.items()} == {n: s for n, (s, _) in shapes.items()}
    assert sum(a.size for a in w.values()) == sum(p.numel() for p in mixer.parameters())
    assert all(len(axes) == len(shape) for shape, axes in shapes.values())


@pytest.mark.parametrize("fn", ["gated_deltanet", "reference_gated_deltanet"])
def test_mixer_matches_transformers_left_padded(fn):
    """Outputs on a left-padded batch (< 1e-4) and gradients of a scalar loss w.r.t. the input and every
    weight (relative < 1e-4), against HF's module run with a 2D attention mask and no cache."""
    torch = pytest.importorskip("torch")
    mixer = hf_mixer(1)
    T = 21
    lengths = [21, 13, 3]
    mask = np.asarray(left_mask(lengths, T))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, T, D, generator=gen, requires_grad=True)
    cotangent = torch.randn(3, T, D, generator=gen)
    expected = mixer(x, attention_mask=torch.from_numpy(mask.astype(np.float32)))
    (expected * cotangent).sum().backward()
    hf_grads = from_hf({n: p.grad.numpy() for n, p in mixer.named_parameters()})

    w = from_hf({n: p.detach().numpy() for n, p in mixer.named_parameters()})
    ours = getattr(gdn, fn)
    if fn == "gated_deltanet":
        ours = functools.partial(ours, chunk_size=8)
    xj, cj = jnp.asarray(x.detach().numpy()), jnp.asarray(cotangent.numpy())
    out, _, grads = mixer_value_and_grads(ours, xj, w, jnp.asarray(mask), cj)
    assert_close(out, expected.detach().numpy(), rel=1e-4, what="out")
    assert np.all(np.asarray(out)[~mask] == 0)  # padding's output, zero in HF too
    assert_close(grads[0], x.grad.numpy(), rel=1e-4, what="d x")
    for name in w:
        assert_close(grads[1][name], hf_grads[name], rel=1e-4, what=f"d {name}")
