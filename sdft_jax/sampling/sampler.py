"""Batched generation with a KV cache: one prefill pass, then one jitted decode loop.

Prompts of different lengths are LEFT-padded into one `[B, P]` batch, so every row's last prompt
token sits in the last column: the prefill reads logits at that column only, and all rows then
write the cache at one shared slot per step (RoPE positions stay per row). The decode loop is a
`lax.while_loop` that stops early once every row has finished; a finished row is frozen (it emits
`pad_id`, log-prob 0, and its length stops counting).

Two layers:
- `sample(graphdef, state, ...)`: the pure function, traceable inside other jitted code (e.g. a
  train step that samples on device);
- `Sampler.generate(model, prompts, cfg, key)`: host lists in, numpy out. It rounds the batch and
  prompt length up to buckets so a run compiles a handful of programs, jits over the model state
  with its graph static (the model changes every step, the program does not), donates the KV cache
  back into the next call of the same shape, keeps the unrolled loop's per-layer weight copies for
  as long as the weights stay the same, and splits the batch over the mesh's data axes.

Randomness is per row: row `i` of a call draws from `fold_in(key, i)` (its noise for all steps is
made before the loop), so its tokens do not depend on which other rows share the batch, on the
bucket, or on the mesh; they do depend on `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, Key

from sdft_jax.distributed import put, to_host
from sdft_jax.models import attention
from sdft_jax.models.attention import KVCache, LayerKVCache
from sdft_jax.models.sharding import DEFAULT_RULES, LogicalRules, activation_sharding, constrain, logical_sharding
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.decoder import Layout, decoder_layer, split_layers
from sdft_jax.models.transformer import Transformer, positions_from_mask
from sdft_jax.padding import LENGTH_BUCKETS, bucket_length, pad_rows
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.sampling import processors
from sdft_jax.validation import check_increasing, check_int

log = logging.getLogger(__name__)

StopReason = Literal["stop_token", "length"]

DEFAULT_PROMPT_BUCKETS = LENGTH_BUCKETS
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample: the distribution (temperature 0 = greedy, top_k 0 = off), the length limit,
    and the shape buckets (sorted sizes the prompt length and batch size are rounded up to)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS

    def __post_init__(self):
        processors.check_settings(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  prefix="SamplingConfig.")
        check_int("SamplingConfig.max_new_tokens", self.max_new_tokens, minimum=1)
        check_increasing("SamplingConfig.prompt_buckets", self.prompt_buckets)
        check_increasing("SamplingConfig.batch_buckets", self.batch_buckets)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    """Generated tokens (on device, or on the host after `to_host`); column `t` is the t-th new token,
    padding after `lengths`.

    `sampling_logprobs` are under the distribution the token was drawn from (temperature, top-k,
    top-p; 0 when greedy); `model_logprobs` under the plain model, `log_softmax(logits)`, which is
    SDFT's `lp_old`. Both are 0 after a row's length. `stopped` is True where a stop id ended the
    row (the stop token is included in the tokens and the length), False where the length limit did.
    """

    tokens: Int[Array | np.ndarray, "B N"]
    lengths: Int[Array | np.ndarray, "B"]
    stopped: Bool[Array | np.ndarray, "B"]
    sampling_logprobs: Float[Array | np.ndarray, "B N"]
    model_logprobs: Float[Array | np.ndarray, "B N"]
    logits: Float[Array | np.ndarray, "B N V"] | None = None  # only with keep_logits (tests, debugging)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleOutput:
    """`SampleResult` on the host, one row per prompt, in prompt order (see `SampleResult`)."""

    tokens: np.ndarray  # int32 [B, max_new_tokens], pad_id after each row's length
    lengths: np.ndarray  # int32 [B]
    stop_reasons: list[StopReason]
    sampling_logprobs: np.ndarray  # float32 [B, max_new_tokens]
    model_logprobs: np.ndarray  # float32 [B, max_new_tokens]
    logits: np.ndarray | None = None  # float32 [B, max_new_tokens, V], only with keep_logits

    def completions(self) -> list[list[int]]:
        """Each row's generated ids, without padding (the stop token included)."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
    """Cache slots one call needs: the prompt and every new token except the last (never fed back)."""
    return prompt_len + max_new_tokens - 1


LayerWeights = tuple[dict[str, Array], ...]  # one dict of arrays per layer: `layer_copies`


