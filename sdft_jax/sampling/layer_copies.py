"""Rollout weights as one copy per layer, read by an unrolled decode step: the CPU default.

Inside the model's layer scan, XLA:CPU copies every layer's weights out of the stacked arrays at every
decode step, and every layer's keys and values out of the stacked cache, transposed. `LayerCopies`
instead holds each layer's weights as its own arrays (`split_layers` of the stacked ones, cast and laid
out like `StackedWeights`), and its step runs the model's `decoder_layer` once per layer, each on its
own weights and its own cache buffers (a `LayerKVCache`): it reads both where they lie. The price: a
second copy of the layer weights while they are kept, and a compile that grows with depth. With the
cache and the copies kept between calls (`Sampler`), it decodes faster than the scan on CPU at every
batch size measured (docs/benchmarks.md); on TPU/GPU, where XLA reads slices in place, the scan stays.

Unrolled, the RoPE tables of positions `0 .. max_len - 1` (the cache's slots; a row's positions never
exceed its slots) are made outside the decode loop, and each step looks its positions up: made in the
step, XLA:CPU fuses the sines and cosines into every layer's consumers and evaluates them per element
and head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from sdft_jax.models import attention
from sdft_jax.models.attention import KVCache, LayerKVCache
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.decoder import Layout, decoder_layer, split_layers
from sdft_jax.models.sharding import constrain, logical_sharding
from sdft_jax.models.transformer import Transformer
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.sampling.rollout_weights import (DecodeStep, RolloutSpec, RolloutWeights, computing_in, rollout_dtype,
                                               rollout_state, sharding_key)

LayerWeights = tuple[dict[str, Array], ...]  # one dict of arrays per layer, as `decoder_layer` takes them

# A `LayerKVCache` buffer's merged (row, KV head) axis is split over the batch axes only: a split
# over KV heads as well would not follow the heads (rows are its major part), so it stays whole.
LAYER_K_AXES = ("batch", "head_dim", "length")
LAYER_V_AXES = ("batch", "length", "head_dim")


@pytree_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerCopies(RolloutWeights):
    """`RolloutWeights` whose decoder layers are read from `layers`, one dict of arrays per layer.

    `state` holds the rest of the model (embedding, final norm, LM head) cast and laid out; its stacked
    layer arrays are the source model's own, passed through and never read by the decode loop (jit
    leaves them out of the program).
    """

    layers: LayerWeights

    cache_type = LayerKVCache
    writes_into = True

    @classmethod
    def make(cls, model: Transformer, spec: RolloutSpec, into: RolloutWeights | None = None) -> LayerCopies:
        """Makes them; with `into` (copies made earlier that `fits` this model), the new copies are
        written into its memory (donated: freshly mapped memory of that size page-faults on every page
        at first touch)."""
        graphdef, layers_state, rest = nnx.split(computing_in(model, spec.dtype), nnx.PathContains("layers"), ...)
        graphdef, state = nnx.split(nnx.merge(graphdef, layers_state, rollout_state(rest, spec)))
        stack = model.layers
        buffers = into.layers if isinstance(into, LayerCopies) and into.fits(model, spec) else None
        copies = copy_layers(stack.weights(), buffers, cfg=model.cfg, layout=stack.layout,
                             dtypes=tuple((n, rollout_dtype(w, spec)) for n, w in stack.weights().items()),
                             shardings=copy_shardings(model, spec))
        return cls(graphdef=graphdef, state=state, layers=copies)

    def fits(self, model: Transformer, spec: RolloutSpec) -> bool:
        """Whether `make(model, spec)` would make copies of these copies' names, shapes, dtypes and layouts."""
        stacked = model.layers.weights()
        wanted = jax.eval_shape(lambda: split_layers(model.cfg, model.layers.layout, stacked))
        if jax.tree.structure(wanted) != jax.tree.structure(self.layers):
            return False
        shardings = dict(copy_shardings(model, spec) or ())
        for copy, want in zip(self.layers, wanted, strict=True):
            for name, w in want.items():
                c = copy[name]
                target = shardings[name] if name in shardings else without_layers_axis(stacked[name].sharding)
                if (c.shape, c.dtype) != (w.shape, rollout_dtype(w, spec)) or (
                        sharding_key(c.sharding) != sharding_key(target)):
                    return False
        return True

    def decode_step(self, model: Transformer, max_len: int) -> DecodeStep:
        """Each step runs `decoder_layer` once per layer, on `layers` and the `LayerKVCache`'s buffers."""
        layer = functools.partial(decoder_layer, cfg=model.cfg, lora=model.layers.lora, dtype=model.dtype)
        kinds = model.cfg.layer_kinds
        cos, sin = model.rope_tables(jnp.arange(max_len)[None])  # [1, max_len, hd/2]
        per_layer = self.layers

        def step(tokens: Int[Array, "B T"], positions: Int[Array, "B T"], mask: Bool[Array, "B T"],
                 cache: LayerKVCache) -> tuple[Float[Array, "B T D"], LayerKVCache]:
            # Transformer.__call__'s cache path, with the layer scan written out.
            x = model.embed_tokens(tokens)
            cache, visible = cache.reserve(mask)
            ks, vs = list(cache.k), list(cache.v)
            linear = list(cache.linear or ())
            rope = (cos[0][positions], sin[0][positions])  # [B, T, hd/2] each
            seen = {"attention": 0, "deltanet": 0}  # each token mixer's layers so far: their buffers' index
            for weights, kind in zip(per_layer, kinds, strict=True):
                i = seen[kind.token_mixer]
                seen[kind.token_mixer] += 1
                if kind.token_mixer == "attention":
                    mixer_cache = functools.partial(attention.attend_layer, k_cache=ks[i], v_cache=vs[i],
                                                    slot=cache.index)
                else:
                    mixer_cache = linear[i]
                x, new, _ = layer(x, weights, rope, visible, mixer_cache, kind=kind, token_mask=mask)
                if kind.token_mixer == "attention":
                    ks[i], vs[i] = new
                else:
                    linear[i] = jax.tree.map(lambda n, old: n.astype(old.dtype), new, linear[i])
            hidden = model.normalize(x)
            return hidden, cache.commit(tuple(ks), tuple(vs), count=tokens.shape[1],
                                        linear=tuple(linear) if cache.linear is not None else None)

        return step

    def empty_cache(self, model: Transformer, batch: int, length: int) -> LayerKVCache:
        return LayerKVCache.from_stacked(KVCache.zeros(model.cfg, batch, length, model.dtype))

    def pin_cache(self, cache: LayerKVCache) -> LayerKVCache:
        """The cache pinned to its layout under `activation_sharding`: buffers as `LAYER_K_AXES` /
        `LAYER_V_AXES`, the slot bookkeeping over the batch."""
        return dataclasses.replace(cache, k=tuple(constrain(k, LAYER_K_AXES) for k in cache.k),
                                   v=tuple(constrain(v, LAYER_V_AXES) for v in cache.v),
                                   valid=constrain(cache.valid, ("batch", "length")), index=constrain(cache.index, ()))


