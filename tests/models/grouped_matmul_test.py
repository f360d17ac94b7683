"""The grouped matmul: the CPU tiled loop against `jax.lax.ragged_dot` and a plain per-group product
(values and gradients), with empty groups anywhere and groups larger than a tile."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.models import grouped_matmul


def assert_close(actual, expected, rel=1e-5, what=""):
    """max |actual - expected| <= rel * max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    err, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * {scale:.3g}"


def test_grouped_matmul_picks_ragged_dot_on_tpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(grouped_matmul, "tiled_grouped_matmul", lambda *a: calls.append("tiled") or a[0])
    monkeypatch.setattr(grouped_matmul, "ragged_grouped_matmul", lambda *a: calls.append("ragged") or a[0])
    x = jnp.ones((2, 3))
    grouped_matmul.grouped_matmul(x, jnp.ones((1, 3, 3)), jnp.array([2], jnp.int32))
    assert calls == (["ragged"] if jax.default_backend() == "tpu" else ["tiled"])
    for platform, picked in (("tpu", "ragged"), ("gpu", "tiled"), ("cpu", "tiled")):
        calls.clear()
        monkeypatch.setattr(grouped_matmul.jax, "default_backend", lambda p=platform: p)
        grouped_matmul.grouped_matmul(x, jnp.ones((1, 3, 3)), jnp.array([2], jnp.int32))
        assert calls == [picked], platform


@pytest.mark.parametrize("tile", [1, 3, 8, 64])
def test_tiled_grouped_matmul_equals_ragged_dot(tile):
    """Groups of every kind: empty first and last groups, empty ones between, one larger than a tile."""
    group_sizes = jnp.array([0, 5, 0, 0, 11, 1, 3, 0], jnp.int32)
    m = int(group_sizes.sum())
    k = jax.random.split(jax.random.key(3), 3)
    lhs = jax.random.normal(k[0], (m, 6))
    rhs = jax.random.normal(k[1], (8, 6, 5))
    cotangent = jax.random.normal(k[2], (m, 5))

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b, group_sizes) * cotangent),
                                          argnums=(0, 1)))(lhs, rhs)

    tiled = functools.partial(grouped_matmul.tiled_grouped_matmul, tile=tile)
    expected = np.concatenate([np.asarray(lhs[s:e]) @ np.asarray(rhs[g]) for g, (s, e) in enumerate(
        zip(np.cumsum(group_sizes) - group_sizes, np.cumsum(group_sizes)))])
    assert_close(jax.jit(tiled)(lhs, rhs, group_sizes), expected, what="tiled")
    assert_close(grouped_matmul.ragged_grouped_matmul(lhs, rhs, group_sizes), expected, what="ragged_dot")
    value, grads = value_and_grads(tiled)
    ref_value, ref_grads = value_and_grads(grouped_matmul.ragged_grouped_matmul)
    assert_close(value, ref_value, what="value")
    assert_close(grads[0], ref_grads[0], what="d lhs")
    assert_close(grads[1], ref_grads[1], what="d rhs")
    assert np.all(np.asarray(grads[1])[np.asarray(group_sizes) == 0] == 0)
