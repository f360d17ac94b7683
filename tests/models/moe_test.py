"""The sparse MoE channel mixer: grouped path against the all-experts reference (values and gradients),
under each grouped matmul implementation, routing on known values, and the whole block and
its load-balancing loss against `transformers`' Qwen3-MoE / Qwen2-MoE torch code."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from sdft_jax.models import grouped_matmul, moe

D = 16  # hidden size of every test here


def assert_close(actual, expected, rel=1e-5, what=""):
    """max |actual - expected| <= rel * max |expected| (a relative bound that elements near 0 do not break)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    err, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * {scale:.3g}"


def make_weights(key, cfg: moe.MoeConfig, lora_rank: int = 0) -> dict[str, jax.Array]:
    """Random weights of one layer (adapters B nonzero, so the low-rank update counts)."""
    shapes = {name: shape for name, (shape, _) in moe.param_shapes(D, cfg).items()}
    if lora_rank:
        for name in moe.EXPERT_PROJECTIONS:
            e, n_in, n_out = shapes[name]
            shapes[f"{name}_lora_a"] = (e, n_in, lora_rank)
            shapes[f"{name}_lora_b"] = (e, lora_rank, n_out)
    keys = jax.random.split(key, len(shapes))
    return {name: 0.3 * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}


def ragged(tile):
    """`grouped_matmul` replaced by one implementation (tile rows for the tiled one, None for ragged_dot)."""
    if tile is None:
        return grouped_matmul.ragged_grouped_matmul
    return functools.partial(grouped_matmul.tiled_grouped_matmul, tile=tile)


def moe_value_and_grads(fn, x, w, cfg, cotangent, lora_scale=1.0):
    """(output, stats, aux, grads w.r.t. x and every weight) of <output, cotangent> + aux_loss."""
    def objective(x, w):
        out = fn(x, w, cfg, lora_scale=lora_scale)
        return jnp.sum(out.hidden * cotangent) + out.aux_loss, out

    (_, out), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(x, w)
    return out, grads


CASES = {
    "top2_norm": dict(top_k=2, norm_topk_prob=True),
    "top3_no_norm": dict(top_k=3, norm_topk_prob=False),
    "top2_shared": dict(top_k=2, norm_topk_prob=True, shared_expert_hidden=20),
    "top3_no_norm_shared_balance": dict(top_k=3, norm_topk_prob=False, shared_expert_hidden=20,
                                        load_balance_coef=0.1),
    "top1": dict(top_k=1, norm_topk_prob=False),
}


