"""Tests for sdft_jax/distill/teacher.py: EMA closed form, fp32 keeping, sync period, config checks."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from sdft_jax.distill.teacher import TeacherConfig, init_teacher, update_teacher


def params(seed, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "layer": {"w": jax.random.normal(k1, (4, 3)).astype(dtype), "b": jax.random.normal(k2, (3,)).astype(dtype)},
        "count": jnp.array(7, jnp.int32),  # a non-float leaf rides along untouched by the casts
    }


@functools.partial(jax.jit, static_argnames=("cfg", "steps"))
def run_updates(teacher, student, cfg, steps):
    """`steps` updates against a constant student, with step counts 1..steps, in one jitted loop."""

    def body(i, t):
        return update_teacher(t, student, i + 1, cfg)

    return jax.lax.fori_loop(0, steps, body, teacher)


def test_init_teacher_is_an_fp32_copy():
    student = params(0, jnp.bfloat16)
    teacher = init_teacher(student)
    assert teacher["layer"]["w"].dtype == jnp.float32
    assert teacher["count"].dtype == jnp.int32
    np.testing.assert_array_equal(teacher["layer"]["w"], np.asarray(student["layer"]["w"], np.float32))
    fp32_student = params(0)
    copy = init_teacher(fp32_student)
    # A separate buffer, so the student and teacher can both be donated to a jitted step.
    assert copy["layer"]["w"].unsafe_buffer_pointer() != fp32_student["layer"]["w"].unsafe_buffer_pointer()


def test_ema_matches_closed_form_after_100_updates():
    teacher0, student = init_teacher(params(0)), params(1)
    teacher = run_updates(teacher0, student, TeacherConfig(mode="ema", ema_alpha=0.01), 100)
    keep = 0.99**100  # weight left on the initial teacher
    for path in (("layer", "w"), ("layer", "b")):
        t0 = np.asarray(teacher0[path[0]][path[1]], np.float64)
        s = np.asarray(student[path[0]][path[1]], np.float64)
        got = teacher[path[0]][path[1]]
        assert got.dtype == jnp.float32
        # 100 fp32 roundings, each damped by the later updates: a few ulps of O(1) values (measured
        # 2.7e-7). Written as (1 - alpha) * t + alpha * s in fp32 it drifts to 3.3e-6 and fails this.
        np.testing.assert_allclose(got, t0 * keep + s * (1 - keep), rtol=0, atol=1e-6)


def test_fp32_teacher_keeps_updates_that_bf16_rounds_away():
    ones = {"w": jnp.ones((8,), jnp.bfloat16)}
    student = {"w": jnp.full((8,), 1.0 + 2**-7, jnp.bfloat16)}  # one bf16 ulp above 1
    cfg = TeacherConfig(mode="ema", ema_alpha=0.01)
    expected = 1.0 + 2**-7 * (1 - 0.99**100)  # ~1.00495
    ours = run_updates(init_teacher(ones), student, cfg, 100)
    assert ours["w"].dtype == jnp.float32
    np.testing.assert_allclose(ours["w"], expected, rtol=1e-6)
    # The same updates on a bf16 teacher: each step moves it by 1% of an ulp and rounds back to 1.
    bf16 = run_updates(ones, student, cfg, 100)
    assert bf16["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16["w"], np.float32), 1.0)


def test_sync_copies_exactly_at_multiples_of_n():
    cfg = TeacherConfig(mode="sync", sync_every=3)
    update = jax.jit(update_teacher, static_argnames="cfg")
    teacher = init_teacher(params(0))
    last_copy = teacher
    for step in range(1, 10):
        student = params(step)
        teacher = update(teacher, student, jnp.asarray(step), cfg)
        if step % 3 == 0:
            last_copy = student
        jax.tree.map(np.testing.assert_array_equal, teacher, last_copy)


def test_static_never_changes():
    teacher0 = init_teacher(params(0))
    teacher = teacher0
    for step in range(1, 4):
        teacher = update_teacher(teacher, params(step), jnp.asarray(step), TeacherConfig(mode="static"))
    jax.tree.map(np.testing.assert_array_equal, teacher, teacher0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(mode="average"), "mode"),
        (dict(ema_alpha=0.0), "ema_alpha"),
        (dict(ema_alpha=1.5), "ema_alpha"),
        (dict(ema_alpha=True), "ema_alpha"),
        (dict(mode="sync"), "sync_every"),
        (dict(mode="sync", sync_every=-2), "sync_every"),
        (dict(mode="sync", sync_every=2.0), "sync_every"),
        (dict(mode="ema", sync_every=5), "sync_every"),
        (dict(source="stage1"), "source"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    # The annotation checker of the test suite may refuse a wrongly typed value before __post_init__ does.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match=field):
        TeacherConfig(**kwargs)


@pytest.mark.parametrize("mode, extra", [("ema", {}), ("sync", {"sync_every": 2})])
def test_a_base_teacher_must_be_static(mode, extra):
    # The base model with its adapters off cannot follow the student: that would put them back.
    with pytest.raises(ValueError, match=f"TeacherConfig.source='base' .* needs mode 'static', not '{mode}'"):
        TeacherConfig(source="base", mode=mode, **extra)
    assert TeacherConfig(source="base", mode="static").source == "base"
