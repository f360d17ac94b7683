"""`summed_scan` against the plain scan under autodiff: the forward, the carry's cotangent, and the
running sum's cotangent = the sum + the weights' gradients at their rows; and the residuals it keeps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.models.summed_scan import Rows, summed_scan

S, D, R = 3, 8, 4  # scan steps, width, rank of the trained factors
POLICIES = {"none": None, "full": "full", "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _layer(carry, w, consts):
    """A layer with two trained factors (one per step, one a block of 2 per step), a frozen weight, float
    and boolean consts, and a carry of the hidden state plus a differentiated statistic."""
    h, stat = carry
    scale, keep = consts
    up = w["frozen"] + w["a"] @ w["b"][0] + w["a"] @ w["b"][1]
    h = h + jnp.where(keep[:, None], jnp.tanh(h @ up) * scale, 0.0)
    return h, stat + jnp.sum(h ** 2)


def _step(policy):
    if policy is None:
        return _layer
    return jax.checkpoint(_layer, policy=None if policy == "full" else policy)


def _inputs():
    k = jax.random.split(jax.random.key(0), 6)
    xs = {"a": jax.random.normal(k[0], (S, D, R)) / 3,
          "b": jax.random.normal(k[1], (S, 2, R, D)) / 3,
          "frozen": jax.random.normal(k[2], (S, D, D)) / 3}
    carry = (jax.random.normal(k[3], (5, D)), jnp.zeros(()))
    consts = (jnp.float32(0.7), jnp.array([True, True, False, True, True]))
    # The running sums cover more rows than this scan: `a` rows 2..4 of 6, `b` rows 1..6 of 8 (blocks of 2).
    sums = {"a": jax.random.normal(k[4], (6, D, R)), "b": jax.random.normal(k[5], (8, R, D))}
    rows = {"a": Rows(2), "b": Rows(1, 2)}
    return xs, carry, consts, sums, rows


@pytest.mark.parametrize("policy", list(POLICIES))
def test_seeded_sum_cotangent_is_the_sum_plus_the_gradients_at_their_rows(policy):
    step = _step(POLICIES[policy])
    xs, carry, consts, sums, rows = _inputs()

    def loss_of(carry_out):
        h, stat = carry_out
        return jnp.sum(jnp.sin(h)) + 0.1 * stat

    def plain(trained, carry):
        out, _ = jax.lax.scan(lambda c, x: (step(c, x, consts), None), carry, {**xs, **trained})
        return loss_of(out)

    def summed(trained, carry, sums):
        out, sums = summed_scan(step, carry, {**xs, **trained}, consts, sums, rows)
        return loss_of(out), sums

    trained = {"a": xs["a"], "b": xs["b"]}
    loss, (g_trained, g_carry) = jax.value_and_grad(plain, argnums=(0, 1))(trained, carry)
    (loss_s, sums_out), pullback = jax.vjp(summed, trained, carry, sums)
    d_trained, d_carry, d_sums = pullback((jnp.ones(()), sums))

    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    for name in sums:  # passed through unchanged
        np.testing.assert_array_equal(sums_out[name], sums[name])
    expected_a = sums["a"].at[2:5].add(g_trained["a"])
    expected_b = sums["b"].at[1:7].add(g_trained["b"].reshape(6, R, D))
    np.testing.assert_allclose(d_sums["a"], expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_sums["b"], expected_b, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(d_carry), jax.tree.leaves(g_carry), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The trained weights' own cotangents are zero: their gradients are in the sum's.
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(d_trained))


def test_names_of_the_sum_that_the_scan_lacks_pass_through():
    xs, carry, consts, sums, rows = _inputs()
    sums = {**sums, "elsewhere": jnp.arange(3.0)}

    def summed(sums):
        out, sums = summed_scan(_layer, carry, xs, consts, sums, rows)
        return jnp.sum(out[0]), sums

    _, pullback = jax.vjp(summed, sums)
    (d_sums,) = pullback((jnp.ones(()), sums))
    np.testing.assert_array_equal(d_sums["elsewhere"], sums["elsewhere"])


def test_residuals_that_are_inputs_are_not_stacked():
    """A frozen weight and a const that the backward needs as they are (the right operands of dots) are
    read from the inputs again: no scan output of the forward is a stacked copy of either."""
    xs, carry, _, sums, rows = _inputs()
    xs = {**xs, "frozen": jax.random.normal(jax.random.key(9), (S, D, D + 2))}  # shapes nothing else has
    consts = jax.random.normal(jax.random.key(8), (D, D + 1))

    def layer(carry, w, mix):
        h, stat = carry
        z = jnp.tanh(h @ w["frozen"])[:, :D]
        h = h + jnp.tanh(z @ mix)[:, :D] + (h @ w["a"]) @ (w["b"][0] + w["b"][1])
        return h, stat

    def summed(trained, sums):
        out, sums = summed_scan(layer, carry, {**xs, **trained}, consts, sums, rows)
        return jnp.sum(out[0]), sums

    jaxpr = jax.make_jaxpr(functools.partial(jax.vjp, summed))({"a": xs["a"], "b": xs["b"]}, sums)
    shapes = [v.aval.shape for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "scan" for v in eqn.outvars]
    assert (S, 5, D) in shapes, "the forward's scan keeps no residuals"
    assert (S, D, D + 2) not in shapes and (S, D, D + 1) not in shapes


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _params_jaxprs(eqn):
            yield from _all_eqns(sub)


def _params_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v


def test_a_scan_without_a_trained_name_or_rows_is_refused():
    xs, carry, consts, sums, rows = _inputs()
    with pytest.raises(ValueError, match="no name of grad_sum"):
        summed_scan(_layer, carry, xs, consts, {"other": jnp.zeros(3)}, rows)
    with pytest.raises(ValueError, match=r"no rows for \['b'\]"):
        summed_scan(_layer, carry, xs, consts, sums, {"a": rows["a"]})