@pytest.mark.parametrize("tile", [None, 4, 128], ids=["ragged_dot", "tile4", "tile128"])
@pytest.mark.parametrize("forced", [False, True], ids=["random_router", "two_experts_only"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_equals_reference(case, forced, tile, monkeypatch):
    cfg = moe.MoeConfig(num_experts=8, expert_hidden=12, **CASES[case])
    k = jax.random.split(jax.random.key(1), 3)
    w = make_weights(k[0], cfg)
    x = jax.random.normal(k[1], (3, 7, D))
    if forced:
        # Every token's largest router logits are experts 0 and 1 (x[..., 0] > 4, big router weights
        # there): with top_k <= 2 the other six experts receive no token.
        x = x.at[..., 0].set(4.0 + jnp.abs(x[..., 0]))
        w["router"] = w["router"].at[0, :2].set(jnp.array([3.0, 2.5]))
    cotangent = jax.random.normal(k[2], x.shape)
    monkeypatch.setattr(moe, "grouped_matmul", ragged(tile))
    out, grads = moe_value_and_grads(moe.sparse_moe, x, w, cfg, cotangent)
    ref, ref_grads = moe_value_and_grads(moe.reference_moe, x, w, cfg, cotangent)
    if forced and cfg.top_k <= 2:
        assert np.all(np.asarray(out.stats.assignments[2:]) == 0), out.stats.assignments
    assert_close(out.hidden, ref.hidden, what="hidden")
    assert_close(out.aux_loss, ref.aux_loss, what="aux_loss")
    assert_close(grads[0], ref_grads[0], what="d x")
    assert set(grads[1]) == set(w)
    for name in w:
        if forced and name.startswith("experts_") and cfg.top_k <= 2:
            assert np.all(np.asarray(grads[1][name][2:]) == 0), name  # experts that received no token
        assert_close(grads[1][name], ref_grads[1][name], what=f"d {name}")
    assert np.any(np.asarray(grads[1]["router"]) != 0)


@pytest.mark.parametrize("tile", [None, 4], ids=["ragged_dot", "tile4"])
def test_grouped_equals_reference_with_expert_lora(tile, monkeypatch):
    cfg = moe.MoeConfig(num_experts=6, top_k=2, expert_hidden=12, shared_expert_hidden=8)
    k = jax.random.split(jax.random.key(2), 3)
    w = make_weights(k[0], cfg, lora_rank=3)
    x = jax.random.normal(k[1], (2, 9, D))
    cotangent = jax.random.normal(k[2], x.shape)
    monkeypatch.setattr(moe, "grouped_matmul", ragged(tile))
    out, grads = moe_value_and_grads(moe.sparse_moe, x, w, cfg, cotangent, lora_scale=0.5)
    ref, ref_grads = moe_value_and_grads(moe.reference_moe, x, w, cfg, cotangent, lora_scale=0.5)
    assert_close(out.hidden, ref.hidden, what="hidden")
    assert_close(grads[0], ref_grads[0], what="d x")
    for name in w:
        assert_close(grads[1][name], ref_grads[1][name], what=f"d {name}")
    # The adapters change the output: the same weights without them give another result.
    base = {n: a for n, a in w.items() if "_lora_" not in n}
    assert np.max(np.abs(moe.reference_moe(x, base, cfg).hidden - ref.hidden)) > 1e-2


def test_route_known_values():
    """Two tokens, four experts, the router the identity so the logits are the tokens themselves.

    Token 0, logits [1, 2, 3, 0]: softmax e^l / (e + e^2 + e^3 + 1); top 2 = experts 2, 1, renormalised
    [e / (e + 1), 1 / (e + 1)] (their logits differ by 1). Token 1, logits [0, ln 2, 0, ln 4]:
    probabilities [1, 2, 1, 4] / 8; top 2 = experts 3, 1 with [1/2, 1/4], renormalised [2/3, 1/3].
    """
    x = jnp.array([[1.0, 2.0, 3.0, 0.0], [0.0, np.log(2.0), 0.0, np.log(4.0)]])
    e = np.e
    probs0 = np.array([e, e**2, e**3, 1.0]) / (e + e**2 + e**3 + 1.0)
    probs1 = np.array([1.0, 2.0, 1.0, 4.0]) / 8.0
    for norm, weights in ((True, [[e / (e + 1), 1 / (e + 1)], [2 / 3, 1 / 3]]),
                          (False, [[probs0[2], probs0[1]], [0.5, 0.25]])):
        cfg = moe.MoeConfig(num_experts=4, top_k=2, expert_hidden=3, norm_topk_prob=norm)
        routing = moe.route(x, jnp.eye(4), cfg)
        np.testing.assert_array_equal(routing.expert_ids, [[2, 1], [3, 1]])
        np.testing.assert_allclose(routing.weights, weights, rtol=1e-6)
        np.testing.assert_allclose(routing.probs, [probs0, probs1], rtol=1e-6)
        np.testing.assert_allclose(routing.logits, x)

    stats = moe.router_stats(routing)
    np.testing.assert_array_equal(stats.assignments, [0, 2, 1, 1])
    np.testing.assert_allclose(stats.load(), [0, 0.5, 0.25, 0.25])
    np.testing.assert_allclose(stats.max_over_mean_load(), 2.0)
    np.testing.assert_allclose(stats.prob_sum, probs0 + probs1, rtol=1e-6)
    assert float(stats.tokens) == 2.0
    # E * sum_e (assignments_e / T) * (prob_sum_e / T), T = 2 tokens.
    expected = 4 * np.sum(np.array([0, 2, 1, 1]) / 2 * (probs0 + probs1) / 2)
    np.testing.assert_allclose(moe.balance_loss(stats), expected, rtol=1e-6)
    # A mask leaves token 1 out: only token 0's experts and probabilities count.
    masked = moe.router_stats(routing, jnp.array([True, False]))
    np.testing.assert_array_equal(masked.assignments, [0, 1, 1, 0])
    np.testing.assert_allclose(masked.prob_sum, probs0, rtol=1e-6)
    np.testing.assert_allclose(moe.balance_loss(masked), 4 * (probs0[1] + probs0[2]), rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("num_experts", 0, r"MoeConfig\.num_experts must be an integer >= 1"),
    ("top_k", 9, r"MoeConfig\.top_k must be an integer in \[1, 8\] \(at most num_experts\)"),
    ("top_k", 0, r"MoeConfig\.top_k must be an integer in \[1, 8\]"),
    ("expert_hidden", 0, r"MoeConfig\.expert_hidden must be an integer >= 1"),
    ("shared_expert_hidden", -1, r"MoeConfig\.shared_expert_hidden must be an integer >= 0"),
    ("load_balance_coef", -0.1, r"MoeConfig\.load_balance_coef must be a finite number >= 0\.0"),
    ("load_balance_coef", float("inf"), r"MoeConfig\.load_balance_coef must be a finite number >= 0\.0"),
    # (the annotation checker of the tests refuses a value of the wrong type first, naming the parameter)
    ("expert_hidden", 2.0, r"MoeConfig\.expert_hidden must be an integer >= 1|parameter 'expert_hidden'"),
    ("norm_topk_prob", 1, r"MoeConfig\.norm_topk_prob must be true or false|parameter 'norm_topk_prob'"),
])
def test_config_validation_names_the_field(field, value, message):
    good = dict(num_experts=8, top_k=2, expert_hidden=4)
    moe.MoeConfig(**good)
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match=message):
        moe.MoeConfig(**{**good, field: value})