def copy_shardings(model: Transformer, spec: RolloutSpec) -> tuple[tuple[str, NamedSharding], ...] | None:
    """Each stacked array's per-layer copy's sharding by the rollout rules (its logical axes but `layers`);
    None without a mesh (the copies then stay where the stacked arrays are)."""
    if spec.mesh is None:
        return None
    out = []
    for name in model.layers.weights():
        var = getattr(model.layers, name)
        axes, shape = tuple(var.axes)[1:], tuple(var.shape)[1:]
        out.append((name, logical_sharding(axes, shape, spec.mesh, spec.rules)))
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "dtypes", "shardings"), donate_argnums=(1,))
def copy_layers(stacked: dict[str, Array], into: LayerWeights | None, *, cfg: ModelConfig, layout: Layout,
                dtypes: tuple[tuple[str, jnp.dtype], ...],
                shardings: tuple[tuple[str, NamedSharding], ...] | None) -> LayerWeights:
    """The stacked weights split per layer, cast (`dtypes` by name) and laid out (`shardings` by name; None:
    where they are), written into `into` (same shapes, donated) when given."""
    dtype, placed = dict(dtypes), dict(shardings or ())
    per_layer = tuple({n: w.astype(dtype[n]) for n, w in layer.items()}
                      for layer in split_layers(cfg, layout, stacked))
    if into is not None:
        per_layer = jax.tree.map(lambda buf, w: jax.lax.dynamic_update_slice(buf, w, (0,) * w.ndim), into, per_layer)
    return tuple({n: jax.lax.with_sharding_constraint(w, placed[n]) if n in placed else w for n, w in layer.items()}
                 for layer in per_layer)


def without_layers_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer's slice of a stacked `[L, ...]` array."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding
