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
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, Key

from sdft_jax.distributed import put, to_host
from sdft_jax.models import attention, transformer
from sdft_jax.models.attention import KVCache
from sdft_jax.models.sharding import DEFAULT_RULES, LogicalRules, activation_sharding, constrain, logical_sharding
from sdft_jax.models.transformer import Transformer, positions_from_mask
from sdft_jax.sampling import processors

log = logging.getLogger(__name__)

StopReason = Literal["stop_token", "length"]

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
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
        try:
            processors.check_settings(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        except ValueError as e:
            raise ValueError(f"SamplingConfig.{e}") from None
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be an integer >= 1, got {n!r}")
        for name in ("prompt_buckets", "batch_buckets"):
            buckets = getattr(self, name)
            ok = (isinstance(buckets, tuple) and buckets
                  and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets)
                  and all(a < b for a, b in zip(buckets, buckets[1:], strict=False)))
            if not ok:
                raise ValueError(f"SamplingConfig.{name} must be a non-empty tuple of increasing positive "
                                 f"integers, got {buckets!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    """Generated tokens on device; column `t` is the t-th new token, padding after `lengths`.

    `sampling_logprobs` are under the distribution the token was drawn from (temperature, top-k,
    top-p; 0 when greedy); `model_logprobs` under the plain model, `log_softmax(logits)`, which is
    SDFT's `lp_old`. Both are 0 after a row's length. `stopped` is True where a stop id ended the
    row (the stop token is included in the tokens and the length), False where the length limit did.
    """

    tokens: Int[Array, "B N"]
    lengths: Int[Array, "B"]
    stopped: Bool[Array, "B"]
    sampling_logprobs: Float[Array, "B N"]
    model_logprobs: Float[Array, "B N"]
    logits: Float[Array, "B N V"] | None = None  # only with keep_logits (tests, debugging)


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


def layer_copies(model: Transformer) -> tuple[dict[str, jax.Array], ...]:
    """The model's stacked layer weights (and adapters) as one dict of arrays per layer: what the
    decode loop reads with `unroll_layers` (see `decode_step`). A copy: 425 MB for SmolLM2-135M."""
    return _copy_layers(model.layers.weights(), None)


def _empty_cache(model: Transformer, batch: int, length: int, unroll_layers: bool):
    cache = KVCache.zeros(model.cfg, batch, length, model.dtype)
    return attention.LayerKVCache.from_stacked(cache) if unroll_layers else cache


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
    cache: KVCache | attention.LayerKVCache | None = None,
    layer_weights: tuple[dict[str, jax.Array], ...] | None = None,
    keep_logits: bool = False,
    unroll_layers: bool = False,
) -> tuple[SampleResult, KVCache | attention.LayerKVCache]:
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
    elif isinstance(cache, attention.LayerKVCache) != unroll_layers:
        raise ValueError(f"a {type(cache).__name__} does not fit unroll_layers={unroll_layers}")
    if cache.valid.shape[1] < needed or cache.valid.shape[0] != batch:
        raise ValueError(f"cache of batch {cache.valid.shape[0]} x {cache.valid.shape[1]} slots is too small for "
                         f"batch {batch}, prompt {prompt_len} + {n_new} new tokens (needs {needed} slots)")
    # Stale keys and values stay in the buffers; clearing `valid` hides them.
    cache = dataclasses.replace(cache, valid=jnp.zeros_like(cache.valid), index=jnp.zeros((), jnp.int32))
    step_fn = decode_step(model, unroll_layers=unroll_layers, layer_weights=layer_weights, max_len=cache.valid.shape[1])
    if row_ids is None:
        row_ids = jnp.arange(batch, dtype=jnp.int32)
    greedy = cfg.temperature == 0
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
    noise = None if greedy else processors.noise_for(row_keys, n_new)  # [B, N, 2]
    stop = jnp.asarray(sorted(set(int(i) for i in stop_ids)), jnp.int32)
    prompt_lens = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)

    hidden, cache = step_fn(prompt_tokens, positions_from_mask(prompt_mask), prompt_mask, cache)
    logits = model.logits(hidden[:, -1])  # left padding: the last column is every row's last token

    out = dict(
        tokens=jnp.full((batch, n_new), pad_id, jnp.int32),
        sampling_logprobs=jnp.zeros((batch, n_new), jnp.float32),
        model_logprobs=jnp.zeros((batch, n_new), jnp.float32),
    )
    if keep_logits:
        out["logits"] = jnp.zeros((batch, n_new, logits.shape[-1]), jnp.float32)

    def emit(step, logits, done, lengths, stopped, out):
        """Draws token `step` for the rows still running and records it."""
        step_noise = None if greedy else jax.lax.dynamic_index_in_dim(noise, step, axis=1, keepdims=False)
        token, sampling_lp, model_lp = processors.sample_tokens(step_noise, logits, **settings)
        active = ~done
        token = jnp.where(active, token, pad_id)
        values = dict(tokens=token, sampling_logprobs=jnp.where(active, sampling_lp, 0.0),
                      model_logprobs=jnp.where(active, model_lp, 0.0))
        if keep_logits:
            values["logits"] = jnp.where(active[:, None], logits, 0.0)
        out = {name: jax.lax.dynamic_update_index_in_dim(out[name], values[name], step, axis=1) for name in out}
        hit = active & jnp.any(token[:, None] == stop[None, :], axis=1)
        return token, done | hit, lengths + active, stopped | hit, out

    done = prompt_lens == 0
    zeros = jnp.zeros((batch,), jnp.int32)
    token, done, lengths, stopped, out = emit(0, logits, done, zeros, jnp.zeros((batch,), bool), out)

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < n_new) & ~jnp.all(done)

    def body(carry):
        step, cache, token, done, lengths, stopped, out = carry
        # The token fed now is new token `step - 1`, at position prompt_len + step - 1 of its row.
        positions = (prompt_lens + step - 1)[:, None]
        hidden, cache = step_fn(token[:, None], positions, ~done[:, None], cache)
        logits = model.logits(hidden[:, 0])
        token, done, lengths, stopped, out = emit(step, logits, done, lengths, stopped, out)
        return step + 1, cache, token, done, lengths, stopped, out

    carry = (jnp.ones((), jnp.int32), cache, token, done, lengths, stopped, out)
    _, cache, _, _, lengths, stopped, out = jax.lax.while_loop(cond, body, carry)
    if unroll_layers:  # handed back split as `Sampler` makes it, so the next call's program is this one
        cache = dataclasses.replace(cache, k=tuple(constrain(k, _LAYER_K_AXES) for k in cache.k),
                                    v=tuple(constrain(v, _LAYER_V_AXES) for v in cache.v))
    result = SampleResult(lengths=lengths, stopped=stopped, logits=out.pop("logits", None), **out)
    return result, cache


def decode_step(model: Transformer, *, unroll_layers: bool = False,
                layer_weights: tuple[dict[str, jax.Array], ...] | None = None, max_len: int | None = None):
    """The model's cached forward, `(tokens [B, T], positions, mask, cache) -> (hidden [B, T, D], cache)`.

    Scanned: the model's own call on a stacked `KVCache`. With `unroll_layers`, on a `LayerKVCache`:
    the step runs the model's own layer function once per layer, each on its own weights
    (`layer_weights`, i.e. `layer_copies(model)`; sliced here, once per call, when None) and cache
    buffers. Inside a scan, XLA:CPU copies every layer's weights out of the stacked arrays at every
    step (~60% of a batch-1 SmolLM2 decode step) and every layer's keys and values out of the stacked
    cache, transposed (~25% at batch 32); unrolled, the step reads both where they lie. The price: a
    second copy of the layer weights while sampling, and a compile that grows with depth. With the
    cache and the copies kept between calls (`Sampler`), faster than the scan on CPU at every batch
    size measured (docs/benchmarks.md), hence the CPU default; on TPU/GPU, where XLA reads slices in
    place, keep the scan. Unrolled, the RoPE tables of positions `0 .. max_len - 1` (the cache's
    slots; a row's positions never exceed its slots) are made here, outside the decode loop, and
    each step looks its positions up: made in the step (even once for all layers), XLA:CPU fuses the
    sines and cosines into every layer's consumers and evaluates them per element and head (batch
    32: prefill 5% and decode steps 2.5% slower, docs/benchmarks.md).
    """
    if not unroll_layers:
        if layer_weights is not None:
            raise ValueError("layer_weights are read only with unroll_layers")
        return model
    if max_len is None:
        raise ValueError("decode_step with unroll_layers needs max_len, the cache's slot count")
    layers, cfg = model.layers, model.cfg
    per_layer = layer_copies(model) if layer_weights is None else layer_weights
    layer = functools.partial(transformer._layer, cfg=cfg, lora=layers.lora, dtype=model.dtype)
    cos, sin = attention.rope_tables(jnp.arange(max_len)[None], attention.rope_inv_freq(cfg))  # [1, max_len, hd/2]

    def step(tokens, positions, mask, cache: attention.LayerKVCache):
        # Transformer.__call__'s cache path, with the layer scan written out.
        x = constrain(jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype), ("batch", "length", "embed"))
        valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
        visible = attention.causal_visibility(cache.index + jnp.arange(tokens.shape[1]), valid)
        ks, vs = list(cache.k), list(cache.v)
        rope = (cos[0][positions], sin[0][positions])  # [B, T, hd/2] each
        for i, weights in enumerate(per_layer):
            kv = functools.partial(attention.attend_layer, k_cache=ks[i], v_cache=vs[i], slot=cache.index)
            x, (ks[i], vs[i]) = layer(x, weights, rope, visible, kv)
        hidden = transformer.rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)
        return hidden, attention.LayerKVCache(k=tuple(ks), v=tuple(vs), valid=valid,
                                              index=cache.index + tokens.shape[1])

    return step


# A `LayerKVCache` buffer's merged (row, KV head) axis is split over the batch axes only: a split
# over KV heads as well would not follow the heads (rows are its major part), so it stays whole.
_LAYER_K_AXES = ("batch", "head_dim", "length")
_LAYER_V_AXES = ("batch", "length", "head_dim")


def default_unroll_layers() -> bool:
    """Whether `Sampler` unrolls the decode loop's layers when not told: on CPU (see `decode_step`)."""
    return jax.default_backend() == "cpu"


def _sharding_key(sharding: jax.sharding.Sharding):
    """A hashable stand-in equal for equivalent shardings (`P('x', None)` and `P('x')` are the same layout)."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        while spec and spec[-1] is None:
            spec = spec[:-1]
        return sharding.mesh, spec, sharding.memory_kind
    return sharding


def round_up(value: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= value, or None when value is above them all."""
    return next((b for b in buckets if b >= value), None)


class Sampler:
    """Generates from token-id prompts with whatever model (full or LoRA, sharded or not) it is handed.

    `stop_ids` end a row (EOS, `<|im_end|>`, ...; may be empty); `pad_id` fills the batch and the
    output after each row's end. With a `mesh`, the batch is split over its `data` x `fsdp` axes
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
        self._batch_multiple = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        self._cache: KVCache | attention.LayerKVCache | None = None  # donated into the next same-shape call
        self._layers: _LayerCopies | None = None
        self.copies_made = 0
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0
        self._jitted = jax.jit(self._traced, static_argnames=("graphdef", "cfg", "keep_logits"),
                               donate_argnames=("cache",))
        self._copy = jax.jit(_copy_layers, donate_argnums=(1,))

    def _traced(self, state, tokens, mask, row_ids, key, cache, layer_weights, *, graphdef, cfg, keep_logits):
        kwargs = dict(cfg=cfg, stop_ids=self.stop_ids, pad_id=self.pad_id, row_ids=row_ids, cache=cache,
                      layer_weights=layer_weights, keep_logits=keep_logits, unroll_layers=self.unroll_layers)
        if self.mesh is None:
            return sample(graphdef, state, tokens, mask, key, **kwargs)
        with activation_sharding(self.mesh, self.rules):
            return sample(graphdef, state, tokens, mask, key, **kwargs)

    def _program(self, graphdef, args, cfg: SamplingConfig, keep_logits: bool) -> jax.stages.Compiled:
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

    def _check_prompts(self, model: Transformer, prompts, cfg: SamplingConfig) -> int:
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
        return round_up(max(len(p) for p in prompts), cfg.prompt_buckets)

    def _batch_bucket(self, batch: int, cfg: SamplingConfig) -> int:
        bucket = round_up(batch, cfg.batch_buckets) or cfg.batch_buckets[-1]
        return math.ceil(bucket / self._batch_multiple) * self._batch_multiple

    def _run(self, model, graphdef, state, prompts, start, prompt_len, cfg, key, keep_logits) -> SampleResult:
        """One call of the compiled program on at most the largest batch bucket; host arrays back."""
        batch = self._batch_bucket(len(prompts), cfg)
        tokens = np.full((batch, prompt_len), self.pad_id, np.int32)
        mask = np.zeros((batch, prompt_len), bool)
        for i, p in enumerate(prompts):  # left padding
            tokens[i, prompt_len - len(p):] = p
            mask[i, prompt_len - len(p):] = True
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

    def _place(self, tokens, mask, row_ids, key):
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

    def _take_cache(self, model: Transformer, batch: int, length: int) -> KVCache | attention.LayerKVCache:
        """The kept cache when it fits this call exactly, else a new one (the old one is freed first)."""
        make = functools.partial(_empty_cache, model, batch, length, self.unroll_layers)
        wanted = jax.eval_shape(make)
        old, self._cache = self._cache, None
        if old is not None and jax.tree.structure(old) == jax.tree.structure(wanted) and all(
                a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(wanted))):
            return old
        del old
        if self.mesh is None:
            return jax.device_put(jax.jit(make)(), jax.devices()[0])
        return jax.jit(make, out_shardings=self._cache_shardings(wanted))()

    def _cache_shardings(self, wanted: KVCache | attention.LayerKVCache):
        """The cache split over the batch like the prompts; the stacked one also over KV heads like the
        model (a `LayerKVCache`'s merged row-and-head axis over the batch axes only, `_LAYER_K_AXES`)."""
        sharding = lambda axes, shape: logical_sharding(axes, shape, self.mesh, self.rules)  # noqa: E731
        valid = sharding(("batch", "length"), wanted.valid.shape)
        index = NamedSharding(self.mesh, PartitionSpec())
        if isinstance(wanted, KVCache):
            kv = sharding(("layers", "batch", "length", "kv_heads", "head_dim"), wanted.k.shape)
            return KVCache(k=kv, v=kv, valid=valid, index=index)
        k = sharding(_LAYER_K_AXES, wanted.k[0].shape)
        v = sharding(_LAYER_V_AXES, wanted.v[0].shape)
        layers = len(wanted.k)
        return attention.LayerKVCache(k=(k,) * layers, v=(v,) * layers, valid=valid, index=index)

    def _layer_weights(self, model: Transformer) -> tuple[dict[str, jax.Array], ...]:
        """`layer_copies(model)`: the kept ones when they were made from these very arrays, else new ones,
        written into the old copies' memory when it fits (memory freshly mapped for SmolLM2's 425 MB
        page-faults ~130,000 times, 0.1-0.3 s at batch 1)."""
        stacked = model.layers.weights()
        kept, self._layers = self._layers, None
        if kept is not None and kept.made_from(stacked):
            self._layers = kept
            return kept.copies
        into = kept.copies if kept is not None and kept.fits(stacked) else None
        del kept
        copies = self._copy(stacked, into)
        self._layers = _LayerCopies(copies=copies, source={n: weakref.ref(w) for n, w in stacked.items()})
        self.copies_made += 1
        return copies


def _copy_layers(stacked: dict[str, jax.Array], into: tuple[dict[str, jax.Array], ...] | None):
    """`layer_copies` of the stacked weights, written into `into` (same shapes, donated) when given."""
    per_layer = tuple({name: w[i] for name, w in stacked.items()} for i in range(len(next(iter(stacked.values())))))
    if into is None:
        return per_layer
    return jax.tree.map(lambda buf, w: jax.lax.dynamic_update_slice(buf, w, (0,) * w.ndim), into, per_layer)


@dataclasses.dataclass(frozen=True)
class _LayerCopies:
    """Per-layer weight copies and (weakly) the stacked arrays they were made from."""

    copies: tuple[dict[str, jax.Array], ...]
    source: dict[str, weakref.ref]

    def made_from(self, stacked: dict[str, jax.Array]) -> bool:
        # jax arrays are immutable: the same live objects hold the same values.
        return stacked.keys() == self.source.keys() and all(
            self.source[n]() is w and not w.is_deleted() for n, w in stacked.items())

    def fits(self, stacked: dict[str, jax.Array]) -> bool:
        """Whether the copies can take these arrays' slices (names, shapes, dtypes and layouts alike)."""
        if stacked.keys() != self.copies[0].keys() or len(self.copies) != len(next(iter(stacked.values()))):
            return False
        for copy in self.copies:
            for name, w in stacked.items():
                c = copy[name]
                if (c.shape, c.dtype) != (w.shape[1:], w.dtype) or (
                        _sharding_key(c.sharding) != _sharding_key(_without_layers_axis(w.sharding))):
                    return False
        return True


def _without_layers_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer's slice of a stacked `[L, ...]` array."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding
