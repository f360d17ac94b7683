"""The decoder stack, built from layer kinds: a token mixer and a channel mixer per layer.

A layer is pre-norm: `h += token_mixer(norm(h))`, then `h += channel_mixer(norm(h))`. Which mixers a
layer has is its `LayerKind` (`ModelConfig.layer_kinds`); what each mixer is sits in the tables
`TOKEN_MIXERS` and `CHANNEL_MIXERS` (its per-layer weights and its function). Adding a mixer is a new
module and a row in one table.

Weights are grouped in parts: `norms` (every layer) and one part per mixer. Each weight is stacked
over the layers that have its part, in layer order (`[L_part, ...]`, logical axis `layers`), so a
dense model's weights are `[num_layers, ...]` and a MoE model's experts are stacked over its sparse
layers only.

The forward is a few `lax.scan`s, not a loop over layers: `plan_segments` cuts the layers into
segments, each a period of layer kinds repeated (all-sparse Qwen3-MoE: one segment of period 1; one
dense layer first: a segment of 1, then a scan over the rest). Each scan's body runs one period, so
compile time depends on the periods, not on depth.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from sdft_jax.models import attention as attn
from sdft_jax.models import expert_parallel
from sdft_jax.models import fused_attention
from sdft_jax.models import gated_deltanet as deltanet_lib
from sdft_jax.models import lora as lora_lib
from sdft_jax.models import mlp as mlp_lib
from sdft_jax.models import moe as moe_lib
from sdft_jax.models import self_attention
from sdft_jax.models import summed_scan
from sdft_jax.models.config import LayerKind, ModelConfig
from sdft_jax.models.norm import rms_norm
from sdft_jax.models.sharding import constrain
from sdft_jax.pytrees import pytree_dataclass

RematPolicy = Literal["none", "full", "dots"]
Shapes = dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]
NORMS = "norms"  # the part every layer has: its two pre-norms
_PLAIN_GAINS = frozenset({"linear_norm"})  # Gated DeltaNet's gated norm: its weight is the gain, always


@dataclasses.dataclass(frozen=True)
class TokenMixer:
    """A token mixer: its per-layer weights, and `apply(x, w, rope, visible, cache, *, cfg, lora,
    query_block, attention, token_mask) -> (out, new cache contents or None)` (see
    `self_attention.self_attention`, `gated_deltanet.gated_deltanet`)."""

    param_shapes: Callable[[ModelConfig], Shapes]
    apply: Callable[..., tuple[Array, tuple[Array, Array] | None]]


@dataclasses.dataclass(frozen=True)
class ChannelMixer:
    """A channel mixer: its per-layer weights, and `apply(x, w, *, cfg, lora, token_mask) -> (out,
    router statistics or None)`."""

    param_shapes: Callable[[ModelConfig], Shapes]
    apply: Callable[..., tuple[Array, moe_lib.RouterStats | None]]


def _attention(x, w, rope, visible, kv, *, cfg, lora, query_block, attention, token_mask):
    del token_mask  # `visible` already hides padding
    return self_attention.self_attention(x, w, rope, visible, kv, cfg=cfg, lora=lora, query_block=query_block,
                                         attention=attention)


def _deltanet(x, w, rope, visible, state, *, cfg, lora, query_block, attention, token_mask):
    del rope, visible, query_block, attention  # no positions: the recurrence orders the tokens; padding by `token_mask`
    return deltanet_lib.gated_deltanet(x, w, cfg.deltanet, mask=token_mask, state=state, lora=lora)


def _dense_mlp(x, w, *, cfg, lora, token_mask):
    del cfg, token_mask
    return mlp_lib.mlp(x, w, lora), None


def _sparse_moe(x, w, *, cfg, lora, token_mask):
    # Under a mesh that splits the experts, each device runs its own (expert parallelism).
    experts_fn = expert_parallel.expert_parallel_experts if expert_parallel.is_active() else moe_lib.grouped_experts
    out = moe_lib.sparse_moe(x, w, cfg.moe, token_mask=token_mask, lora_scale=lora.scale if lora else 1.0,
                             experts_fn=experts_fn)
    return out.hidden, out.stats


TOKEN_MIXERS: dict[str, TokenMixer] = {
    "attention": TokenMixer(self_attention.param_shapes, _attention),
    "deltanet": TokenMixer(lambda cfg: deltanet_lib.param_shapes(cfg.hidden_size, cfg.deltanet), _deltanet),
}
CHANNEL_MIXERS: dict[str, ChannelMixer] = {
    "mlp": ChannelMixer(mlp_lib.param_shapes, _dense_mlp),
    "moe": ChannelMixer(lambda cfg: moe_lib.param_shapes(cfg.hidden_size, cfg.moe), _sparse_moe),
}


def _norm_shapes(cfg: ModelConfig) -> Shapes:
    return {"input_layernorm": ((cfg.hidden_size,), ("embed",)),
            "post_attention_layernorm": ((cfg.hidden_size,), ("embed",))}


def parts_of(kind: LayerKind) -> tuple[str, str, str]:
    """The weight parts a layer of this kind has."""
    return NORMS, kind.token_mixer, kind.channel_mixer


def _layers_with(part: str, kinds: tuple[LayerKind, ...]) -> int:
    """How many of the layers `kinds` have the weight part `part`."""
    return sum(part in parts_of(k) for k in kinds)


def part_shapes(cfg: ModelConfig) -> dict[str, Shapes]:
    """Part -> its per-layer weight name -> (shape without the layers axis, logical axes), for the
    parts this model's layers have. Weight names are unique across parts."""
    out: dict[str, Shapes] = {NORMS: _norm_shapes(cfg)}
    for kind in cfg.layer_kinds:
        out.setdefault(kind.token_mixer, TOKEN_MIXERS[kind.token_mixer].param_shapes(cfg))
        out.setdefault(kind.channel_mixer, CHANNEL_MIXERS[kind.channel_mixer].param_shapes(cfg))
    seen: dict[str, str] = {}
    for part, shapes in out.items():
        for name in shapes:
            if name in seen:
                raise ValueError(f"weight {name!r} is in two parts ({seen[name]}, {part})")
            seen[name] = part
    return out


