"""Expert parallelism: the routed experts split over the `expert` mesh axis (8 fake devices) give what the
single-device grouped path gives, values and gradients, with LoRA on the experts and experts that get
no token; and `sparse_moe` on that path under an activation-sharding mesh with an expert axis (that the decoder
takes it there is tested in sharding_test.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdft_jax.models import expert_parallel, grouped_matmul, moe, sharding

# One layer's random weights and the relative bound, as the grouped path's own tests use them.
from tests.models.moe_test import D, assert_close, make_weights  # noqa: E402


def weight_axes(cfg: moe.MoeConfig, w) -> dict[str, tuple]:
    """Logical axes of each weight (adapters: the expert axis, then the projection's input or output)."""
    axes = {name: a for name, (_, a) in moe.param_shapes(D, cfg).items()}
    for name in moe.EXPERT_PROJECTIONS:
        if f"{name}_lora_a" in w:
            e, n_in, n_out = axes[name]
            axes[f"{name}_lora_a"] = (e, n_in, "lora_rank")
            axes[f"{name}_lora_b"] = (e, "lora_rank", n_out)
    return axes


def forced_to_experts_0_1(x, w):
    """Every token's two largest router logits are experts 0 and 1: with top_k <= 2 the others get nothing."""
    x = x.at[..., 0].set(4.0 + jnp.abs(x[..., 0]))
    w = dict(w, router=w["router"].at[0, :2].set(jnp.array([3.0, 2.5])))
    return x, w


MESHES = {
    "data2_expert4": {"data": 2, "expert": 4},
    "fsdp2_expert2_data2": {"data": 2, "fsdp": 2, "expert": 2},
    "expert2_tensor2_fsdp2": {"fsdp": 2, "expert": 2, "tensor": 2},
}


@pytest.mark.parametrize("lora_rank", [0, 3], ids=["base", "lora"])
@pytest.mark.parametrize("forced", [False, True], ids=["random_router", "two_experts_only"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_experts_equal_grouped(mesh_name, forced, lora_rank):
    mesh = sharding.make_mesh(MESHES[mesh_name])
    cfg = moe.MoeConfig(num_experts=8, top_k=2, expert_hidden=12, norm_topk_prob=not forced)
    k = jax.random.split(jax.random.key(3), 3)
    w = make_weights(k[0], cfg, lora_rank)
    x = jax.random.normal(k[1], (8 * 5, D))
    if forced:
        x, w = forced_to_experts_0_1(x, w)
    cotangent = jax.random.normal(k[2], x.shape)
    routing = moe.route(x, w["router"], cfg)
    if forced:
        assert set(np.unique(routing.expert_ids).tolist()) == {0, 1}

    def objective(fn, x, w):
        return jnp.sum(fn(x, routing, moe.Experts.from_weights(w), 0.7) * cotangent)

    expected, expected_grads = jax.jit(jax.value_and_grad(functools.partial(objective, moe.grouped_experts),
                                                          argnums=(0, 1)))(x, w)
    axes = weight_axes(cfg, w)
    w_sharded = {n: jax.device_put(a, sharding.logical_sharding(axes[n], a.shape, mesh)) for n, a in w.items()}
    for name in moe.EXPERT_PROJECTIONS:
        assert w_sharded[name].sharding.spec[0] == "expert"
    x_sharded = jax.device_put(x, sharding.logical_sharding(("batch", None), x.shape, mesh))
    sharded = functools.partial(expert_parallel.sharded_experts, mesh=mesh)
    got, grads = jax.jit(jax.value_and_grad(functools.partial(objective, sharded), argnums=(0, 1)))(
        x_sharded, w_sharded)
    assert_close(got, expected, what="value")
    assert_close(grads[0], expected_grads[0], what="d x")
    for name in w:  # (the routing is computed outside `objective`: the router's gradient is 0 in both)
        assert_close(grads[1][name], expected_grads[1][name], what=f"d {name}")
    out = jax.jit(lambda x, w: sharded(x, routing, moe.Experts.from_weights(w), 0.7))(x_sharded, w_sharded)
    assert_close(out, moe.grouped_experts(x, routing, moe.Experts.from_weights(w), 0.7), what="output")


@pytest.mark.parametrize("forced", [False, True], ids=["random_router", "two_experts_only"])
def test_ragged_dot_leaves_rows_in_no_group_zero(forced, monkeypatch):
    """With `jax.lax.ragged_dot` (TPU / GPU's grouped matmul) the other experts' rows, past the local
    groups, come out zero too: the same values and gradients."""
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    cfg = moe.MoeConfig(num_experts=8, top_k=2, expert_hidden=12)
    k = jax.random.split(jax.random.key(6), 3)
    w = make_weights(k[0], cfg, lora_rank=2)
    x = jax.random.normal(k[1], (16, D))
    if forced:
        x, w = forced_to_experts_0_1(x, w)
    routing = moe.route(x, w["router"], cfg)
    cotangent = jax.random.normal(k[2], x.shape)

    def objective(fn, x, w):
        return jnp.sum(fn(x, routing, moe.Experts.from_weights(w), 1.0) * cotangent)

    expected, expected_grads = jax.value_and_grad(functools.partial(objective, moe.grouped_experts),
                                                  argnums=(0, 1))(x, w)
    monkeypatch.setattr(moe, "grouped_matmul", grouped_matmul.ragged_grouped_matmul)  # after the reference
    sharded = functools.partial(expert_parallel.sharded_experts, mesh=mesh)
    got, grads = jax.jit(jax.value_and_grad(functools.partial(objective, sharded), argnums=(0, 1)))(x, w)
    assert_close(got, expected, what="value")
    assert_close(grads[0], expected_grads[0], what="d x")
    for name in w:
        assert_close(grads[1][name], expected_grads[1][name], what=f"d {name}")


def test_rows_that_do_not_split_are_padded():
    """A decode step's 3 rows over 8 batch shards: padded inside, the same output."""
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    cfg = moe.MoeConfig(num_experts=8, top_k=3, expert_hidden=12, norm_topk_prob=False)
    k = jax.random.split(jax.random.key(4), 2)
    w = make_weights(k[0], cfg, lora_rank=2)
    x = jax.random.normal(k[1], (3, D))
    routing = moe.route(x, w["router"], cfg)
    experts = moe.Experts.from_weights(w)
    got = jax.jit(lambda x: expert_parallel.sharded_experts(x, routing, experts, 1.0, mesh=mesh))(x)
    assert_close(got, moe.grouped_experts(x, routing, experts), what="padded")


def test_experts_must_split_over_the_axis():
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    cfg = moe.MoeConfig(num_experts=6, top_k=2, expert_hidden=4)
    w = make_weights(jax.random.key(0), cfg)
    x = jnp.ones((8, D))
    with pytest.raises(ValueError, match="6 experts do not split over mesh axis 'expert' of size 4"):
        expert_parallel.sharded_experts(x, moe.route(x, w["router"], cfg), moe.Experts.from_weights(w), 1.0,
                                        mesh=mesh)


@pytest.mark.parametrize("shared", [0, 20], ids=["no_shared", "shared_expert"])
def test_sparse_moe_on_the_expert_parallel_path_equals_one_device(shared, monkeypatch):
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    cfg = moe.MoeConfig(num_experts=8, top_k=2, expert_hidden=12, shared_expert_hidden=shared, load_balance_coef=0.1)
    k = jax.random.split(jax.random.key(5), 3)
    w = make_weights(k[0], cfg, lora_rank=2)
    x = jax.random.normal(k[1], (8, 3, D))
    cotangent = jax.random.normal(k[2], x.shape)

    def objective(x, w, experts_fn=moe.grouped_experts):
        out = moe.sparse_moe(x, w, cfg, lora_scale=0.5, experts_fn=experts_fn)
        return jnp.sum(out.hidden * cotangent) + out.aux_loss, out

    (_, expected), expected_grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(x, w)
    sharded_objective = functools.partial(objective, experts_fn=expert_parallel.expert_parallel_experts)
    calls, original = [], expert_parallel.sharded_experts
    monkeypatch.setattr(expert_parallel, "sharded_experts",
                        lambda *a, **kw: calls.append(kw["mesh"]) or original(*a, **kw))
    axes = weight_axes(cfg, w)
    w_sharded = {n: jax.device_put(a, sharding.logical_sharding(axes[n], a.shape, mesh)) for n, a in w.items()}
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    with sharding.activation_sharding(mesh):
        (_, got), grads = jax.jit(jax.value_and_grad(sharded_objective, argnums=(0, 1), has_aux=True))(
            x_sharded, w_sharded)
    assert calls == [mesh]
    assert_close(got.hidden, expected.hidden, what="hidden")
    assert_close(got.aux_loss, expected.aux_loss, what="aux loss")
    assert_close(got.stats.assignments, expected.stats.assignments, what="assignments")
    assert_close(grads[0], expected_grads[0], what="d x")
    for name in w:
        assert_close(grads[1][name], expected_grads[1][name], what=f"d {name}")

