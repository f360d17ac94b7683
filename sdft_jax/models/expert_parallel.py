"""Expert parallelism: the routed experts of a MoE layer split over the mesh's `expert` axis.

`expert_parallel_experts` has the signature of `moe.ExpertsFn` and computes what
`moe.grouped_experts` computes, when the experts' weights are split over the `expert` mesh axis
(`sharding.DEFAULT_RULES` maps the logical axis `expert` to it) and the tokens over the batch axes
(`data` x `fsdp` x `expert`). One `jax.shard_map` over the whole mesh:

1. Each device enters with its tokens (and their routing ids and weights) and its `E / n` experts
   (`n` the size of the `expert` axis; the experts' other dimensions, split over `fsdp` / `tensor`
   outside, are gathered on entry: inside, a device holds its experts whole).
2. The tokens are all-gathered over `expert`: the `n` devices of one expert group then hold the same
   `n` blocks of tokens, and each runs the grouped matmuls of its own experts only. Its assignments
   are sorted with its own experts' first (the rest after them, in no group: the grouped matmul gives
   those rows zeros, and their routing weight is zeroed too), so it spends the FLOPs of its experts'
   assignments (exactly with the tiled loop of CPU and GPU; `ragged_dot` may touch every row).
3. Each device's partial outputs (its experts' contributions to all `n` blocks) are scatter-added to
   their tokens and summed over `expert` by `psum_scatter`, which leaves each device the sum for its
   own block of tokens: the layout it entered with.

Communication per layer, per device: an all-gather of [T_local * n, D] activations (and the [., k]
routing), a reduce-scatter of the same size back; the weights' gathers over `fsdp` / `tensor` are
those FSDP does for any layer. Gradients follow by autodiff (the all-gather and the reduce-scatter are
each other's transpose); the weights' gradients are summed over the axes they are replicated on.

When the rules do not split the batch over `expert`, the tokens are already whole on every device of
an expert group: no gather, and `psum` instead of `psum_scatter`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float

from sdft_jax.models import moe as moe_lib
from sdft_jax.models.sharding import (
    DEFAULT_RULES,
    LogicalRules,
    active_mesh,
    logical_to_spec,
)

EXPERT_AXIS = "expert"


def expert_axis_size(mesh: Mesh) -> int:
    """The size of the mesh's `expert` axis (1 when it has none)."""
    return mesh.shape.get(EXPERT_AXIS, 1)


def token_axes(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the rules split the batch over: the tokens' axes."""
    spec = logical_to_spec(("batch",), None, mesh, rules)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def sharded_experts(x: Float[Array, "T D"], routing: moe_lib.Routing, experts: moe_lib.Experts, lora_scale: float,
                    *, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Float[Array, "T D"]:
    """`moe.grouped_experts` with the experts split over the `expert` axis of `mesh` (see the module
    docstring); the tokens stay split over the batch axes of `rules`."""
    n = expert_axis_size(mesh)
    num_experts = experts.gate.shape[0]
    if num_experts % n:
        raise ValueError(f"expert parallelism: {num_experts} experts do not split over mesh axis "
                         f"{EXPERT_AXIS!r} of size {n}")
    axes = token_axes(mesh, rules)
    T = x.shape[0]
    pad = -T % math.prod(mesh.shape[a] for a in axes)  # rows that do not split evenly: padded, weight 0
    ids, weights = routing.expert_ids, routing.weights
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        ids = jnp.pad(ids, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    gather = EXPERT_AXIS in axes
    rows = PartitionSpec(axes or None, None)
    per_expert = jax.tree.map(lambda a: PartitionSpec(EXPERT_AXIS, *(None,) * (a.ndim - 1)), experts)

    def body(x, ids, weights, experts):
        first = jax.lax.axis_index(EXPERT_AXIS) * experts.gate.shape[0]
        if gather:
            x, ids, weights = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True) for a in (x, ids, weights))
        out = moe_lib.local_experts(x, ids, weights, experts, first, lora_scale)
        if gather:
            return jax.lax.psum_scatter(out, EXPERT_AXIS, scatter_dimension=0, tiled=True)
        return jax.lax.psum(out, EXPERT_AXIS)

    # check_vma=False: the CPU grouped matmul's loops start their carries from zeros that vary over no
    # mesh axis, which the varying-axes check refuses. The specs above are exact, and the tests compare
    # values and gradients with the single-device path.
    out = jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, per_expert), out_specs=rows,
                        check_vma=False)(
        x, ids, weights, experts)
    return out[:T] if pad else out


def expert_parallel_experts(x: Float[Array, "T D"], routing: moe_lib.Routing, experts: moe_lib.Experts,
                            lora_scale: float = 1.0) -> Float[Array, "T D"]:
    """A `moe.ExpertsFn`: `sharded_experts` over the mesh of the enclosing `sharding.activation_sharding`
    block (which must be there, with an `expert` axis)."""
    context = active_mesh()
    if context is None or expert_axis_size(context[0]) == 1:
        raise ValueError("expert_parallel_experts needs an activation_sharding mesh with an `expert` axis > 1")
    mesh, rules = context
    return sharded_experts(x, routing, experts, lora_scale, mesh=mesh, rules=rules)


def is_active() -> bool:
    """Whether the enclosing `activation_sharding` mesh splits the experts (its `expert` axis > 1)."""
    context = active_mesh()
    return context is not None and expert_axis_size(context[0]) > 1
