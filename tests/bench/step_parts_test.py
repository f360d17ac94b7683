"""The step's parts timed one by one (bench/step_parts.py): each program computes what the step computes
for that part, checked against the step itself, the dense loss and a forward written out here."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sdft_jax.bench import step_parts
from sdft_jax.distill import teacher as teacher_lib
from sdft_jax.distill.batch import make_step_batch
from sdft_jax.distill.losses import LossConfig, dense_loss
from sdft_jax.distill.train_state import OptimConfig, init_train_state
from sdft_jax.distill.train_step import StepConfig, shard_batch, train_step
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.testing.tiny import random_model, tiny_config


def _step_config(loss="topk", micro_batch_size=0):
    return StepConfig(loss=LossConfig(name=loss, top_k=8, chunk_size=16, vocab_chunk_size=64),
                      teacher=teacher_lib.TeacherConfig(mode="ema", ema_alpha=0.1),
                      optim=OptimConfig(learning_rate=1e-3, schedule="constant", warmup_ratio=0.0),
                      micro_batch_size=micro_batch_size)


@pytest.fixture(scope="module")
def setup():
    step_config = _step_config()
    model = random_model(tiny_config("qwen3"))
    graphdef, state = init_train_state(model, step_config.optim)
    # A teacher unlike the student (as after EMA steps), so that a part reading the wrong one shows.
    state = dataclasses.replace(state, teacher=jax.tree.map(lambda x: x * 1.5, state.teacher))
    rng = np.random.default_rng(0)
    rows = lambda n, k: [rng.integers(3, 300, k).tolist() for _ in range(n)]  # noqa: E731
    batch = shard_batch(make_step_batch(rows(4, 5), rows(4, 9), rows(4, 7), pad_id=0), None)
    programs = step_parts.part_programs(graphdef, state, batch, step_config)
    return graphdef, state, batch, step_config, programs


def _call(programs, name):
    fn, args = programs[name]
    return fn(*args), args


def test_every_part_is_built(setup):
    *_, programs = setup
    assert tuple(programs) == step_parts.PARTS


def test_gradients_part_is_the_steps_loss_and_gradient(setup):
    graphdef, state, batch, cfg, programs = setup
    ((loss, (metrics, _)), grads), _ = _call(programs, "gradients")
    _, step_metrics = jax.jit(lambda s, b: train_step(graphdef, s, b, cfg))(state, batch)
    np.testing.assert_allclose(loss, step_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(optax.tree.norm(grads), step_metrics["grad_norm"], rtol=1e-6)


def _completion_states(model, tokens, mask, prompt_len, completion_len):
    """`model`'s final hidden states at the positions that predict the completion (position P - 1 + t
    predicts completion token t), from its whole forward, eagerly."""
    full = model.forward(tokens, positions_from_mask(mask), mask).hidden
    return full[:, prompt_len - 1:prompt_len - 1 + completion_len]


def test_teacher_part_is_the_teachers_forward_at_the_completion(setup):
    graphdef, state, batch, _, programs = setup
    (hidden, head), _ = _call(programs, "teacher_forward")
    teacher = nnx.merge(graphdef, state.teacher, state.frozen)
    want = _completion_states(teacher, batch.teacher_tokens, batch.teacher_mask, batch.teacher_prompt_len,
                              batch.completion_len)
    # Jitted against eager fp32: a few ulps apart (~2e-6).
    np.testing.assert_allclose(hidden, want, rtol=1e-5, atol=1e-5)
    assert head.vocab_major == teacher.head().vocab_major
    np.testing.assert_array_equal(head.weight, teacher.head().weight)
    student = nnx.merge(graphdef, state.params, state.frozen)
    assert not np.allclose(head.weight, student.head().weight)


def test_student_part_differentiates_the_sum_of_squares_of_its_completion_states(setup):
    graphdef, state, batch, _, programs = setup
    (value, grads), _ = _call(programs, "student_forward_backward")
    student = nnx.merge(graphdef, state.params, state.frozen)
    want = _completion_states(student, batch.student_tokens, batch.student_mask, batch.student_prompt_len,
                              batch.completion_len)
    np.testing.assert_allclose(value, jnp.sum(jnp.square(want)), rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(state.params)
    assert float(optax.tree.norm(grads)) > 0


def test_loss_part_equals_the_dense_loss_and_its_gradient(setup):
    *_, cfg, programs = setup
    (value, (d_hidden, d_head)), (hidden, head, t_hidden, t_head, mask) = _call(programs, "loss")

    def dense(h, w):
        return dense_loss(h, w, mask, cfg.loss, teacher_hidden=t_hidden, teacher_head=t_head)[0]

    want, (want_hidden, want_head) = jax.value_and_grad(dense, argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(d_hidden, want_hidden, rtol=1e-4, atol=1e-7)
    assert d_head.vocab_major == head.vocab_major  # the gradient in the head's own layout
    np.testing.assert_allclose(d_head.weight, want_head.weight, rtol=1e-4, atol=1e-7)


def test_time_parts_reports_each_part(setup):
    *_, programs = setup
    timed = step_parts.time_parts(programs, runs=1)
    assert tuple(timed) == step_parts.PARTS
    assert all(t["seconds"] > 0 and t["compile_s"] >= 0 for t in timed.values())


def test_refuses_sft_and_micro_batches(setup):
    graphdef, state, batch, _, _ = setup
    with pytest.raises(ValueError, match="not 'sft'"):
        step_parts.part_programs(graphdef, state, batch, _step_config(loss="sft"))
    with pytest.raises(ValueError, match="micro_batch_size 0"):
        step_parts.part_programs(graphdef, state, batch, _step_config(micro_batch_size=2))
