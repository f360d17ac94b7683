"""The sorted and grouped top-K against `jax.lax.top_k`, their plain reference: values and ids equal to the
bit (ties, signed zeros, NaN and infinities, padded last groups, bf16), the same gradient, the platform's
choice, and, on 8 fake devices, no collective when the rows are sharded (where `lax.top_k` gathers the
whole operand)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdft_jax.bench.hlo_collectives import collectives
from sdft_jax.models import top_k


def assert_same(actual, expected, what=""):
    """Equal values (NaN where NaN, -0.0 where -0.0) and equal ids."""
    (values, ids), (ref_values, ref_ids) = actual, expected
    assert ids.dtype == ref_ids.dtype == jnp.int32, what
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids), err_msg=what)
    bits = lambda v: np.asarray(jax.lax.bitcast_convert_type(v, jnp.uint32 if v.dtype == jnp.float32 else jnp.uint16))
    np.testing.assert_array_equal(bits(values), bits(ref_values), err_msg=what)


def ties(shape, levels, seed=0):
    """Rows of small integers: most values tied with many others."""
    return jax.random.randint(jax.random.key(seed), shape, 0, levels).astype(jnp.float32)


GROUPED = [  # (length of a row, k, group): rows split evenly, a padded last group, groups of one id
    (1000, 7, 16), (1024, 20, 32), (999, 5, 128), (64, 8, 1), (300, 3, 100)]


@pytest.mark.parametrize("v, k, group", GROUPED)
def test_grouped_and_sorted_top_k_equal_lax_top_k(v, k, group):
    x = jax.random.normal(jax.random.key(v), (3, 5, v)) * 4
    cases = [(x, "normal"), (jnp.zeros((2, v)), "all equal")] + [
        (ties((3, 5, v), levels, seed=levels), f"ties among {levels} values") for levels in (6, 40, 300)]
    for data, what in cases:
        expected = jax.lax.top_k(data, k)
        assert_same(top_k.grouped_top_k(data, k, group=group), expected, what)
        assert_same(top_k.sorted_top_k(data, k), expected, f"sorted, {what}")


def test_special_values_keep_the_total_order_of_lax_top_k():
    """NaN above +inf and -NaN below -inf, 0.0 above -0.0, ties to the lower id, within and across groups."""
    special = jnp.array([0.0, -0.0, jnp.nan, -jnp.nan, jnp.inf, -jnp.inf, 1.0, -1.0, 0.0, -0.0])
    rows = jnp.stack([jnp.tile(special, 10), jax.random.permutation(jax.random.key(1), jnp.tile(special, 10))])
    for k in (1, 4, 10, 25):
        expected = jax.lax.top_k(rows, k)
        assert_same(top_k.grouped_top_k(rows, k, group=4), expected, f"k={k}")
        assert_same(top_k.sorted_top_k(rows, k), expected, f"sorted k={k}")


def test_bf16_rows_are_selected_as_in_lax_top_k():
    x = (jax.random.normal(jax.random.key(2), (4, 2048)) * 3).astype(jnp.bfloat16)  # bf16 rounding: many ties
    assert_same(top_k.grouped_top_k(x, 20, group=64), jax.lax.top_k(x, 20))


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_gpu_programs_group_long_rows_and_sort_short_ones_others_take_lax_top_k(platform, monkeypatch):
    monkeypatch.setattr(top_k, "target_platform", lambda: platform)
    calls = []
    for name in ("grouped_top_k", "sorted_top_k"):
        original = getattr(top_k, name)
        monkeypatch.setattr(top_k, name, lambda x, k, name=name, original=original: calls.append(name) or original(x, k))
    k = 5
    long_row = jax.random.normal(jax.random.key(3), (2, 3, top_k.MIN_GROUPS * k * top_k.GROUP))
    short_row = long_row[..., :-1]
    for x in (long_row, short_row):
        assert_same(top_k.top_k(x, k), jax.lax.top_k(x, k))
    assert calls == (["grouped_top_k", "sorted_top_k"] if platform == "gpu" else [])


def test_grouped_and_sorted_top_k_have_the_gradient_of_lax_top_k():
    x = jax.random.normal(jax.random.key(4), (3, 4000))
    w = jax.random.normal(jax.random.key(5), (3, 20))
    ref = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, 20)[0] * w))(x)
    for fn in (top_k.grouped_top_k, top_k.sorted_top_k):
        grad = jax.grad(lambda x: jnp.sum(fn(x, 20)[0] * w))(x)
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(ref), err_msg=fn.__name__)


@pytest.mark.parametrize("spec", [P("data", None, None), P(("data", "tensor"), None, None), P(None, None, "tensor")])
def test_sharded_rows_give_the_same_result_and_a_sharded_batch_no_collective(spec):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    x = jax.random.normal(jax.random.key(6), (16, 8, 32768))  # K x GROUP candidates: 1/12 of a row
    placed = jax.device_put(x, NamedSharding(mesh, spec))
    compiled = jax.jit(lambda x: top_k.grouped_top_k(x, 20)).lower(placed).compile()
    assert_same(compiled(placed), jax.lax.top_k(x, 20))
    found = collectives(compiled.as_text())
    if spec[2] is None:  # the batch sharded: each device selects for its own rows
        assert found == {}
    else:  # the vocabulary sharded: what moves is the group maxima and the candidates, not the row
        moved = sum(c["bytes"] for c in found.values())
        assert 0 < moved < x.nbytes // 4


def test_bad_arguments_are_named():
    x = jnp.zeros((2, 10))
    with pytest.raises(ValueError, match=r"k=0 must be in \[1, 10\]"):
        top_k.top_k(x, 0)
    with pytest.raises(ValueError, match=r"k=11 must be in \[1, 10\]"):
        top_k.sorted_top_k(x, 11)
    with pytest.raises(ValueError, match="fewer than k=4 groups"):
        top_k.grouped_top_k(x, 4, group=4)
    with pytest.raises(ValueError, match="fewer than k=1 groups"):
        top_k.grouped_top_k(x, 1, group=0)
    with pytest.raises(TypeError):  # the shape checker's message in the tests, else `order_keys`' own
        top_k.top_k(jnp.zeros((2, 10), jnp.int32), 2)
