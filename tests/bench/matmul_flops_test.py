"""`matmul_flops`: a traced program's matmul FLOPs by operand dtypes, against hand counts."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sdft_jax.bench.matmul_flops import matmul_flops


def counted(f, *args) -> dict:
    return matmul_flops(jax.jit(f).trace(*args).jaxpr)


def abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_a_matmul_counts_twice_its_output_times_its_contraction_by_operand_dtypes():
    x, w = abstract((4, 8), jnp.bfloat16), abstract((8, 16), jnp.bfloat16)
    assert counted(jnp.dot, x, w) == {"matmul_flops": {"bf16": 2 * 4 * 16 * 8}, "matmul_loops_counted_once": 0,
                                      "matmul_kernels_not_counted": {}}
    # A batched einsum: batch 3, output [3, 4, 5] contracting 6 and 7.
    a, b = abstract((3, 4, 6, 7)), abstract((3, 6, 7, 5))
    assert counted(lambda a, b: jnp.einsum("bmij,bijn->bmn", a, b), a, b)["matmul_flops"] == {"f32": 2 * 3 * 4 * 5 * 42}
    # Mixed operands keep their order; the product of the two matmuls is summed per key.
    f = lambda x, w: (jax.lax.dot(x, w, preferred_element_type=jnp.float32),  # noqa: E731
                      jax.lax.dot(w.T, x.T.astype(jnp.float32)))
    assert counted(f, x, abstract((8, 16)))["matmul_flops"] == {"bf16*f32": 2 * 4 * 16 * 8, "f32": 2 * 16 * 4 * 8}


def test_scans_multiply_and_conds_count_their_costliest_branch():
    def scanned(x, ws):
        def layer(h, w):
            inner = jax.lax.scan(lambda c, _: (c @ w, None), h, None, length=2)[0]  # 2 matmuls per layer
            return inner, None
        return jax.lax.scan(layer, x, ws)[0]

    x, ws = abstract((5, 6)), abstract((3, 6, 6))
    assert counted(scanned, x, ws)["matmul_flops"] == {"f32": 3 * 2 * (2 * 5 * 6 * 6)}

    def branchy(p, x, w):
        return jax.lax.cond(p, lambda: (x @ w) @ w.T @ w, lambda: x @ w)

    assert counted(branchy, abstract((), jnp.bool_), x, abstract((6, 9)))["matmul_flops"] == {
        "f32": 2 * 5 * 9 * 6 + 2 * 5 * 6 * 9 + 2 * 5 * 9 * 6}


def test_the_backward_is_counted_and_an_unknown_trip_count_once():
    x, w = abstract((4, 8)), abstract((8, 16))
    grad = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), argnums=(0, 1))
    # forward x @ w, backward g @ w.T and x.T @ g: three matmuls of the same size.
    assert counted(grad, x, w)["matmul_flops"] == {"f32": 3 * 2 * 4 * 16 * 8}

    def decode(x, w):
        return jax.lax.while_loop(lambda c: c[1] < 10, lambda c: (jnp.tanh(c[0] @ w), c[1] + 1), (x, 0))[0]

    got = counted(decode, x, abstract((8, 8)))
    assert got == {"matmul_flops": {"f32": 2 * 4 * 8 * 8}, "matmul_loops_counted_once": 1, "matmul_kernels_not_counted": {}}


def test_a_ragged_dot_counts_each_row_against_its_own_group_forward_and_backward():
    # 12 rows in 3 groups, [12, 8] x [3, 8, 16]: each row meets one group's matrix.
    x, w, sizes = abstract((12, 8), jnp.bfloat16), abstract((3, 8, 16), jnp.bfloat16), abstract((3,), jnp.int32)
    one = 2 * 12 * 8 * 16
    assert counted(jax.lax.ragged_dot, x, w, sizes)["matmul_flops"] == {"bf16": one}
    # The backward: the rows' gradient (ragged, [12, 16] x [3, 16, 8]) and the groups' weight gradient
    # (contracting the ragged rows: [12, 8] x [12, 16] -> [3, 8, 16], each row in one group's sum).
    grad = jax.grad(lambda x, w, s: jnp.sum(jax.lax.ragged_dot(x, w, s).astype(jnp.float32)), argnums=(0, 1))
    assert counted(grad, x, w, sizes)["matmul_flops"] == {"bf16": 3 * one}


def test_a_fused_kernel_is_named_not_counted_and_scans_multiply_its_calls():
    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = jnp.dot(x_ref[...], w_ref[...])

    def fused(x, w):  # a Pallas matmul on a grid of 2 row blocks: its body's dot runs twice per call
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 8), jnp.float32), grid=(2,),
                              in_specs=[pl.BlockSpec((8, 4), lambda i: (i, 0)), pl.BlockSpec((4, 8), lambda i: (0, 0))],
                              out_specs=pl.BlockSpec((8, 8), lambda i: (i, 0)))(x, w)

    def program(x, w):
        y = jax.lax.scan(lambda c, _: (c, fused(c, w)), x, None, length=3)[1]
        return y.sum(0) @ w.T  # one plain matmul, [16, 8] x [8, 4]

    got = counted(program, abstract((16, 4)), abstract((4, 8)))
    assert got == {"matmul_flops": {"f32": 2 * 16 * 4 * 8}, "matmul_loops_counted_once": 0,
                   "matmul_kernels_not_counted": {"pallas_call": 3}}
