"""A layer scan whose backward adds each layer's weight gradients into a running sum, in place.

Accumulating gradients over micro-batches (`distill.train_step`) the plain way holds the gradients
twice: the running sum, and the micro-batch's own gradients, which the backward of the layer scan
writes into a fresh stacked buffer before they are added. `summed_scan` is that layer scan with the
sum threaded through it instead: its forward is `lax.scan(step, carry, xs)` (and passes `grad_sum`
through unchanged); its backward runs the steps in reverse and adds each step's weight gradients into
the cotangent of `grad_sum` at that step's rows, so the cotangent that flows back out of `grad_sum` is
the running sum plus this scan's gradients, in the running sum's own buffer. Seeding that cotangent
with the running sum (`jax.vjp`, see `train_step.step_gradients`) gives the new sum directly.

The differentiated weights (the names in `grad_sum`) get no cotangent of their own: their gradients
are in `grad_sum`'s. `consts` (what every step reads: RoPE tables, masks) get none either: they must not
depend on what is differentiated. The carry's cotangent is the plain one.

Each step's residuals are what `jax.vjp` of `step` keeps (with the layers' `jax.checkpoint` policies
inside `step`, what they save), stacked over the steps, except those that are the step's own inputs (a
weight slice, a const), which the backward takes from the inputs again rather than from a stacked copy.
The reference is the scan under ordinary autodiff with the sum added after (tests/models/summed_scan_test.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

Step = Callable[[Any, Mapping[str, Array], Any], Any]  # (carry, one step's xs, consts) -> carry


@dataclasses.dataclass(frozen=True)
class Rows:
    """Where scan step i's slice of a stacked weight sits in its gradient sum: rows `start + i * block`
    onward, `block` rows (the slice has a leading axis of `block`), or the one row `start + i` when
    `block` is None (the slice has no such axis)."""

    start: int
    block: int | None = None

    def add(self, total: Array, i: Array, grad: Array) -> Array:
        """`total` with `grad` (step i's gradient of the slice) added at its rows."""
        if self.block is None:
            row = self.start + i
            current = jax.lax.dynamic_index_in_dim(total, row, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(total, current + grad.astype(total.dtype), row, 0)
        start = self.start + i * self.block
        current = jax.lax.dynamic_slice_in_dim(total, start, self.block)
        return jax.lax.dynamic_update_slice_in_dim(total, current + grad.astype(total.dtype), start, 0)


def summed_scan(step: Step, carry, xs: Mapping[str, Array], consts, grad_sum: Mapping[str, Array],
                rows: Mapping[str, Rows]):
    """`(lax.scan(step, carry, xs)'s carry, grad_sum)`; in the backward, the gradients of the names of
    `grad_sum` that `xs` holds are added into `grad_sum`'s cotangent at `rows[name]` (module docstring).
    Names of `grad_sum` that `xs` lacks pass through."""
    trained = tuple(n for n in xs if n in grad_sum)
    if not trained:
        raise ValueError(f"summed_scan: no name of grad_sum ({sorted(grad_sum)}) is scanned ({sorted(xs)})")
    missing = [n for n in trained if n not in rows]
    if missing:
        raise ValueError(f"summed_scan: no rows for {missing}")
    fixed = {n: xs[n] for n in xs if n not in grad_sum}
    layout: dict[str, Any] = {}  # the residual layout, recorded when the forward is traced

    def one(c, w, f, k):
        return step(c, {**w, **f}, k)

    @jax.custom_vjp
    def scan(carry, trained_xs, fixed_xs, consts, grad_sum):
        out, _ = jax.lax.scan(lambda c, x: (one(c, x[0], x[1], consts), None), carry, (trained_xs, fixed_xs))
        return out, grad_sum

    def forward(carry, trained_xs, fixed_xs, consts, grad_sum):
        def body(c, x):
            w, f = x
            c, pullback = jax.vjp(lambda c, w: one(c, w, f, consts), c, w)
            leaves, treedef = jax.tree.flatten(pullback)
            # A residual that is one of this step's inputs is taken from the inputs in the backward.
            inputs = {id(a): ("fixed", n) for n, a in f.items()}
            inputs.update({id(a): ("trained", n) for n, a in w.items()})
            inputs.update({id(a): ("const", j) for j, a in enumerate(jax.tree.leaves(consts))})
            sources = tuple(inputs.get(id(leaf)) for leaf in leaves)
            layout.update(treedef=treedef, sources=sources)
            return c, [leaf for leaf, s in zip(leaves, sources) if s is None]

        out, saved = jax.lax.scan(body, carry, (trained_xs, fixed_xs))
        return (out, grad_sum), (saved, trained_xs, fixed_xs, consts)

    def backward(residuals, cotangents):
        saved, trained_xs, fixed_xs, consts = residuals
        d_carry, d_sum = cotangents
        const_leaves = jax.tree.leaves(consts)
        length = jax.tree.leaves((trained_xs, fixed_xs))[0].shape[0]

        def body(c, x):
            d_carry, d_sum = c
            i, stacked, w, f = x
            it = iter(stacked)
            pick = {"fixed": f, "trained": w}
            leaves = [next(it) if s is None else const_leaves[s[1]] if s[0] == "const" else pick[s[0]][s[1]]
                      for s in layout["sources"]]
            pullback = jax.tree.unflatten(layout["treedef"], leaves)
            d_carry, d_w = pullback(d_carry)
            d_sum = dict(d_sum)
            for n in trained:
                d_sum[n] = rows[n].add(d_sum[n], i, d_w[n])
            return (d_carry, d_sum), None

        (d_carry, d_sum), _ = jax.lax.scan(body, (d_carry, dict(d_sum)),
                                           (jnp.arange(length), saved, trained_xs, fixed_xs), reverse=True)
        return d_carry, None, None, None, d_sum

    scan.defvjp(forward, backward)
    return scan(carry, {n: xs[n] for n in trained}, fixed, consts, dict(grad_sum))

