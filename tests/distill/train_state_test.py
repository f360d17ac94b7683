"""The train state: fp32 masters, optimizer moments sharded like their parameters, a replaceable teacher."""

import jax
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
