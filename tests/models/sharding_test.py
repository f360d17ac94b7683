"""Mesh construction and logical-axis rules; a MoE model on a mesh with an expert axis equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sdft_jax.models import expert_parallel, sharding
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.moe import EXPERT_PROJECTIONS, MoeConfig
from sdft_jax.models.transformer import Transformer, positions_from_mask
from sdft_jax.testing.tiny import tiny_config


def test_mesh_fills_the_minus_one_axis():
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    mesh = sharding.make_mesh({"fsdp": 2, "expert": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}


@pytest.mark.parametrize("shape, message", [({"data": 3}, "needs 3 devices"), ({"data": -1, "fsdp": -1}, "at most one"),
                                            ({"pipeline": 2}, "unknown axes"), ({"data": -1, "fsdp": 3}, "not divisible")])
def test_bad_meshes_fail_clearly(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_rules_map_logical_axes_and_skip_indivisible_dims():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("layers", "embed", "q_heads", "head_dim"), (2, 64, 4, 16), mesh) == \
        P(None, "fsdp", "tensor", None)
    # 3 KV heads cannot be split over tensor=2: replicated on that dimension instead of failing.
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
    # A mesh axis is used once per array.
    assert sharding.logical_to_spec(("batch", "embed"), (8, 64), mesh) == P(("data", "fsdp"), None)


def test_expert_axis_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    # The batch is split over the expert axis too (data parallel outside the MoE layers).
    assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp", "expert"), None)
    # Experts [L, E, D, F] over `expert`, their `embed` over `fsdp`; per-expert adapters likewise.
    assert sharding.logical_to_spec(("layers", "expert", "embed", "mlp"), (2, 8, 64, 32), mesh) == \
        P(None, "expert", "fsdp", None)
    assert sharding.logical_to_spec(("layers", "expert", "lora_rank", "embed"), (2, 8, 4, 64), mesh) == \
        P(None, "expert", None, "fsdp")
    # The router [L, D, E] and the shared expert's gate [L, D, 1]: replicated along their output.
    assert sharding.logical_to_spec(("layers", "embed", None), (2, 64, 8), mesh) == P(None, "fsdp", None)


def test_state_shardings_follow_param_axes():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = nnx.eval_shape(lambda: Transformer(tiny_config("llama"), rngs=nnx.Rngs(0)))
    shardings = sharding.state_shardings(nnx.state(model), mesh)
    leaf = lambda var: jax.tree.leaves(var)[0]  # noqa: E731
    assert leaf(shardings["embed"]).spec == P("tensor", "fsdp")
    assert leaf(shardings["layers"]["down_proj"]).spec == P(None, "tensor", "fsdp")


def test_every_qwen3_5_moe_weight_has_a_rule():
    """Both token mixers' heads over `tensor`, the experts over `expert`, `embed` over `fsdp`."""
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    model = nnx.eval_shape(lambda: Transformer(tiny_config("qwen3_5_moe"), rngs=nnx.Rngs(0)))
    shardings = sharding.state_shardings(nnx.state(model), mesh)
    spec = lambda name: jax.tree.leaves(shardings["layers"][name])[0].spec  # noqa: E731
    assert spec("q_gate_proj") == P(None, "fsdp", "tensor", None)  # [L, D, H, hd]: like q_proj
    assert spec("linear_q_proj") == P(None, "fsdp", "tensor", None)  # key heads
    assert spec("linear_v_proj") == P(None, "fsdp", "tensor", None)  # value heads
    assert spec("linear_v_conv") == P(None, None, "tensor", None)  # [L, K, Hv, Dv]
    assert spec("linear_a_log") == P(None, "tensor")
    assert spec("linear_out_proj") == P(None, "tensor", None, "fsdp")
    assert spec("experts_up_proj") == P(None, "expert", "fsdp", "tensor")
    assert spec("shared_expert_up_proj") == P(None, "fsdp", "tensor")


def test_constrain_is_a_noop_without_a_mesh():
    x = jax.numpy.ones((4, 2))
    assert sharding.constrain(x, ("batch", None)) is x


def test_batch_shards_counts_the_parts_the_batch_rule_splits_rows_into():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.batch_shards(mesh) == sharding.batch_shards(mesh, rows=8) == 4  # data x fsdp, not tensor
    assert sharding.batch_shards(mesh, rows=6) == 1  # 4 parts do not divide 6 rows: they stay whole
    assert sharding.batch_shards(sharding.make_mesh({"tensor": 8})) == 1
    assert sharding.active_batch_shards(8) == 1  # outside `activation_sharding`
    with sharding.activation_sharding(mesh):
        assert sharding.active_batch_shards(8) == 4
        assert sharding.active_batch_shards(6) == 1


