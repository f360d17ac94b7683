"""A program's matmul FLOPs by the dtypes its matmuls ask for, read from its jaxpr.

Which dtype a matmul's operands have decides the rate an accelerator runs it at: bf16 x bf16 runs on the
tensor cores / MXU at the chip's full rate; an fp32 operand makes it an fp32 matmul, which an H100 / H200
runs as TF32 (half the bf16 rate) by default, and a TPU as bf16 passes of a precision the program sets.
`bench plan` and `bench accel` report their programs' matmuls this way (`matmul_flops`), so a config whose
step asks for fp32 matmuls it does not need shows before it runs on a chip.

The count is of the program as JAX traced it (`jax.jit(f).trace(...).jaxpr`), before any compiler: every
`dot_general` counts 2 x (output elements) x (contracted size), times the trip counts of the scans around
it (the layer scan, the micro-batches, the loss's token chunks and vocab blocks); a `ragged_dot_general`
(the MoE experts' grouped matmul on TPU) counts each row once against its own group's matrix; a `cond`
counts its costliest branch; a `while` loop, whose trip count the jaxpr does not hold (the sampler's
decode loop), counts one trip and is reported in `matmul_loops_counted_once`. Fused kernels are opaque:
a Pallas kernel (`pallas_call`: the splash attention on TPU) runs its body once per grid point and may
skip blocks (a causal mask), and cuDNN's attention (`dot_product_attention_*`) is one primitive, so their
matmuls are not counted; `matmul_kernels_not_counted` gives how many such calls the program makes, by
name, so that a total short of the model's FLOPs says where the rest is. Operand dtypes are keyed as
`"bf16"` (both operands bf16), `"f32"` (both fp32) or `"bf16*f32"` (mixed, in operand order; an fp32
matmul once promoted), and so on for others.
"""

from __future__ import annotations

import math
from collections import Counter

from jax.extend import core as jcore

_SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "float64": "f64"}


def _dtype_key(a, b) -> str:
    x, y = (_SHORT.get(str(v.aval.dtype), str(v.aval.dtype)) for v in (a, b))
    return x if x == y else f"{x}*{y}"


def _subjaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item


def _is_kernel(name: str) -> bool:
    return name == "pallas_call" or name.startswith("dot_product_attention")


def _ragged_flops(eqn) -> int:
    """A ragged dot's FLOPs: 2 x output x contraction, where a contraction over the ragged dimension
    (the weight gradient, one output matrix per group) splits its rows among the groups."""
    lhs = eqn.invars[0]
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (contracting, _), _ = numbers.dot_dimension_numbers
    flops = 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.aval.shape[i] for i in contracting)
    if any(d in contracting for d in numbers.lhs_ragged_dimensions):
        flops //= eqn.invars[2].aval.shape[-1]  # group_sizes: [..., groups]
    return flops


def _count(jaxpr: jcore.Jaxpr, out: Counter, kernels: Counter, loops: list[int]) -> None:
    """Adds `jaxpr`'s matmul FLOPs, by dtype key, to `out` and its fused kernel calls to `kernels` (once:
    callers scale by trip counts)."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = eqn.invars[:2]
            (contracting, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(lhs.aval.shape[i] for i in contracting)
            out[_dtype_key(lhs, rhs)] += 2 * math.prod(eqn.outvars[0].aval.shape) * k
            continue
        if name == "ragged_dot_general":
            out[_dtype_key(*eqn.invars[:2])] += _ragged_flops(eqn)
            continue
        if _is_kernel(name):
            kernels[name] += 1
            continue
        if name == "cond":
            branches = []
            for branch in eqn.params["branches"]:
                c, k = Counter(), Counter()
                _count(branch.jaxpr, c, k, loops)
                branches.append((c, k))
            c, k = max(branches, key=lambda ck: sum(ck[0].values()))
            out.update(c)
            kernels.update(k)
            continue
        trips = eqn.params["length"] if name == "scan" else 1
        if name == "while":
            loops[0] += 1
        for sub in _subjaxprs(eqn.params):
            inner, inner_kernels = Counter(), Counter()
            _count(sub, inner, inner_kernels, loops)
            for key, flops in inner.items():
                out[key] += trips * flops
            for key, calls in inner_kernels.items():
                kernels[key] += trips * calls


def matmul_flops(closed: jcore.ClosedJaxpr) -> dict:
    """`{"matmul_flops": {dtype key: FLOPs, largest first}, "matmul_loops_counted_once": n,
    "matmul_kernels_not_counted": {kernel: calls}}` of a traced program (see the module docstring)."""
    out, kernels, loops = Counter(), Counter(), [0]
    _count(closed.jaxpr, out, kernels, loops)
    return {"matmul_flops": dict(sorted(out.items(), key=lambda kv: -kv[1])), "matmul_loops_counted_once": loops[0],
            "matmul_kernels_not_counted": dict(sorted(kernels.items()))}