def layer_copies(model: Transformer) -> LayerWeights:
    """The model's stacked layer weights (and adapters) as one dict of arrays per layer: what the
    decode loop reads with `unroll_layers` (see `decode_step`). A copy: a second set of layer weights
    in memory while it is kept."""
    return model.layers.layer_copies()


def _empty_cache(model: Transformer, batch: int, length: int, unroll_layers: bool) -> KVCache | LayerKVCache:
    """A cache of `length` slots for `batch` rows, in the layout `unroll_layers` decodes with."""
    cache = KVCache.zeros(model.cfg, batch, length, model.dtype)
    return LayerKVCache.from_stacked(cache) if unroll_layers else cache


@pytree_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeState:
    """What the decode loop carries from one step to the next. B rows, N = max_new_tokens.

    Step `step` draws new token `step` of every row still running, from the logits of the token
    drawn at step `step - 1` (`token`, fed through the model at that step; at step 0, from the
    prompt's last token). A row is `done` once it has drawn a stop id (`stopped`), or from the start
    when it is batch padding; a done row is frozen: its `lengths` stops counting and it records
    `pad_id` and log-prob 0. The output buffers (`tokens`, the two log-probs, `logits` with
    keep_logits) hold column t once step t has run.
    """

    step: Int[Array, ""]  # the next new token to draw
    cache: KVCache | LayerKVCache  # every token fed so far
    token: Int[Array, "B"]  # the last token drawn, fed at the next step
    done: Bool[Array, "B"]
    lengths: Int[Array, "B"]  # new tokens per row so far (a stop id included)
    stopped: Bool[Array, "B"]  # whether a stop id ended the row
    logits: Float[Array, "B N V"] | None  # every step's logits (only with keep_logits)
    model_logprobs: Float[Array, "B N"]
    sampling_logprobs: Float[Array, "B N"]
    tokens: Int[Array, "B N"]


