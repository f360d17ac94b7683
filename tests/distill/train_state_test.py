"""The train state: fp32 masters, optimizer moments sharded like their parameters, a replaceable teacher."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from sdft_jax.checkpoints.hf import load_hf
from flax import nnx

from sdft_jax.distill.train_state import (
    OptimConfig,
    abstract_train_state,
    init_train_state,
    student_model,
    trains_router,
    with_base_teacher,
    with_params,
    with_teacher,
)
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.transformer import Transformer, positions_from_mask
from sdft_jax.models.sharding import make_mesh


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_init_state_teacher_is_the_student_in_fp32(tiny_model_dir):
    model = load_hf(tiny_model_dir("llama"), mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    _, state = init_train_state(model, OptimConfig(learning_rate=1e-3))
    for p, t in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.teacher)):
        assert t.dtype == np.float32 and t.sharding == p.sharding
        np.testing.assert_array_equal(np.asarray(p), np.asarray(t))
    assert int(state.step) == 0


def test_init_state_is_committed_to_the_models_device(tiny_model_dir):
    """Every leaf, the scalars made on the side (step, rng, Adam's count) too, is committed where the
    parameters are, as the step's outputs are: else the step's second call compiles it again."""
    model = load_hf(tiny_model_dir("llama"))
    _, state = init_train_state(model, OptimConfig())
    device = jax.tree.leaves(state.params)[0].sharding
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        assert leaf.committed and leaf.sharding == device, jax.tree_util.keystr(path)


def test_with_teacher_takes_the_other_models_weights_on_the_same_shardings(tiny_model_dir):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    path = tiny_model_dir("llama")
    student = load_hf(path, mesh=mesh)
    other = load_hf(path, mesh=mesh)
    other.embed[...] = other.embed[...] + 1.0  # a different model of the same shape
    _, state = init_train_state(student, OptimConfig(learning_rate=1e-3))
    new = with_teacher(state, other)
    for before, after in zip(jax.tree.leaves(state.teacher), jax.tree.leaves(new.teacher)):
        assert after.sharding == before.sharding and after.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(new.teacher["embed"][...]), np.asarray(state.teacher["embed"][...]) + 1.0)
    # Everything else is untouched.
    for a, b in zip(_leaves(state.params), _leaves(new.params)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(_leaves(state.teacher), _leaves(new.teacher))]
    assert sum(changed) == 1


def test_with_teacher_refuses_a_lora_state_or_other_shapes(tiny_model_dir):
    path = tiny_model_dir("llama")
    lora = load_hf(path, lora=LoraConfig(rank=2))
    _, lora_state = init_train_state(lora, OptimConfig(learning_rate=1e-3))
    with pytest.raises(ValueError, match="LoRA state shares its frozen base"):
        with_teacher(lora_state, load_hf(path))
    with pytest.raises(ValueError, match="must not have LoRA adapters"):
        with_teacher(lora_state, lora)
    _, state = init_train_state(load_hf(path), OptimConfig(learning_rate=1e-3))
    wider = load_hf(tiny_model_dir("llama", intermediate_size=48))
    with pytest.raises(ValueError, match="has shape"):
        with_teacher(state, wider)


def _forward_logits(model, tokens):
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool)
    return np.asarray(model.logits(model.forward(tokens, positions_from_mask(mask), mask).hidden))


def _adapted(path, rank=2):
    """A LoRA model of `path` whose adapters are not zero (a trained one), and its train state."""
    model = load_hf(path, lora=LoraConfig(rank=rank), mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    graphdef, state = init_train_state(model, OptimConfig(learning_rate=1e-3))
    params = jax.tree.map(lambda x: x + 0.05, state.params)  # every B nonzero
    return graphdef, state, params


def test_with_params_continues_other_adapters_with_a_fresh_optimizer(tiny_model_dir):
    graphdef, state, params = _adapted(tiny_model_dir("llama"))
    new = with_params(state, params)
    for p, n, t, before in zip(jax.tree.leaves(params), jax.tree.leaves(new.params), jax.tree.leaves(new.teacher),
                               jax.tree.leaves(state.params)):
        assert n.sharding == before.sharding and t.sharding == before.sharding and t.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(n), np.asarray(p))
        np.testing.assert_array_equal(np.asarray(t), np.asarray(p))  # the teacher starts where the student does
    for a, b in zip(_leaves(state.opt_state), _leaves(new.opt_state)):
        np.testing.assert_array_equal(a, b)  # Adam's moments and count as initialised
    assert int(new.step) == 0
    wider = init_train_state(load_hf(tiny_model_dir("llama"), lora=LoraConfig(rank=4)), OptimConfig())[1]
    with pytest.raises(ValueError, match=r"with_params: \['layers'\]\['down_proj_lora_a'\].* has shape \(2, \d+, 4\), "
                                         r"the state's \(2, \d+, 2\)"):
        with_params(state, wider.params)
    full = init_train_state(load_hf(tiny_model_dir("llama")), OptimConfig())[1]
    with pytest.raises(ValueError, match="with_params: other parameters than the state's"):
        with_params(state, full.params)


def test_base_teacher_is_the_base_model_with_the_adapters_off(tiny_model_dir):
    path = tiny_model_dir("llama")
    graphdef, state, params = _adapted(path)
    state = with_base_teacher(with_params(state, params))
    tokens = np.asarray([[3, 17, 5, 9, 30, 2]], np.int32)
    teacher = _forward_logits(nnx.merge(graphdef, state.teacher, state.frozen), tokens)
    base = _forward_logits(load_hf(path), tokens)
    student = _forward_logits(student_model(graphdef, state), tokens)
    assert np.abs(student - base).max() > 1e-3  # the adapters matter to the student
    np.testing.assert_allclose(teacher, base, rtol=0, atol=1e-6)
    # The student is untouched; the teacher holds no copy of the base weights.
    for a, b in zip(_leaves(state.params), _leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(state.teacher) == jax.tree.structure(state.params)
    with pytest.raises(ValueError, match="with_base_teacher: the state trains every weight"):
        with_base_teacher(init_train_state(load_hf(path), OptimConfig())[1])


def _names(state):
    return {path[-1] for path, _ in nnx.to_flat_state(state)}


def test_moe_routers_are_frozen_unless_asked(tiny_model_dir):
    model = load_hf(tiny_model_dir("qwen3_moe"))
    _, state = init_train_state(model, OptimConfig(learning_rate=1e-3))
    # Full fine-tuning: everything but the routers trains; the routers are shared, frozen, by the teacher.
    assert "router" not in _names(state.params) and "router" not in _names(state.teacher)
    assert _names(state.frozen) == {"router"} and not trains_router(state)
    assert {"experts_gate_proj", "q_proj", "gate_proj", "embed"} <= _names(state.params)
    _, trained = init_train_state(model, OptimConfig(learning_rate=1e-3), train_router=True)
    assert "router" in _names(trained.params) and "router" in _names(trained.teacher)
    assert not _names(trained.frozen) and trains_router(trained)
    # LoRA trains the adapters only, whatever train_router says: the router has none.
    lora = load_hf(tiny_model_dir("qwen3_moe"), lora=LoraConfig(rank=2))
    _, lora_state = init_train_state(lora, OptimConfig(learning_rate=1e-3), train_router=True)
    assert all(name.endswith(("_lora_a", "_lora_b")) for name in _names(lora_state.params))
    assert "experts_down_proj_lora_b" in _names(lora_state.params) and "router" in _names(lora_state.frozen)
    # A dense model has no router: its frozen part stays empty.
    _, dense = init_train_state(load_hf(tiny_model_dir("qwen3")), OptimConfig(learning_rate=1e-3))
    assert not _names(dense.frozen)


@pytest.mark.parametrize("architecture", ["qwen3_moe", "llama"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_abstract_state_has_the_shapes_of_the_real_one(architecture, use_lora, tiny_model_dir):
    path = tiny_model_dir(architecture)
    lora = LoraConfig(rank=2) if use_lora else None
    real_model = load_hf(path, lora=lora)
    real_graphdef, real = init_train_state(real_model, OptimConfig(learning_rate=1e-3))
    graphdef, abstract = abstract_train_state(
        nnx.eval_shape(lambda: Transformer(real_model.cfg, rngs=nnx.Rngs(0), lora=lora)), OptimConfig())
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (r.shape, r.dtype)
    assert graphdef == real_graphdef


def test_with_teacher_of_a_moe_model_shares_or_takes_the_routers(tiny_model_dir):
    path = tiny_model_dir("qwen3_moe")
    student = load_hf(path)
    other = load_hf(path)
    other.layers.experts_up_proj[...] = other.layers.experts_up_proj[...] + 1.0
    _, state = init_train_state(student, OptimConfig(learning_rate=1e-3))
    new = with_teacher(state, other)  # same routers: accepted, the experts taken
    np.testing.assert_array_equal(np.asarray(new.teacher["layers"]["experts_up_proj"][...]),
                                  np.asarray(state.teacher["layers"]["experts_up_proj"][...]) + 1.0)
    other.layers.router[...] = other.layers.router[...] + 1.0
    with pytest.raises(ValueError, match=r"'router'.* is frozen, shared by student and teacher"):
        with_teacher(state, other)
    _, trained = init_train_state(student, OptimConfig(learning_rate=1e-3), train_router=True)
    new = with_teacher(trained, other)  # trained routers: the teacher has its own
    np.testing.assert_array_equal(np.asarray(new.teacher["layers"]["router"][...]),
                                  np.asarray(trained.teacher["layers"]["router"][...]) + 1.0)


def test_schedules_run_over_the_given_number_of_steps():
    cosine = OptimConfig(learning_rate=1.0, schedule="cosine", warmup_ratio=0.2).schedule_fn(10)
    # Linear warmup over 2 steps, then a cosine from 1 to 0 over the remaining 8: 0.5 * (1 + cos(pi * k / 8)).
    assert [float(cosine(s)) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-7)
    constant = OptimConfig(learning_rate=0.1, schedule="constant", warmup_ratio=0.5).schedule_fn(4)
    assert [float(constant(s)) for s in (0, 1, 2, 3, 4)] == pytest.approx([0.0, 0.05, 0.1, 0.1, 0.1], abs=1e-7)
    flat = OptimConfig(learning_rate=0.1, schedule="constant", warmup_ratio=0.0).schedule_fn(4)
    assert float(flat(0)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1, got 0"):
        OptimConfig().optimizer(0)


def test_linear_schedule_is_hf_linear_with_warmup():
    # HF's get_linear_schedule_with_warmup(warmup=2, total=10): step / 2 while warming up, then
    # (10 - step) / 8, and 0 from the last step on.
    linear = OptimConfig(learning_rate=2.0, schedule="linear", warmup_ratio=0.2).schedule_fn(10)
    hand = [0.0, 1.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert [float(linear(s)) for s in range(12)] == pytest.approx(hand, abs=1e-7)
    # No warmup: from the peak at step 0 down to 0 at the end.
    plain = OptimConfig(learning_rate=1.0, schedule="linear", warmup_ratio=0.0).schedule_fn(4)
    assert [float(plain(s)) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-7)


def test_optimizer_state_does_not_depend_on_the_schedule_length():
    params = {"w": np.ones((3,), np.float32)}
    short, long = (OptimConfig().optimizer(n).init(params) for n in (1, 1000))
    assert jax.tree.structure(short) == jax.tree.structure(long)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0.0), r"OptimConfig\.learning_rate must be a finite number > 0\.0"),
    # (the annotation checker of the tests refuses a value outside the Literal first, naming the parameter)
    (dict(schedule="exponential"),
     r"OptimConfig\.schedule must be one of \['constant', 'cosine', 'linear'\]|parameter 'schedule'"),
    (dict(warmup_ratio=1.0), r"OptimConfig\.warmup_ratio must be a finite number in \[0\.0, 1\.0\)"),
    (dict(b2=1.0), r"OptimConfig\.b2 must be a finite number in \[0\.0, 1\.0\)"),
    (dict(eps=-1e-8), r"OptimConfig\.eps must be a finite number >= 0\.0"),
    (dict(weight_decay=-0.1), r"OptimConfig\.weight_decay must be a finite number >= 0\.0"),
    (dict(max_grad_norm=float("nan")), r"OptimConfig\.max_grad_norm must be a finite number"),
])
def test_invalid_optim_config_names_the_field(kwargs, message):
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match=message):
        OptimConfig(**kwargs)
