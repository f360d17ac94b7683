"""The train state: fp32 masters, optimizer moments sharded like their parameters, a replaceable teacher."""

import jax
import jaxtyping
import numpy as np
import pytest

from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.distill.train_state import OptimConfig, init_train_state, with_teacher
from sdft_jax.models.lora import LoraConfig
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


def test_optimizer_state_does_not_depend_on_the_schedule_length():
    params = {"w": np.ones((3,), np.float32)}
    short, long = (OptimConfig().optimizer(n).init(params) for n in (1, 1000))
    assert jax.tree.structure(short) == jax.tree.structure(long)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0.0), r"OptimConfig\.learning_rate must be a finite number > 0\.0"),
    # (the annotation checker of the tests refuses a value outside the Literal first, naming the parameter)
    (dict(schedule="linear"), r"OptimConfig\.schedule must be one of \['constant', 'cosine'\]|parameter 'schedule'"),
    (dict(warmup_ratio=1.0), r"OptimConfig\.warmup_ratio must be a finite number in \[0\.0, 1\.0\)"),
    (dict(b2=1.0), r"OptimConfig\.b2 must be a finite number in \[0\.0, 1\.0\)"),
    (dict(eps=-1e-8), r"OptimConfig\.eps must be a finite number >= 0\.0"),
    (dict(weight_decay=-0.1), r"OptimConfig\.weight_decay must be a finite number >= 0\.0"),
    (dict(max_grad_norm=float("nan")), r"OptimConfig\.max_grad_norm must be a finite number"),
])
def test_invalid_optim_config_names_the_field(kwargs, message):
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match=message):
        OptimConfig(**kwargs)