def sample(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_tokens: Int[Array, "B P"],
    prompt_mask: Bool[Array, "B P"],
    key: Key[Array, ""],
    *,
    cfg: SamplingConfig,
    stop_ids: Sequence[int],
    pad_id: int,
    row_ids: Int[Array, "B"] | None = None,
    cache: KVCache | LayerKVCache | None = None,
    layer_weights: LayerWeights | None = None,
    keep_logits: bool = False,
    unroll_layers: bool = False,
) -> tuple[SampleResult, KVCache | LayerKVCache]:
    """Generates up to `cfg.max_new_tokens` tokens for a LEFT-padded batch of prompts (pure, traceable).

    `prompt_mask` marks real prompt tokens; a row with none is treated as finished from the start
    (used for batch padding). `row_ids` name each row's random stream (default `arange(B)`).
    `cache` (a `KVCache`, or a `LayerKVCache` with `unroll_layers`, of batch B and at least
    `cache_length(P, max_new_tokens)` slots) is memory to work in, its contents ignored: pass the
    previous call's to reuse it; a fresh one is made when None. `unroll_layers`: see `decode_step`;
    `layer_weights` then may hold `layer_copies(model)` made earlier from these very weights (they are
    sliced here when None). Returns the result and the (now used) cache. `cfg`, `stop_ids`, `pad_id`,
    `keep_logits` and `unroll_layers` are static; the bucket fields of `cfg` are not used.
    """
    model: Transformer = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_tokens.shape
    n_new = cfg.max_new_tokens
    settings = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    needed = cache_length(prompt_len, n_new)
    if cache is None:
        cache = _empty_cache(model, batch, needed, unroll_layers)
    elif isinstance(cache, LayerKVCache) != unroll_layers:
        raise ValueError(f"a {type(cache).__name__} does not fit unroll_layers={unroll_layers}")
    if cache.max_len < needed or cache.valid.shape[0] != batch:
        raise ValueError(f"cache of batch {cache.valid.shape[0]} x {cache.max_len} slots is too small for "
                         f"batch {batch}, prompt {prompt_len} + {n_new} new tokens (needs {needed} slots)")
    # Stale keys and values stay in the buffers; clearing `valid` hides them.
    # A hybrid model's Gated DeltaNet states are summaries, not slots: they start from zero.
    cache = dataclasses.replace(cache, valid=jnp.zeros_like(cache.valid), index=jnp.zeros((), jnp.int32),
                                linear=jax.tree.map(jnp.zeros_like, cache.linear))
    step_fn = decode_step(model, unroll_layers=unroll_layers, layer_weights=layer_weights, max_len=cache.max_len)
    if row_ids is None:
        row_ids = jnp.arange(batch, dtype=jnp.int32)
    greedy = cfg.temperature == 0
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
    noise = None if greedy else processors.noise_for(row_keys, n_new)  # [B, N, 2]
    stop = jnp.asarray(sorted(set(int(i) for i in stop_ids)), jnp.int32)
    prompt_lens = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)

    hidden, cache = step_fn(prompt_tokens, positions_from_mask(prompt_mask), prompt_mask, cache)
    logits = model.logits(hidden[:, -1])  # left padding: the last column is every row's last token

    def emit(state: DecodeState, logits: Float[Array, "B V"]) -> DecodeState:
        """Draws token `state.step` for the rows still running, records it, and moves to the next step."""
        step = state.step
        step_noise = None if greedy else jax.lax.dynamic_index_in_dim(noise, step, axis=1, keepdims=False)
        token, sampling_lp, model_lp = processors.sample_tokens(step_noise, logits, **settings)
        active = ~state.done
        token = jnp.where(active, token, pad_id)
        sampling_lp, model_lp = jnp.where(active, sampling_lp, 0.0), jnp.where(active, model_lp, 0.0)
        logits = jnp.where(active[:, None], logits, 0.0) if keep_logits else None
        record = lambda buffer, value: jax.lax.dynamic_update_index_in_dim(buffer, value, step, axis=1)  # noqa: E731
        buffers = dict(tokens=record(state.tokens, token),
                       sampling_logprobs=record(state.sampling_logprobs, sampling_lp),
                       model_logprobs=record(state.model_logprobs, model_lp),
                       logits=record(state.logits, logits) if keep_logits else None)
        hit = active & jnp.any(token[:, None] == stop[None, :], axis=1)
        return dataclasses.replace(state, token=token, done=state.done | hit, lengths=state.lengths + active,
                                   stopped=state.stopped | hit, step=step + 1, **buffers)

    def running(state: DecodeState) -> Bool[Array, ""]:
        return (state.step < n_new) & ~jnp.all(state.done)

    def next_token(state: DecodeState) -> DecodeState:
        # The token fed now is new token `step - 1`, at position prompt_len + step - 1 of its row.
        positions = (prompt_lens + state.step - 1)[:, None]
        hidden, cache = step_fn(state.token[:, None], positions, ~state.done[:, None], state.cache)
        return emit(dataclasses.replace(state, cache=cache), model.logits(hidden[:, 0]))

    first = DecodeState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        token=jnp.full((batch,), pad_id, jnp.int32),
        done=prompt_lens == 0,
        lengths=jnp.zeros((batch,), jnp.int32),
        stopped=jnp.zeros((batch,), bool),
        logits=jnp.zeros((batch, n_new, logits.shape[-1]), jnp.float32) if keep_logits else None,
        model_logprobs=jnp.zeros((batch, n_new), jnp.float32),
        sampling_logprobs=jnp.zeros((batch, n_new), jnp.float32),
        tokens=jnp.full((batch, n_new), pad_id, jnp.int32),
    )
    final = jax.lax.while_loop(running, next_token, emit(first, logits))
    cache = final.cache
    if unroll_layers:  # handed back split as `Sampler` makes it, so the next call's program is this one
        cache = dataclasses.replace(cache, k=tuple(constrain(k, _LAYER_K_AXES) for k in cache.k),
                                    v=tuple(constrain(v, _LAYER_V_AXES) for v in cache.v))
    result = SampleResult(tokens=final.tokens, lengths=final.lengths, stopped=final.stopped,
                          sampling_logprobs=final.sampling_logprobs, model_logprobs=final.model_logprobs,
                          logits=final.logits)
    return result, cache


DecodeStep = Callable[[Int[Array, "B T"], Int[Array, "B T"], Bool[Array, "B T"], KVCache | LayerKVCache],
                      tuple[Float[Array, "B T D"], KVCache | LayerKVCache]]


