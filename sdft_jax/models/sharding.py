"""Logical axis names -> mesh axes: the sharding rule table and mesh construction.

Every parameter carries logical axis names (`embed`, `vocab`, `q_heads`, ...) as Variable metadata
`axes`. A rule table maps each logical name to mesh axes; changing the mesh sizes is all it takes to
go from one CPU to a pod. The default rules are FSDP over `fsdp` (the `embed` dimension of every
matrix), expert parallelism over `expert` (the experts of a MoE layer, and their per-expert LoRA
adapters), and tensor parallelism over `tensor` (heads, MLP and vocab dimensions); the batch is split
over `data` x `fsdp` x `expert` (outside the MoE layers the expert axis is one more data-parallel
axis; `expert_parallel.py` moves the tokens to their experts' devices and back).

The mesh axes are ordered from the outermost to the innermost (`MESH_AXES`), so `make_mesh` puts the
axes that communicate most (`tensor`, then `expert`'s all-to-all-like traffic) on neighbouring devices.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp", "expert")),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("lora_rank", None),
    ("length", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over axes `data`, `fsdp`, `expert`, `tensor` (absent = 1); one size may be -1 (= all remaining
    devices)."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)} (axes are {MESH_AXES})")
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(shape)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} ({dict(shape)})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`.

    A mesh axis is used at most once per array, and a dimension that the mesh axes do not divide is
    left replicated (e.g. SmolLM2's 3 KV heads on a tensor axis of 2) rather than failing.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        candidates = (target,) if isinstance(target, str) else tuple(target)
        chosen = tuple(a for a in candidates if a not in used and mesh.shape.get(a, 1) > 1)
        size = math.prod(mesh.shape[a] for a in chosen) if chosen else 1
        if not chosen or (shape is not None and shape[i] % size):
            spec.append(None)
            continue
        used.update(chosen)
        spec.append(chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def logical_sharding(
    axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """A pytree of NamedShardings matching an (abstract or concrete) NNX state, from each Variable's `axes`."""

    def one(var):
        axes = getattr(var, "axes", None) or (None,) * len(var.shape)
        if len(axes) != len(var.shape):
            raise ValueError(f"axes {axes} do not match shape {var.shape}")
        return var.replace(logical_sharding(axes, var.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# Activation sharding: set while tracing under a mesh, so the model can pin its batch dimension.
_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "sdft_jax_activation_sharding", default=None
)


def active_mesh() -> tuple[Mesh, LogicalRules] | None:
    """The mesh and rules of the enclosing `activation_sharding` block, None outside one."""
    return _ACTIVATION_CONTEXT.get()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Within this block, `constrain` pins activations to the mesh (use around tracing/jit calls)."""
    token = _ACTIVATION_CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def batch_shards(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, rows: int | None = None) -> int:
    """Into how many parts the `batch` rule splits a batch's rows on `mesh`; given `rows`, 1 when the rule's
    mesh axes do not divide them (the rows are then replicated)."""
    axes = logical_to_spec(("batch",), None if rows is None else (rows,), mesh, rules)[0]
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def active_batch_shards(rows: int | None = None) -> int:
    """`batch_shards` of the enclosing `activation_sharding` block's mesh and rules; 1 outside one."""
    ctx = _ACTIVATION_CONTEXT.get()
    return 1 if ctx is None else batch_shards(*ctx, rows=rows)


def split_rows(x: jax.Array, parts: int) -> jax.Array:
    """`[B, ...]` -> `[parts, B / parts, ...]`, the leading axis split over the mesh as the batch's rows are
    (within `activation_sharding`; the other dimensions left to the compiler).

    With `parts = active_batch_shards(B)` each device holds one part: a function `jax.vmap`ped over the parts
    runs on each device's own rows, and a sum over rows it returns stays a per-device partial sum, `[parts,
    ...]`, until the caller sums the leading axis. Accumulated in a loop that way, the partial sums cost one
    reduction after the loop where XLA's partitioner (XLA:CPU's and XLA:GPU's) would all-reduce in every
    iteration (docs/benchmarks.md, "The head's gradient reduced once")."""
    if x.shape[0] % parts:
        raise ValueError(f"split_rows: {x.shape[0]} rows do not split into {parts} parts")
    x = x.reshape(parts, x.shape[0] // parts, *x.shape[1:])
    return pin_rows(x)


def pin_rows(x: jax.Array) -> jax.Array:
    """`x` with its leading axis split over the mesh as a batch's rows are and the other dimensions left to
    the compiler (`with_sharding_constraint`; a no-op outside `activation_sharding`, or when the leading
    axis does not split)."""
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    rows = logical_to_spec(("batch",), x.shape[:1], mesh, rules)[0]
    if rows is None:
        return x
    spec = PartitionSpec(rows, *[PartitionSpec.UNCONSTRAINED] * (x.ndim - 1))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def target_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") the program being traced is for: that of the enclosing
    `activation_sharding` mesh's devices, else JAX's default backend. The two differ only when a program
    is compiled ahead of time for devices this process does not run (`bench plan --compiler tpu`), where
    the platform-specific pieces (the grouped matmul, the attention kernel) must be the target's."""
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is not None:
        return ctx[0].devices.flat[0].platform
    return jax.default_backend()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes; a no-op outside `activation_sharding`."""
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, logical_sharding(axes, x.shape, mesh, rules))
