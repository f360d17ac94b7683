"""The weights a rollout reads: the student's weights cast to the rollout dtype and laid out for sampling.

Training keeps fp32 masters split over `fsdp`, the layout that suits the step. Sampling straight from
them would gather every weight again for every decoded token and read twice the bytes bf16 needs. So,
once per train step, one jitted function (`RolloutWeights.make`, which `Sampler.rollout_weights` calls)
turns the model into the weights the sampler reads:
- cast to the rollout dtype (`RolloutWeightsConfig.dtype`: bfloat16 on accelerators and float32 on CPU
  by default). The rollout also computes in it: activations and KV cache (logits stay fp32);
- laid out by the rollout sharding rules (`ROLLOUT_RULES`: replicated over `data` / `fsdp`, split over
  `tensor` and `expert`, each logical axis overridable), which the sampler also traces under.
The trainer then drops them after the rollout (`Sampler.clear_cache`), before the train step. A weight
that needs neither a cast nor a move is passed through as the same array, with no copy.

An implementation of `RolloutWeights` also decides how the decode loop reads the layers (`decode_step`,
and the cache layout it decodes on). `StackedWeights` here is the plain path: the model's own layer scan
over a stacked `KVCache`. `layer_copies.LayerCopies` is the CPU default: one dict of arrays per layer and
an unrolled step (see that module). The sampler's signatures are the same for both.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Bool, Float, Int

from sdft_jax.models.attention import KVCache, LayerKVCache
from sdft_jax.models.sharding import MESH_AXES, LogicalRules, constrain, state_shardings
from sdft_jax.models.transformer import Transformer
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.validation import check_literals

# The layout for sampling: the batch split like the train step's, every weight whole over the batch
# axes (no gather per decoded token), split over `tensor` (heads, MLP, vocab) and `expert`.
ROLLOUT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp", "expert")),
    ("layers", None),
    ("embed", None),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("lora_rank", None),
    ("length", None),
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Implementation = Literal["stacked", "copies"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutWeightsConfig:
    """What the rollout weights are.

    `dtype`: "auto" is bfloat16 on accelerators and float32 on CPU (where XLA:CPU computes bf16 dots no
    faster than fp32 ones). `sharding`: overrides of `ROLLOUT_RULES`, each `"logical=mesh_axis"` (several
    mesh axes joined by `+`; nothing after `=` for replicated), e.g. `"embed=fsdp"` to keep FSDP's split.
    `layers`: how the decode loop reads the layers, "stacked" (the model's scan) or "copies" (a copy per
    layer, unrolled); "auto" is copies on CPU and stacked elsewhere.
    """

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    sharding: tuple[str, ...] = ()
    layers: Literal["auto", "stacked", "copies"] = "auto"

    def __post_init__(self):
        check_literals(self)
        self.rules()

    def rules(self) -> LogicalRules:
        """`ROLLOUT_RULES` with `sharding`'s overrides applied (ValueError naming a bad entry)."""
        table = dict(ROLLOUT_RULES)
        if not isinstance(self.sharding, tuple):
            raise ValueError(f"RolloutWeightsConfig.sharding must be a tuple of 'logical=mesh_axis' strings, "
                             f"got {self.sharding!r}")
        for item in self.sharding:
            name, sep, axes = item.partition("=") if isinstance(item, str) else ("", "", "")
            mesh_axes = tuple(a for a in axes.split("+") if a)
            if not sep or name not in table or any(a not in MESH_AXES for a in mesh_axes):
                raise ValueError(f"RolloutWeightsConfig.sharding: {item!r} is not 'logical=mesh_axis' with a logical "
                                 f"axis of {sorted(table)} and mesh axes of {list(MESH_AXES)} joined by '+' "
                                 "(nothing after '=' for replicated)")
            table[name] = None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
        return tuple(table.items())

    def spec(self, mesh: Mesh | None = None, platform: str | None = None) -> RolloutSpec:
        """These settings resolved for `platform` ("cpu", "gpu", "tpu"; default: the mesh's devices', else
        JAX's default backend)."""
        if platform is None:
            platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        cpu = platform == "cpu"
        dtype = self.dtype if self.dtype != "auto" else "float32" if cpu else "bfloat16"
        layers = self.layers if self.layers != "auto" else "copies" if cpu else "stacked"
        return RolloutSpec(dtype=DTYPES[dtype], mesh=mesh, rules=self.rules(), layers=layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    """`RolloutWeightsConfig` resolved for a platform: the dtype, the mesh (None: weights stay on their
    devices) and rules of the layout, and the implementation."""

    dtype: type
    mesh: Mesh | None
    rules: LogicalRules
    layers: Implementation


DecodeStep = Callable[[Int[Array, "B T"], Int[Array, "B T"], Bool[Array, "B T"], KVCache | LayerKVCache],
                      tuple[Float[Array, "B T D"], KVCache | LayerKVCache]]


def decode_step(model: Transformer) -> DecodeStep:
    """The model's cached forward on a stacked `KVCache` (its layer scan),
    `(tokens [B, T], positions, mask, cache) -> (hidden [B, T, D], cache)`."""
    return model


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutWeights(abc.ABC):
    """The weights one rollout reads, and how its decode loop reads them (a pytree: pass it to jitted code).

    `graphdef` and `state` are the model the sampler runs, computing in the rollout dtype. An
    implementation says how its weights are made from a model (`make`), which step the decode loop takes
    (`decode_step`), and which cache it decodes on (`empty_cache`, `pin_cache`).
    """

    graphdef: nnx.GraphDef
    state: nnx.State

    cache_type: ClassVar[type] = KVCache
    writes_into: ClassVar[bool] = False  # whether `make` can write into earlier weights' memory (`into`)

    def model(self) -> Transformer:
        """The model these weights run (merged: no copy)."""
        return nnx.merge(self.graphdef, self.state)

    @classmethod
    @abc.abstractmethod
    def make(cls, model: Transformer, spec: RolloutSpec, into: RolloutWeights | None = None) -> RolloutWeights:
        """`model`'s weights for sampling as `spec` says. `into`: weights made earlier by this class whose
        memory the new ones may take (donated), where the implementation can."""

    @abc.abstractmethod
    def decode_step(self, model: Transformer, max_len: int) -> DecodeStep:
        """The decode loop's step on these weights (`model` is `self.model()`, traced), for a cache of
        `max_len` slots."""

    def empty_cache(self, model: Transformer, batch: int, length: int) -> KVCache | LayerKVCache:
        """A cache of `length` slots for `batch` rows, of the layout `decode_step` decodes on."""
        return KVCache.zeros(model.cfg, batch, length, model.dtype)

    def pin_cache(self, cache: KVCache | LayerKVCache) -> KVCache | LayerKVCache:
        """The cache pinned to its layout under `activation_sharding`: keys and values split over the
        batch axes and KV heads, the slot bookkeeping over the batch, a hybrid model's Gated DeltaNet
        states as they come."""
        axes = ("layers", "batch", "length", "kv_heads", "head_dim")
        return dataclasses.replace(cache, k=constrain(cache.k, axes), v=constrain(cache.v, axes),
                                   valid=constrain(cache.valid, ("batch", "length")), index=constrain(cache.index, ()))


@pytree_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class StackedWeights(RolloutWeights):
    """The plain path: the model's stacked weights cast and laid out, decoded by its own layer scan."""

    @classmethod
    def make(cls, model: Transformer, spec: RolloutSpec, into: RolloutWeights | None = None) -> StackedWeights:
        """Makes them (new arrays for the weights that change; `into` is not used). Works on an abstract
        model too (`nnx.eval_shape`, `jax.ShapeDtypeStruct` leaves with shardings): abstract weights."""
        graphdef, state = nnx.split(computing_in(model, spec.dtype))
        return cls(graphdef=graphdef, state=rollout_state(state, spec))

    def decode_step(self, model: Transformer, max_len: int) -> DecodeStep:
        return decode_step(model)


def computing_in(model: Transformer, dtype: type) -> Transformer:
    """`model` again (its modules anew, the very same arrays), with compute dtype `dtype`."""
    graphdef, *states = nnx.split(model, ...)
    again = nnx.merge(graphdef, *states)
    again.dtype = dtype
    return again


def rollout_dtype(x: jax.Array | jax.ShapeDtypeStruct, spec: RolloutSpec) -> jnp.dtype:
    """The dtype of `x` in the rollout weights: `spec.dtype` for floating point, else its own."""
    return jnp.dtype(spec.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype


def rollout_state(state: nnx.State, spec: RolloutSpec) -> nnx.State:
    """`state` (nnx Variables with logical `axes`) as the rollout reads it: floating leaves in `spec.dtype`,
    each leaf laid out by `spec.rules` on `spec.mesh` (where it is, without a mesh). Leaves already so
    are passed through; the others go through one jitted cast. Abstract leaves give abstract ones."""
    leaves, treedef = jax.tree.flatten(state)
    targets = ([None] * len(leaves) if spec.mesh is None
               else jax.tree.leaves(state_shardings(state, spec.mesh, spec.rules)))
    dtypes = [rollout_dtype(x, spec) for x in leaves]
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        out = [jax.ShapeDtypeStruct(x.shape, d, sharding=t or x.sharding) for x, d, t in zip(leaves, dtypes, targets)]
        return jax.tree.unflatten(treedef, out)
    changed = [i for i, (x, d, t) in enumerate(zip(leaves, dtypes, targets, strict=True))
               if x.dtype != d or (t is not None and not x.sharding.is_equivalent_to(t, x.ndim))]
    if changed:
        made = cast_and_place(tuple(leaves[i] for i in changed), dtypes=tuple(dtypes[i] for i in changed),
                              shardings=tuple(targets[i] for i in changed))
        for i, x in zip(changed, made, strict=True):
            leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnames=("dtypes", "shardings"))
def cast_and_place(arrays: tuple[Array, ...], *, dtypes: tuple[jnp.dtype, ...],
                   shardings: Sequence[NamedSharding | None]) -> tuple[Array, ...]:
    """Each array in its dtype and sharding (None: where it is): the jitted function that makes rollout
    weights."""
    return tuple(x.astype(d) if s is None else jax.lax.with_sharding_constraint(x.astype(d), s)
                 for x, d, s in zip(arrays, dtypes, shardings, strict=True))


def sharding_key(sharding: jax.sharding.Sharding) -> Hashable:
    """A hashable stand-in equal for equivalent shardings (`P('x', None)` and `P('x')` are the same layout)."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        while spec and spec[-1] is None:
            spec = spec[:-1]
        return sharding.mesh, spec, sharding.memory_kind
    return sharding