def decode_step(model: Transformer, *, unroll_layers: bool = False, layer_weights: LayerWeights | None = None,
                max_len: int | None = None) -> DecodeStep:
    """The model's cached forward, `(tokens [B, T], positions, mask, cache) -> (hidden [B, T, D], cache)`.

    Scanned: the model's own call on a stacked `KVCache`. With `unroll_layers`, on a `LayerKVCache`:
    the step runs the model's `decoder_layer` once per layer, each on its own weights (`layer_weights`,
    i.e. `layer_copies(model)`; sliced here, once per call, when None) and cache buffers. Inside a scan,
    XLA:CPU copies every layer's weights out of the stacked arrays at every step, and every layer's
    keys and values out of the stacked cache, transposed; unrolled, the step reads both where they lie.
    The price: a second copy of the layer weights while sampling, and a compile that grows with depth.
    With the cache and the copies kept between calls (`Sampler`), it decodes faster than the scan on
    CPU at every batch size measured (docs/benchmarks.md), hence the CPU default; on TPU/GPU, where
    XLA reads slices in place, keep the scan. Unrolled, the RoPE tables of positions
    `0 .. max_len - 1` (the cache's slots; a row's positions never exceed its slots) are made here,
    outside the decode loop, and each step looks its positions up: made in the step, XLA:CPU fuses
    the sines and cosines into every layer's consumers and evaluates them per element and head.
    """
    if not unroll_layers:
        if layer_weights is not None:
            raise ValueError("layer_weights are read only with unroll_layers")
        return model
    if max_len is None:
        raise ValueError("decode_step with unroll_layers needs max_len, the cache's slot count")
    per_layer = layer_copies(model) if layer_weights is None else layer_weights
    layer = functools.partial(decoder_layer, cfg=model.cfg, lora=model.layers.lora, dtype=model.dtype)
    kinds = model.cfg.layer_kinds
    cos, sin = model.rope_tables(jnp.arange(max_len)[None])  # [1, max_len, hd/2]

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
                mixer_cache = functools.partial(attention.attend_layer, k_cache=ks[i], v_cache=vs[i], slot=cache.index)
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


# A `LayerKVCache` buffer's merged (row, KV head) axis is split over the batch axes only: a split
# over KV heads as well would not follow the heads (rows are its major part), so it stays whole.
_LAYER_K_AXES = ("batch", "head_dim", "length")
_LAYER_V_AXES = ("batch", "length", "head_dim")


def _laid_out(cache: KVCache | LayerKVCache) -> KVCache | LayerKVCache:
    """The cache pinned to its layout under `activation_sharding`: split over the batch like the prompts;
    the stacked one also over KV heads like the model (a `LayerKVCache`'s buffers as `_LAYER_K_AXES`)."""
    valid, index = constrain(cache.valid, ("batch", "length")), constrain(cache.index, ())
    if isinstance(cache, KVCache):
        axes = ("layers", "batch", "length", "kv_heads", "head_dim")
        return KVCache(k=constrain(cache.k, axes), v=constrain(cache.v, axes), valid=valid, index=index,
                       linear=cache.linear)
    return LayerKVCache(k=tuple(constrain(k, _LAYER_K_AXES) for k in cache.k),
                        v=tuple(constrain(v, _LAYER_V_AXES) for v in cache.v), valid=valid, index=index,
                        linear=cache.linear)


def default_unroll_layers() -> bool:
    """Whether `Sampler` unrolls the decode loop's layers when not told: on CPU (see `decode_step`)."""
    return jax.default_backend() == "cpu"