def test_aux_loss_zero_when_off_and_stats_additive():
    cfg = moe.MoeConfig(num_experts=8, top_k=2, expert_hidden=12)
    w = make_weights(jax.random.key(4), cfg)
    x = jax.random.normal(jax.random.key(5), (2, 5, D))
    out = moe.sparse_moe(x, w, cfg)
    assert float(out.aux_loss) == 0.0
    np.testing.assert_allclose(out.stats.assignments.sum(), 2 * 5 * 2)
    on = moe.sparse_moe(x, w, moe.MoeConfig(num_experts=8, top_k=2, expert_hidden=12, load_balance_coef=0.01))
    np.testing.assert_allclose(on.aux_loss, 0.01 * moe.balance_loss(out.stats), rtol=1e-6)
    mask = jnp.array([[True] * 5, [True, True, False, False, False]])
    masked = moe.sparse_moe(x, w, cfg, token_mask=mask)
    np.testing.assert_array_equal(masked.hidden, out.hidden)  # the mask only changes what is counted
    assert float(masked.stats.tokens) == 7.0


# ---------------------------------------------------------------- against transformers (torch)


def hf_block(family: str, norm_topk_prob: bool, seed: int):
    """A `transformers` sparse MoE block (hidden 16, 8 experts, top-2, expert hidden 12), random weights."""
    torch = pytest.importorskip("torch")
    import transformers

    common = dict(hidden_size=D, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=12,
                  norm_topk_prob=norm_topk_prob, hidden_act="silu", experts_implementation="eager")
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        config = transformers.Qwen3MoeConfig(**common)
    else:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        config = transformers.Qwen2MoeConfig(**common, shared_expert_intermediate_size=20)
    torch.manual_seed(seed)
    block = Block(config).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return block, config