def test_split_rows_gives_each_device_its_own_rows_as_one_part():
    """`[B, ...]` -> `[parts, B / parts, ...]` with part i the rows device i holds: the same values as a
    reshape, and every device's shard of the result its shard of the input."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rows = jax.device_put(jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3),
                          jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None)))
    with sharding.activation_sharding(mesh):
        parts = jax.jit(lambda x: sharding.split_rows(x, sharding.active_batch_shards(x.shape[0])))(rows)
    np.testing.assert_array_equal(parts, np.asarray(rows).reshape(8, 2, 3))
    assert parts.sharding.spec[0] == ("data", "fsdp")
    held = {shard.device: np.asarray(shard.data) for shard in rows.addressable_shards}
    for shard in parts.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data)[0], held[shard.device])
    with pytest.raises(ValueError, match="16 rows do not split into 3 parts"):
        sharding.split_rows(rows, 3)
    x = jnp.ones((4, 2))
    assert sharding.pin_rows(x) is x  # outside `activation_sharding`


def test_target_platform_is_the_mesh_devices_one_when_compiling_for_a_tpu_slice():
    """A program traced for a TPU slice from this CPU process (`bench plan --compiler tpu`) takes the TPU
    pieces: `ragged_dot` for the grouped matmul, splash attention."""
    pytest.importorskip("libtpu", reason="the TPU compiler; the test extra installs it")
    from sdft_jax.bench.plan import topology_devices
    from sdft_jax.models import fused_attention, grouped_matmul

    mesh = sharding.make_mesh({"fsdp": 4}, topology_devices("v5p:2x2x1"))
    args = (jnp.ones((4, 8)), jnp.ones((2, 8, 16)), jnp.array([1, 3], jnp.int32))

    def traced() -> str:  # a new function each time: a trace cached outside the mesh is not reused
        return str(jax.make_jaxpr(lambda *a: grouped_matmul.grouped_matmul(*a))(*args))

    assert sharding.target_platform() == jax.default_backend() == "cpu"
    assert "ragged_dot" not in traced()  # the tiled loop (its custom VJP's forward)
    with sharding.activation_sharding(mesh):
        assert sharding.target_platform() == "tpu"
        assert "ragged_dot_general" in traced()
        model = Transformer(tiny_config("qwen3"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
        assert model.attention_kernel() == "splash"
    assert model.attention_kernel() == fused_attention.select("auto", platform="cpu", dtype=jnp.bfloat16)


MOE_MESHES = {"data2_expert4": {"data": 2, "expert": 4}, "fsdp2_expert2_data2": {"data": 2, "fsdp": 2, "expert": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("architecture, mesh_shape", [("qwen3_moe", "data2_expert4"),
                                                      ("qwen3_moe", "fsdp2_expert2_data2"),
                                                      ("qwen3_5_moe", "data2_expert4")])
def test_moe_model_on_an_expert_mesh_equals_one_device(architecture, mesh_shape, monkeypatch):
    """A tiny qwen3_moe model (one dense layer, two sparse) or qwen3_5_moe (Gated DeltaNet and gated
    attention layers, a shared expert), LoRA on the experts, remat: logits and gradients of every parameter
    on 8 fake devices with an expert axis equal one device's, the experts split as the rules say."""
    mesh = sharding.make_mesh(MOE_MESHES[mesh_shape])
    if architecture == "qwen3_moe":
        cfg = tiny_config("qwen3_moe", num_layers=3, dense_layers=(1,),
                          moe=MoeConfig(num_experts=8, top_k=2, expert_hidden=24, load_balance_coef=0.01))
        targets = ("q_proj", "gate_proj", *EXPERT_PROJECTIONS)
    else:
        cfg = tiny_config("qwen3_5_moe", moe=MoeConfig(num_experts=8, top_k=2, expert_hidden=24,
                                                       shared_expert_hidden=16, load_balance_coef=0.01))
        targets = ("q_gate_proj", "linear_v_proj", "linear_out_proj", "shared_expert_up_proj", *EXPERT_PROJECTIONS)
    lora = LoraConfig(rank=2, alpha=4.0, targets=targets)
    model = Transformer(cfg, rngs=nnx.Rngs(0), lora=lora, remat="full")  # the training forward
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: 0.05 * jax.random.normal(next(keys), a.shape, a.dtype) + (a == 1), state)
    tokens = jax.random.randint(jax.random.key(2), (8, 6), 0, cfg.vocab_size)
    mask = jnp.ones((8, 6), bool).at[1, :2].set(False).at[6, :3].set(False)  # left padding in two rows
    cotangent = jax.random.normal(jax.random.key(3), (8, 6, cfg.vocab_size))

    def objective(state, tokens, mask):
        model = nnx.merge(graphdef, state)
        out = model.forward(tokens, positions_from_mask(mask), mask)
        logits = model.logits(out.hidden)
        return jnp.sum(logits * cotangent) + out.aux_loss, logits

    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (_, expected), expected_grads = step(state, tokens, mask)

    shardings = sharding.state_shardings(state, mesh)
    placed = jax.device_put(state, shardings)
    batch = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), tokens.shape, mesh))
    calls, original = [], expert_parallel.sharded_experts
    monkeypatch.setattr(expert_parallel, "sharded_experts", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with sharding.activation_sharding(mesh):
        (_, got), grads = step(placed, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    assert calls, "the sparse layers did not take the expert-parallel path"
    n = mesh.shape["expert"]
    for name in EXPERT_PROJECTIONS:
        for array in (name, f"{name}_lora_a", f"{name}_lora_b"):
            value = placed["layers"][array][...]
            assert value.sharding.spec[1] == "expert", array
            assert value.addressable_shards[0].data.shape[1] == cfg.moe.num_experts // n, array
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(expected))))
    flat_expected = dict(nnx.to_flat_state(expected_grads))
    for path, var in nnx.to_flat_state(grads):  # max error <= 1e-5 of the gradient's largest entry
        want = flat_expected[path][...]
        np.testing.assert_allclose(var[...], want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))),
                                   err_msg="/".join(map(str, path)))