def part_layers(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Part -> the layers that have it, in order: the layers its weights are stacked over."""
    out: dict[str, list[int]] = {}
    for i, kind in enumerate(cfg.layer_kinds):
        for part in parts_of(kind):
            out.setdefault(part, []).append(i)
    return {part: tuple(layers) for part, layers in out.items()}


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers `start .. start + len(period) * repeats - 1`: `period` (layer kinds) repeated `repeats` times."""

    start: int
    period: tuple[LayerKind, ...]
    repeats: int

    @property
    def stop(self) -> int:
        return self.start + len(self.period) * self.repeats


def plan_segments(kinds: tuple[LayerKind, ...]) -> tuple[Segment, ...]:
    """Cuts the layers into segments of a repeated period, with as few layer bodies to compile in all
    (the sum of the periods) as possible, then as few segments."""
    n = len(kinds)
    best: list[tuple[int, int, tuple[int, int]] | None] = [(0, 0, (0, 0))] + [None] * n
    for stop in range(1, n + 1):
        for start in range(stop):
            length = stop - start
            period = next(p for p in range(1, length + 1) if length % p == 0 and all(
                kinds[start + t] == kinds[start + t % p] for t in range(length)))
            cost = (best[start][0] + period, best[start][1] + 1, (start, period))
            if best[stop] is None or cost[:2] < best[stop][:2]:
                best[stop] = cost
    segments = []
    stop = n
    while stop:
        start, period = best[stop][2]
        segments.append(Segment(start, kinds[start:start + period], (stop - start) // period))
        stop = start
    return tuple(reversed(segments))


Layout = tuple[tuple[str, tuple[str, ...]], ...]  # part -> names of its stacked arrays: `DecoderStack.layout`


def split_layers(cfg: ModelConfig, layout: Layout, stacked: Mapping[str, Array]) -> tuple[dict[str, Array], ...]:
    """Each layer's slices of the stacked arrays (`DecoderStack.weights`): one dict per layer, with the
    weights (and adapters) of its parts, as `decoder_layer` takes them."""
    layers = part_layers(cfg)
    names = dict(layout)
    out = []
    for i, kind in enumerate(cfg.layer_kinds):
        weights = {}
        for part in parts_of(kind):
            index = layers[part].index(i)
            weights.update({name: stacked[name][index] for name in names[part]})
        out.append(weights)
    return tuple(out)


class DecoderStack(nnx.Module):
    """All decoder layers; each weight stacked over the layers that have its part (`part_layers`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        lora: lora_lib.LoraConfig | None = None,
    ):
        self.cfg = cfg
        self.lora = lora
        shapes_by_part = part_shapes(cfg)
        counts = {part: len(layers) for part, layers in part_layers(cfg).items()}
        names: dict[str, list[str]] = {}
        for part, shapes in shapes_by_part.items():
            L = counts[part]
            names[part] = []
            for name, (shape, axes) in shapes.items():
                if name.endswith("norm"):  # gain 1: weight 1, or 0 for zero-centered norms (1 + w)
                    zero = cfg.zero_centered_norms and name not in _PLAIN_GAINS
                    value = jnp.full((L, *shape), 0.0 if zero else 1.0, param_dtype)
                elif name.endswith("_bias"):
                    value = jnp.zeros((L, *shape), param_dtype)
                else:
                    value = 0.02 * jax.random.normal(rngs.params(), (L, *shape), param_dtype)
                setattr(self, name, nnx.Param(value, axes=("layers", *axes)))
                names[part].append(name)
        self.adapted: tuple[str, ...] = ()
        if lora is not None:
            adapted = []
            for part, shapes in shapes_by_part.items():
                for name in [t for t in lora.targets if t in shapes]:
                    shape, axes = shapes[name]
                    a_shape, b_shape = lora_lib.adapter_shapes(name, shape, lora.rank)
                    n_a = len(a_shape) - 1  # A's axes before the rank: the weight's (expert and) input axes
                    L = counts[part]
                    setattr(self, f"{name}_lora_a", nnx.LoRAParam(
                        lora_lib.lora_a_init(rngs.params(), (L, *a_shape), lora_lib.PROJECTIONS[name], param_dtype),
                        axes=("layers", *axes[:n_a], "lora_rank")))
                    setattr(self, f"{name}_lora_b", nnx.LoRAParam(
                        jnp.zeros((L, *b_shape), param_dtype),
                        axes=("layers", *axes[:n_a - lora_lib.PROJECTIONS[name]], "lora_rank", *axes[n_a:])))
                    names[part] += [f"{name}_lora_a", f"{name}_lora_b"]
                    adapted.append(name)
            if not adapted:
                raise ValueError(f"LoRA targets {list(lora.targets)} name no projection of this "
                                 f"{cfg.architecture} model (it has {sorted(set(lora_lib.PROJECTIONS) & _all(shapes_by_part))})")
            self.adapted = tuple(adapted)
        self.layout: Layout = tuple((part, tuple(n)) for part, n in names.items())

    @property
    def names_by_part(self) -> dict[str, tuple[str, ...]]:
        """Part -> the names of its stacked arrays (weights, then adapters)."""
        return dict(self.layout)

    def weights(self) -> dict[str, Array]:
        """The stacked arrays (base weights and adapters) by name."""
        return {n: getattr(self, n)[...] for names in self.names_by_part.values() for n in names}

    def layer_copies(self) -> tuple[dict[str, Array], ...]:
        """Each layer's weights as its own arrays (`split_layers` of the stacked ones)."""
        return split_layers(self.cfg, self.layout, self.weights())

    def __call__(
        self,
        x: Float[Array, "B T D"],
        rope: attn.RopeTables,
        visible: attn.Visibility,
        cache: attn.KVCache | None,
        *,
        token_mask: Bool[Array, "B T"] | None = None,
        dtype,
        remat: RematPolicy,
        query_block: int,
        attention: fused_attention.Kernel = "plain",
        grad_sum: Mapping[str, Array] | None = None,
    ) -> tuple[Float[Array, "B T D"], CacheBuffers | None, moe_lib.RouterStats | None, dict[str, Array] | None]:
        """`decoder_layer` over every layer, one scan per segment (`plan_segments`). In cache mode
        (`cache` holds this call's slots, see `KVCache.reserve`) also returns the cache's new buffers
        (`CacheBuffers`: the attention layers' keys and values, the Gated DeltaNet layers' states); with
        MoE layers, their router statistics summed over layers (`token_mask` marks the tokens they count).

        `grad_sum` (uncached forward only): a running sum of gradients of some of the stacked arrays, by
        name, shaped like them. It is returned as it came, and in the backward the scans add those arrays'
        gradients into its cotangent in place (`summed_scan`), instead of giving them their own: the
        micro-batched step's gradient accumulation. The last element of the result is it (None without).

        `remat` rematerialises each layer in the backward of the uncached forward (training); a cached
        forward is inference and is never rematerialised. `attention` is the kernel of the uncached
        attention and of a cached prefill (`fused_attention.select`'s choice).
        """
        cfg = self.cfg
        stacked = self.weights()
        layers = part_layers(cfg)
        stats = None
        if cfg.moe is not None:
            E = cfg.moe.num_experts
            stats = moe_lib.RouterStats(assignments=jnp.zeros((E,), jnp.float32),
                                        prob_sum=jnp.zeros((E,), jnp.float32), tokens=jnp.zeros((), jnp.float32))
        buffers = None if cache is None else CacheBuffers(k=cache.k, v=cache.v, linear=cache.linear)
        if grad_sum is not None:
            if cache is not None:
                raise ValueError("DecoderStack: grad_sum is for the uncached (training) forward")
            unknown = sorted(set(grad_sum) - set(stacked))
            if unknown:
                raise ValueError(f"DecoderStack: grad_sum names {unknown}, which are not stacked arrays of the decoder")
            grad_sum = dict(grad_sum)
        for segment in plan_segments(cfg.layer_kinds):
            xs, where, rows = {}, [], {}
            for r, kind in enumerate(segment.period):
                where.append({})
                for part in parts_of(kind):
                    # None: the part's one layer in the period, its stack scanned as it is (a reshape to
                    # (repeats, 1, ...) costs XLA:CPU a copy of every stacked weight per forward).
                    single = _layers_with(part, segment.period) == 1
                    where[r][part] = None if single else _layers_with(part, segment.period[:r])
            for part, part_names in self.names_by_part.items():
                in_period = _layers_with(part, segment.period)
                if not in_period:
                    continue
                first = layers[part].index(next(i for i in range(segment.start, segment.stop)
                                                if part in parts_of(cfg.layer_kinds[i])))
                count = in_period * segment.repeats
                for name in part_names:
                    w = stacked[name]
                    w = w if count == w.shape[0] else jax.lax.slice_in_dim(w, first, first + count)
                    xs[name] = w if in_period == 1 else w.reshape(segment.repeats, in_period, *w.shape[1:])
                    rows[name] = summed_scan.Rows(first, None if in_period == 1 else in_period)
                if part in CACHED_MIXERS:
                    # Each of the period's `part` layers' index in the cache's stack of such layers.
                    index = first + jnp.arange(count)
                    xs[_cache_index(part)] = index if in_period == 1 else index.reshape(segment.repeats, in_period)
            if grad_sum is not None and any(name in grad_sum for name in xs):
                def step(carry, xs, consts, period=segment.period, where=where):
                    return self._period(period, where, *consts, None, dtype, remat, query_block, attention,
                                        carry, xs)[0]

                (x, buffers, stats), grad_sum = summed_scan.summed_scan(
                    step, (x, buffers, stats), xs, (rope, visible, token_mask), grad_sum,
                    {n: r for n, r in rows.items() if n in grad_sum})
                continue
            body = functools.partial(self._period, segment.period, where, rope, visible, token_mask,
                                     cache, dtype, remat, query_block, attention)
            (x, buffers, stats), _ = jax.lax.scan(body, (x, buffers, stats), xs)
        return x, buffers, stats, grad_sum

    def _period(self, period, where, rope, visible, token_mask, cache, dtype, remat, query_block, attention, carry,
                xs):
        """One scan step: the period's layers, each on its weights from `xs` (and its cache buffers)."""
        h, buffers, stats = carry
        layer = functools.partial(decoder_layer, cfg=self.cfg, lora=self.lora, dtype=dtype, query_block=query_block,
                                  attention=attention, token_mask=token_mask)
        for r, kind in enumerate(period):
            w = {name: _in_period(xs[name], where[r][part])
                 for part in parts_of(kind) for name in self.names_by_part[part]}
            mixer_cache = None
            if cache is not None:
                index = _in_period(xs[_cache_index(kind.token_mixer)], where[r][kind.token_mixer])
                mixer_cache = _mixer_cache(kind.token_mixer, buffers, index, cache.index, attention)
            step = functools.partial(layer, kind=kind)
            if remat != "none" and cache is None:
                policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                step = jax.checkpoint(step, policy=policy)
            h, new_cache, layer_stats = step(h, w, rope, visible, mixer_cache)
            if cache is not None:
                buffers = _stored(kind.token_mixer, buffers, new_cache, index)
            if layer_stats is not None:
                stats = jax.tree.map(jnp.add, stats, layer_stats)
        return (h, buffers, stats), None


def _in_period(x: Array, r: int | None) -> Array:
    """A scan step's slice for the period's `r`-th layer of a part (`x` itself when the part has one)."""
    return x if r is None else x[r]


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class CacheBuffers:
    """A cache's per-layer buffers, as the decoder carries them through its layers: the attention
    layers' keys and values (stacked over those layers), and the Gated DeltaNet layers' states
    (`DeltaNetState` with a leading axis over those layers; None without such layers)."""

    k: Float[Array, "La B S Hkv hd"]
    v: Float[Array, "La B S Hkv hd"]
    linear: deltanet_lib.DeltaNetState | None


CACHED_MIXERS = ("attention", "deltanet")  # the token mixers that keep per-layer state in a cache


def _cache_index(mixer: str) -> str:
    return f"__{mixer}_cache_index__"


def _mixer_cache(mixer: str, buffers: CacheBuffers, index, slot, kernel: fused_attention.Kernel):
    """What a token mixer of one layer gets in cache mode: attention a `CacheAttention` over its slice
    of the stacked keys and values (a prefill by `kernel`); Gated DeltaNet its layer's state."""
    if mixer == "attention":
        return functools.partial(attn.attend_stacked, k_all=buffers.k, v_all=buffers.v, layer=index, slot=slot,
                                 kernel=kernel)
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), buffers.linear)


def _stored(mixer: str, buffers: CacheBuffers, new, index) -> CacheBuffers:
    """`buffers` with one layer's new cache contents (what its token mixer returned)."""
    if mixer == "attention":
        k, v = new
        return dataclasses.replace(buffers, k=k, v=v)
    linear = jax.tree.map(lambda a, n: jax.lax.dynamic_update_index_in_dim(a, n.astype(a.dtype), index, 0),
                          buffers.linear, new)
    return dataclasses.replace(buffers, linear=linear)


def _all(shapes_by_part: Mapping[str, Shapes]) -> set[str]:
    return {name for shapes in shapes_by_part.values() for name in shapes}


def decoder_layer(
    h: Float[Array, "B T D"],
    weights: Mapping[str, Array],
    rope: attn.RopeTables,
    visible: attn.Visibility,
    kv: attn.CacheAttention | deltanet_lib.DeltaNetState | None,
    *,
    cfg: ModelConfig,
    kind: LayerKind,
    lora: lora_lib.LoraConfig | None,
    dtype,
    query_block: int = 0,
    attention: fused_attention.Kernel = "plain",
    token_mask: Bool[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T D"], tuple[Array, Array] | deltanet_lib.DeltaNetState | None,
           moe_lib.RouterStats | None]:
    """One pre-norm decoder layer of `kind` on one layer's `weights` (`DecoderStack.layer_copies`' dict):
    the token mixer, then the channel mixer, each added to the residual stream `h`. `rope` is the
    forward's `Transformer.rope_tables`, `visible` which keys each query sees.

    `kv` is None (no cache: attend among this call's tokens, in blocks of `query_block` queries, or by
    the fused kernel `attention`, `fused_attention.select`'s choice) or the
    layer's part of a cache (attention: an `attention.CacheAttention`; Gated DeltaNet: its
    `DeltaNetState`); its new contents are returned beside `h` (for Gated DeltaNet also without a
    cache: the state after these tokens), with the channel
    mixer's router statistics (a MoE layer's; None for a dense one), counting the tokens of `token_mask`.
    """
    w = {n: a.astype(dtype) if not n.endswith("norm") else a for n, a in weights.items()}
    norm = functools.partial(rms_norm, eps=cfg.rms_norm_eps, zero_centered=cfg.zero_centered_norms)
    mixed, new_kv = TOKEN_MIXERS[kind.token_mixer].apply(
        norm(h, w["input_layernorm"]), w, rope, visible, kv, cfg=cfg, lora=lora, query_block=query_block,
        attention=attention, token_mask=token_mask)
    h = h + mixed
    channel, stats = CHANNEL_MIXERS[kind.channel_mixer].apply(
        norm(h, w["post_attention_layernorm"]), w, cfg=cfg, lora=lora, token_mask=token_mask)
    h = constrain(h + channel, ("batch", "length", "embed"))
    return h, new_kv, stats