def weights_from_hf(block) -> dict[str, jax.Array]:
    """Our layout (module docstring) from the HF block's tensors."""
    t = lambda p: np.asarray(p.detach().numpy())
    gate_up = t(block.experts.gate_up_proj)  # [E, 2F, D], gate rows first
    f = gate_up.shape[1] // 2
    w = {
        "router": t(block.gate.weight).T,
        "experts_gate_proj": gate_up[:, :f].transpose(0, 2, 1),
        "experts_up_proj": gate_up[:, f:].transpose(0, 2, 1),
        "experts_down_proj": t(block.experts.down_proj).transpose(0, 2, 1),
    }
    if hasattr(block, "shared_expert"):
        for name in ("gate_proj", "up_proj", "down_proj"):
            w[f"shared_expert_{name}"] = t(getattr(block.shared_expert, name).weight).T
        w["shared_expert_gate"] = t(block.shared_expert_gate.weight).T
    return {n: jnp.asarray(a) for n, a in w.items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_block(family, norm_topk_prob):
    torch = pytest.importorskip("torch")
    block, config = hf_block(family, norm_topk_prob, seed=0)
    cfg = moe.MoeConfig(num_experts=8, top_k=2, expert_hidden=12, norm_topk_prob=norm_topk_prob,
                        shared_expert_hidden=getattr(config, "shared_expert_intermediate_size", 0))
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        expected = block(x).numpy()
        logits, scores, indices = block.gate(x.reshape(-1, D))
    w = weights_from_hf(block)
    xj = jnp.asarray(x.numpy())
    routing = moe.route(xj.reshape(-1, D), w["router"], cfg)
    assert_close(routing.logits, logits.numpy(), what="router logits")
    assert_close(routing.probs, torch.softmax(logits, dim=-1).numpy(), what="router probs")
    np.testing.assert_array_equal(routing.expert_ids, indices.numpy())
    assert_close(routing.weights, scores.numpy(), what="routing weights")
    for fn in (moe.sparse_moe, moe.reference_moe):
        assert_close(jax.jit(functools.partial(fn, cfg=cfg))(xj, w).hidden, expected, what=fn.__name__)


def test_balance_loss_matches_transformers():
    """One layer, two layers (stats summed over layers), and a padding mask."""
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    cfg = moe.MoeConfig(num_experts=8, top_k=2, expert_hidden=12)
    logits = [jax.random.normal(jax.random.key(i), (10, 8)) * 2.0 for i in (6, 7)]
    torch_logits = tuple(torch.from_numpy(np.array(l)) for l in logits)

    def stats(l, mask=None):
        probs = jax.nn.softmax(l, axis=-1)
        top, ids = jax.lax.top_k(probs, cfg.top_k)
        return moe.router_stats(moe.Routing(expert_ids=ids, weights=top, probs=probs, logits=l), mask)

    expected = load_balancing_loss_func(torch_logits[:1], 8, 2).item()
    assert_close(moe.balance_loss(stats(logits[0])), expected, what="one layer")
    expected = load_balancing_loss_func(torch_logits, 8, 2).item()
    summed = jax.tree.map(jnp.add, stats(logits[0]), stats(logits[1]))
    assert_close(moe.balance_loss(summed), expected, what="two layers")
    mask = np.array([[1] * 5, [1, 1, 1, 0, 0]])
    expected = load_balancing_loss_func(torch_logits, 8, 2, attention_mask=torch.from_numpy(mask)).item()
    flat = jnp.asarray(mask.reshape(-1).astype(bool))
    summed = jax.tree.map(jnp.add, stats(logits[0], flat), stats(logits[1], flat))
    assert_close(moe.balance_loss(summed), expected, what="two layers, masked")
    # And from the router of a real layer, through sparse_moe.
    block, _ = hf_block("qwen3_moe", True, seed=1)
    x = torch.randn(3, 4, D)
    with torch.no_grad():
        layer_logits = block.gate(x.reshape(-1, D))[0]
    expected = load_balancing_loss_func((layer_logits,), 8, 2).item()
    out = moe.sparse_moe(jnp.asarray(x.numpy()), weights_from_hf(block),
                         moe.MoeConfig(num_experts=8, top_k=2, expert_hidden=12, load_balance_coef=0.5))
    assert_close(out.aux_loss, 0.5 * expected, what="sparse_moe aux_loss")