def _sharding_key(sharding: jax.sharding.Sharding) -> Hashable:
    """A hashable stand-in equal for equivalent shardings (`P('x', None)` and `P('x')` are the same layout)."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        while spec and spec[-1] is None:
            spec = spec[:-1]
        return sharding.mesh, spec, sharding.memory_kind
    return sharding


class Sampler:
    """Generates from token-id prompts with whatever model (full or LoRA, sharded or not) it is handed.

    `stop_ids` end a row (EOS, `<|im_end|>`, ...; may be empty); `pad_id` fills the batch and the
    output after each row's end. With a `mesh`, the batch is split over its `data` x `fsdp` x `expert` axes
    (batch buckets are rounded up to a multiple of that size) and the model's parameters stay
    where they are. `compilations` counts the programs compiled so far (one per batch bucket x
    prompt bucket x model graph x sampling settings) and `compile_seconds` the time they took; each
    new one is logged at INFO. With `keep_cache` a call's KV cache stays allocated and is donated to
    the next call of the same shape (no allocation per call), and, unrolled, the per-layer weight
    copies (`layer_copies`) are kept and reused while the model's layer weights are the same arrays
    (an evaluation's many calls make them once; a train loop, whose step replaces the weights, once
    per call: `copies_made` counts them); `clear_cache()` frees both.
    `unroll_layers` trades memory and compile time for decode speed (see `decode_step`); by default
    it is on for CPU and off elsewhere.
    """

    def __init__(self, *, stop_ids: Sequence[int], pad_id: int, mesh: Mesh | None = None,
                 rules: LogicalRules = DEFAULT_RULES, keep_cache: bool = True, unroll_layers: bool | None = None):
        self.stop_ids = tuple(sorted(set(int(i) for i in stop_ids)))
        self.pad_id = int(pad_id)
        self.mesh = mesh
        self.rules = rules
        self.keep_cache = keep_cache
        self.unroll_layers = default_unroll_layers() if unroll_layers is None else unroll_layers
        self.compilations = 0
        self._batch_multiple = 1 if mesh is None else math.prod(
            mesh.shape.get(axis, 1) for axis in ("data", "fsdp", "expert"))
        self._cache: KVCache | LayerKVCache | None = None  # donated into the next same-shape call
        self._layers: _LayerCopies | None = None
        self.copies_made = 0
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0
        self._jitted = jax.jit(self._traced, static_argnames=("graphdef", "cfg", "keep_logits"),
                               donate_argnames=("cache",))
        self._copy = jax.jit(_copy_layers, static_argnums=(2, 3), donate_argnums=(1,))

    def _traced(self, state: nnx.State, tokens: Int[Array, "B P"], mask: Bool[Array, "B P"], row_ids: Int[Array, "B"],
                key: Key[Array, ""], cache: KVCache | LayerKVCache, layer_weights: LayerWeights | None, *,
                graphdef: nnx.GraphDef, cfg: SamplingConfig,
                keep_logits: bool) -> tuple[SampleResult, KVCache | LayerKVCache]:
        """`sample` with this sampler's settings, traced under its mesh's activation sharding."""
        kwargs = dict(cfg=cfg, stop_ids=self.stop_ids, pad_id=self.pad_id, row_ids=row_ids, cache=cache,
                      layer_weights=layer_weights, keep_logits=keep_logits, unroll_layers=self.unroll_layers)
        if self.mesh is None:
            return sample(graphdef, state, tokens, mask, key, **kwargs)
        with activation_sharding(self.mesh, self.rules):
            return sample(graphdef, state, tokens, mask, key, **kwargs)

    def _program(self, graphdef: nnx.GraphDef, args: tuple, cfg: SamplingConfig,
                 keep_logits: bool) -> jax.stages.Compiled:
        """The compiled program for these arguments' shapes, dtypes and shardings (compiled on first use)."""
        # The buckets only chose the shapes, which the signature holds: configs that differ only in
        # their buckets share programs.
        cfg = dataclasses.replace(cfg, prompt_buckets=DEFAULT_PROMPT_BUCKETS, batch_buckets=DEFAULT_BATCH_BUCKETS)
        signature = tuple((x.shape, x.dtype, _sharding_key(x.sharding)) for x in jax.tree.leaves(args))
        program_key = (graphdef, cfg, keep_logits, jax.tree.structure(args), signature)
        program = self._programs.get(program_key)
        if program is None:
            start = time.perf_counter()
            program = self._jitted.lower(*args, graphdef=graphdef, cfg=cfg, keep_logits=keep_logits).compile()
            seconds = time.perf_counter() - start
            self._programs[program_key] = program
            self.compilations += 1
            self.compile_seconds += seconds
            tokens = args[1]
            log.info("sampler: compiled program %d (batch %d x prompt %d, %d new tokens, temperature %s, top_p %s, "
                     "top_k %s) in %.1f s", self.compilations, tokens.shape[0], tokens.shape[1], cfg.max_new_tokens,
                     cfg.temperature, cfg.top_p, cfg.top_k, seconds)
        return program

    def clear_cache(self) -> None:
        """Frees the KV cache and the layer copies kept for the next call (e.g. before a memory-hungry
        train step)."""
        self._cache = self._layers = None

    @property
    def kept_cache(self) -> KVCache | LayerKVCache | None:
        """The KV cache kept for the next call of the same shape (donated to it), if any."""
        return self._cache

    @property
    def kept_layer_copies(self) -> LayerWeights | None:
        """The per-layer weight copies (`layer_copies`) kept for the next unrolled call, if any."""
        return None if self._layers is None else self._layers.copies

    def has_layer_copies_of(self, model: Transformer) -> bool:
        """Whether the kept layer copies were made from `model`'s layer weights as they are now (the very
        arrays, none deleted since), i.e. whether a call with `model` reuses them instead of copying."""
        return self._layers is not None and self._layers.made_from(model.layers.weights())

    def generate(
        self,
        model: Transformer | tuple[nnx.GraphDef, nnx.State],
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        key: Key[Array, ""],
        *,
        keep_logits: bool = False,
    ) -> SampleOutput:
        """Samples one completion per prompt (token ids, any lengths) with the model's current weights.

        `model` is the module or its `(graphdef, state)` split (e.g. from a train state). Batches
        above the largest batch bucket run as several calls. `keep_logits` also returns every
        step's logits. Raises ValueError for an empty prompt, a prompt above the largest prompt
        bucket, or prompt + max_new_tokens above the model's max_position_embeddings, naming the row.
        """
        if isinstance(model, tuple):
            model = nnx.merge(*model)
        prompt_len = self._check_prompts(model, prompts, cfg)
        largest = max(self._batch_bucket(b, cfg) for b in cfg.batch_buckets)
        graphdef, state = nnx.split(model)
        parts = []
        for start in range(0, len(prompts), largest):
            chunk = prompts[start:start + largest]
            parts.append(self._run(model, graphdef, state, chunk, start, prompt_len, cfg, key, keep_logits))
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return SampleOutput(
            tokens=cat("tokens"), lengths=cat("lengths"),
            stop_reasons=["stop_token" if s else "length" for s in cat("stopped")],
            sampling_logprobs=cat("sampling_logprobs"), model_logprobs=cat("model_logprobs"),
            logits=cat("logits") if keep_logits else None,
        )

    def _check_prompts(self, model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> int:
        """Validates the prompts; returns the prompt bucket they fit."""
        if not len(prompts):
            raise ValueError("generate: no prompts")
        limit = model.cfg.max_position_embeddings
        vocab = model.cfg.vocab_size
        for i, p in enumerate(prompts):
            n = len(p)
            if n == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if n > cfg.prompt_buckets[-1]:
                raise ValueError(f"prompt {i} has {n} tokens, more than the largest prompt bucket "
                                 f"({cfg.prompt_buckets[-1]}); add a bucket or shorten it")
            if n + cfg.max_new_tokens > limit:
                raise ValueError(f"prompt {i}: {n} prompt tokens + max_new_tokens {cfg.max_new_tokens} = "
                                 f"{n + cfg.max_new_tokens}, more than the model's max_position_embeddings ({limit})")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
        return bucket_length(max(len(p) for p in prompts), cfg.prompt_buckets)

    def _batch_bucket(self, batch: int, cfg: SamplingConfig) -> int:
        """The batch bucket of `batch` rows (the largest bucket for more), rounded up to a multiple of
        the data-parallel size."""
        bucket = bucket_length(min(batch, cfg.batch_buckets[-1]), cfg.batch_buckets)
        return math.ceil(bucket / self._batch_multiple) * self._batch_multiple

    def _run(self, model: Transformer, graphdef: nnx.GraphDef, state: nnx.State, prompts: Sequence[Sequence[int]],
             start: int, prompt_len: int, cfg: SamplingConfig, key: Key[Array, ""], keep_logits: bool) -> SampleResult:
        """One call of the compiled program on at most the largest batch bucket; host arrays back."""
        batch = self._batch_bucket(len(prompts), cfg)
        rows = [*prompts, *[[]] * (batch - len(prompts))]  # batch padding: rows without a token
        tokens, mask = pad_rows(rows, prompt_len, pad_value=self.pad_id, side="left")
        row_ids = np.arange(start, start + batch, dtype=np.int32)
        tokens, mask, row_ids, key = self._place(tokens, mask, row_ids, key)
        cache = self._take_cache(model, batch, cache_length(prompt_len, cfg.max_new_tokens))
        # Without keep_cache, the program slices the layer weights itself (nothing outlives the call).
        layers = self._layer_weights(model) if self.unroll_layers and self.keep_cache else None
        args = (state, tokens, mask, row_ids, key, cache, layers)
        result, cache = self._program(graphdef, args, cfg, keep_logits)(*args)
        self._cache = cache if self.keep_cache else None
        n = len(prompts)
        return jax.tree.map(lambda x: x[:n], to_host(result))

    def _place(self, tokens: Int[np.ndarray, "B P"], mask: Bool[np.ndarray, "B P"], row_ids: Int[np.ndarray, "B"],
               key: Key[Array, ""]) -> tuple[Int[Array, "B P"], Bool[Array, "B P"], Int[Array, "B"], Key[Array, ""]]:
        """The call's inputs on the devices: committed to one, or split over the mesh's batch axes."""
        if self.mesh is None:
            # Committed like the model's parameters and the returned cache, so every call of a shape
            # presents the same shardings to its compiled program.
            device = jax.devices()[0]
            return tuple(jax.device_put(x, device) for x in (tokens, mask, row_ids, key))
        two = logical_sharding(("batch", "length"), tokens.shape, self.mesh, self.rules)
        one = logical_sharding(("batch",), row_ids.shape, self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        # Every process passes the same prompts; each fills only its own devices' rows.
        return (put(tokens, two), put(mask, two), put(row_ids, one), put(key, replicated))

    def _take_cache(self, model: Transformer, batch: int, length: int) -> KVCache | LayerKVCache:
        """The kept cache when it fits this call exactly, else a new one (the old one is freed first)."""
        make = functools.partial(_empty_cache, model, batch, length, self.unroll_layers)
        wanted = jax.eval_shape(lambda: jax.tree.leaves(make()))
        old, self._cache = self._cache, None
        if old is not None and isinstance(old, LayerKVCache) == self.unroll_layers and [
                (a.shape, a.dtype) for a in jax.tree.leaves(old)] == [(b.shape, b.dtype) for b in wanted]:
            return old
        del old
        if self.mesh is None:
            return jax.device_put(jax.jit(make)(), jax.devices()[0])
        with activation_sharding(self.mesh, self.rules):
            return jax.jit(lambda: _laid_out(make()))()

    def _layer_weights(self, model: Transformer) -> LayerWeights:
        """`layer_copies(model)`: the kept ones when they were made from these very arrays, else new ones,
        written into the old copies' memory when it fits (freshly mapped memory of that size page-faults
        on every page at first touch)."""
        stacked = model.layers.weights()
        kept, self._layers = self._layers, None
        if kept is not None and kept.made_from(stacked):
            self._layers = kept
            return kept.copies
        into = kept.copies if kept is not None and kept.fits(model) else None
        del kept
        copies = self._copy(stacked, into, model.cfg, model.layers.layout)
        self._layers = _LayerCopies(copies=copies, source={n: weakref.ref(w) for n, w in stacked.items()})
        self.copies_made += 1
        return copies


def _copy_layers(stacked: dict[str, Array], into: LayerWeights | None, cfg: ModelConfig,
                 layout: Layout) -> LayerWeights:
    """`layer_copies` of the stacked weights, written into `into` (same shapes, donated) when given."""
    per_layer = split_layers(cfg, layout, stacked)
    if into is None:
        return per_layer
    return jax.tree.map(lambda buf, w: jax.lax.dynamic_update_slice(buf, w, (0,) * w.ndim), into, per_layer)


@dataclasses.dataclass(frozen=True)
class _LayerCopies:
    """Per-layer weight copies and (weakly) the stacked arrays they were made from."""

    copies: LayerWeights
    source: dict[str, weakref.ref]

    def made_from(self, stacked: dict[str, Array]) -> bool:
        # jax arrays are immutable: the same live objects hold the same values.
        return stacked.keys() == self.source.keys() and all(
            self.source[n]() is w and not w.is_deleted() for n, w in stacked.items())

    def fits(self, model: Transformer) -> bool:
        """Whether the copies can take this model's layer slices (names, shapes, dtypes and layouts alike)."""
        wanted = jax.eval_shape(model.layers.layer_copies)
        if jax.tree.structure(wanted) != jax.tree.structure(self.copies):
            return False
        stacked = model.layers.weights()
        for copy, want, kind_names in zip(self.copies, wanted, wanted, strict=True):
            for name in kind_names:
                c, w = copy[name], want[name]
                if (c.shape, c.dtype) != (w.shape, w.dtype) or (
                        _sharding_key(c.sharding) != _sharding_key(_without_layers_axis(stacked[name].sharding))):
                    return False
        return True


def _without_layers_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer's slice of a stacked `[L, ...]` array."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding
