"""Continuous batching: a pool of decode slots, refilled with the next prompts as rows finish.

A static batch (`sampler.Sampler`) decodes until its longest row ends: with most rows short and a
few long, most of its decode slots run finished rows. Here a pool of `slots` rows decodes together,
and as soon as a row finishes while prompts wait, the next prompt is prefilled into its slot, so a
call's time follows the tokens generated, not rows x the longest row.

Design: the cache as a ring, the decode step unchanged.
- The pool is one stacked `KVCache` of `slots` rows x S slots, S = `cache_length(largest prompt
  bucket, max_new_tokens)`: the most one row ever holds. As in the static sampler every row writes
  its next token at one shared slot, `cache.index`, with its own RoPE position; here the index wraps
  round (mod S), so each row's buffer is a ring. Keys are cached after RoPE and `valid` marks each
  row's own tokens, so the order of its slots does not matter: a decode step's one new token sees
  every valid slot of its row (`CacheSlots.reserve`). A row spans at most S consecutive ring slots
  (its prompt and every token fed back), so the shared write slot never lands on a live one.
- Inserting rows (the `insert` program): their prompts, left-padded to a prompt bucket (and their
  count to a power of two), are prefilled by the model's own cached forward into a small fresh
  cache; each row's keys and values are rotated into its slot's ring entries ending just before the
  current index, its other entries invalidated, a hybrid model's Gated DeltaNet states (recurrent
  and convolution tails) replaced, and its first token drawn.
- Decoding (the `decode` program): a `lax.while_loop` of the static sampler's step over all slots,
  each slot with its own step count, until every slot has finished, or some slot has finished while
  prompts wait. The host then reads the finished rows back and inserts the next prompts.
Why not per-row write slots: each row writing at its own position needs a scatter in every
attention layer's cache write (a kernel change on every path, the fused ones included); the ring
needs only `reserve`'s visibility of one decode token, and keeps one compiled decode step for the
static and the continuous sampler alike.

Randomness is per row, as in `Sampler.generate`: row `i` of a call draws from `fold_in(key, i)`,
its noise for all its steps (`processors.noise_for(..., max_new_tokens)`) made when it is inserted
and kept with its slot, indexed by the row's own step. So a row's tokens do not depend on the slot
count, on which slot or when it ran, or on the mesh, and the same key gives the same tokens as the
static sampler for the same prompts in the same order and the same `max_new_tokens`.

Decoding runs on rollout weights like the static sampler's (`RolloutWeights`: cast to the rollout
dtype, laid out by the rollout rules), with their step and cache layout: the layer scan over a stacked
`KVCache` (`StackedWeights`, the accelerator default) or the per-layer copies over a `LayerKVCache`
(`LayerCopies`, the CPU default, where the scan copies every layer's keys and values at every step).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, Key

from sdft_jax.distributed import put, to_host
from sdft_jax.models.attention import KVCache, LayerKVCache
from sdft_jax.models.sharding import activation_sharding, constrain
from sdft_jax.models.transformer import Transformer, positions_from_mask
from sdft_jax.padding import bucket_length, pad_rows
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.sampling import processors
from sdft_jax.sampling.rollout_weights import RolloutWeights, RolloutWeightsConfig, sharding_key
from sdft_jax.sampling.sampler import IMPLEMENTATIONS, SampleOutput, SamplingConfig, cache_length, check_prompts
from sdft_jax.validation import check_int

log = logging.getLogger(__name__)


@pytree_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Pool:
    """The decode slots between programs: B slots, N = max_new_tokens, S ring slots per row.

    A slot is `done` when free or when its row has finished (a stop id, or its `limit` of new
    tokens); a done slot is frozen like a finished row of the static sampler. `step` is the next new
    token a running row draws (= the tokens drawn so far, its length); `token` the last one drawn,
    fed at the next step at RoPE position `prompt_len + step - 1`. The output buffers hold the slot's
    current row, column t once its step t has run.
    """

    cache: KVCache | LayerKVCache
    noise: Float[Array, "B N 2"] | None  # each slot's row's uniforms for all its steps (None: greedy)
    step: Int[Array, "B"]
    token: Int[Array, "B"]
    prompt_len: Int[Array, "B"]
    limit: Int[Array, "B"]
    done: Bool[Array, "B"]
    stopped: Bool[Array, "B"]
    tokens: Int[Array, "B N"]
    sampling_logprobs: Float[Array, "B N"]
    model_logprobs: Float[Array, "B N"]
    logits: Float[Array, "B N V"] | None  # only with keep_logits


def _laid_out(pool: Pool, weights: RolloutWeights) -> Pool:
    """The pool pinned to its layout under `activation_sharding`: split over the batch axes (the
    cache as `weights` lays out the cache it decodes on)."""
    cache = weights.pin_cache(pool.cache)
    rows = {f.name: getattr(pool, f.name) for f in dataclasses.fields(pool) if f.name != "cache"}
    rows = {name: x if x is None else constrain(x, ("batch",) + (None,) * (x.ndim - 1)) for name, x in rows.items()}
    return Pool(cache=cache, **rows)


def empty_pool(weights: RolloutWeights, slots: int, ring: int, cfg: SamplingConfig, keep_logits: bool) -> Pool:
    """A pool of `slots` free slots, each a ring of `ring` cache slots (the cache layout `weights` decode on)."""
    model = weights.model()
    n = cfg.max_new_tokens
    zeros = lambda dtype, *shape: jnp.zeros((slots, *shape), dtype)  # noqa: E731
    return Pool(
        cache=weights.empty_cache(model, slots, ring),
        noise=None if cfg.temperature == 0 else zeros(jnp.float32, n, 2),
        step=zeros(jnp.int32), token=zeros(jnp.int32), prompt_len=zeros(jnp.int32), limit=zeros(jnp.int32),
        done=jnp.ones((slots,), bool), stopped=zeros(bool), tokens=zeros(jnp.int32, n),
        sampling_logprobs=zeros(jnp.float32, n), model_logprobs=zeros(jnp.float32, n),
        logits=zeros(jnp.float32, n, model.cfg.vocab_size) if keep_logits else None,
    )


def _emit(pool: Pool, logits: Float[Array, "B V"], active: Bool[Array, "B"], *, cfg: SamplingConfig,
          stop: Int[Array, "K"], pad_id: int) -> Pool:
    """Draws token `step` of every `active` slot from `logits`, records it, and moves those slots on."""
    step = pool.step
    column = jnp.minimum(step, cfg.max_new_tokens - 1)  # a finished row's step may be N: it draws nothing
    noise = None if pool.noise is None else jnp.take_along_axis(pool.noise, column[:, None, None], axis=1)[:, 0]
    token, sampling_lp, model_lp = processors.sample_tokens(noise, logits, temperature=cfg.temperature,
                                                            top_p=cfg.top_p, top_k=cfg.top_k)
    token = jnp.where(active, token, pad_id)
    at = (jnp.arange(cfg.max_new_tokens)[None, :] == step[:, None]) & active[:, None]  # [B, N]
    record = lambda buffer, value: jnp.where(at, value[:, None], buffer)  # noqa: E731
    logits_buffer = None
    if pool.logits is not None:
        logits_buffer = jnp.where(at[:, :, None], logits[:, None, :], pool.logits)
    hit = active & jnp.any(token[:, None] == stop[None, :], axis=1)
    step = step + active
    return dataclasses.replace(
        pool, step=step, token=jnp.where(active, token, pool.token), done=pool.done | hit | (step >= pool.limit),
        stopped=pool.stopped | hit, tokens=record(pool.tokens, token),
        sampling_logprobs=record(pool.sampling_logprobs, sampling_lp),
        model_logprobs=record(pool.model_logprobs, model_lp), logits=logits_buffer)


def insert(
    weights: RolloutWeights, pool: Pool, prompt_tokens: Int[Array, "K P"],
    prompt_mask: Bool[Array, "K P"], slots: Int[Array, "K"], row_ids: Int[Array, "K"], limits: Int[Array, "K"],
    key: Key[Array, ""], *, cfg: SamplingConfig, stop_ids: Sequence[int], pad_id: int,
) -> Pool:
    """Prefills K LEFT-padded prompts into the pool's slots `slots` and draws each one's first token
    (pure, traceable). A slot index out of range (>= B) drops that row: count padding. `row_ids`
    name each row's random stream, `limits` its most new tokens (<= `cfg.max_new_tokens`)."""
    model = weights.model()
    k, width = prompt_tokens.shape
    ring = pool.cache.max_len
    small = weights.empty_cache(model, k, width)
    hidden, small = weights.decode_step(model, width)(prompt_tokens, positions_from_mask(prompt_mask), prompt_mask,
                                                      small)
    logits = model.logits(hidden[:, -1])  # left padding: every row's last prompt token

    # Column c of the prefill goes to ring slot (index - width + c) mod S: the prompt ends just
    # before the shared write index, where the row's first fed token goes.
    column = (jnp.arange(ring) - (pool.cache.index - width)) % ring
    inside = column < width
    column = jnp.minimum(column, width - 1)
    cache = _put_rows(pool.cache, small, slots, column, model.cfg.num_kv_heads)
    cache = dataclasses.replace(
        cache, valid=cache.valid.at[slots].set(jnp.take(prompt_mask, column, axis=1) & inside[None], mode="drop"))

    n = cfg.max_new_tokens
    set_rows = lambda buffer, value: buffer.at[slots].set(value, mode="drop")  # noqa: E731
    noise = pool.noise
    if noise is not None:
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
        noise = set_rows(noise, processors.noise_for(row_keys, n))
    zeros = lambda dtype, *shape: jnp.zeros((k, *shape), dtype)  # noqa: E731
    pool = dataclasses.replace(
        pool, cache=cache, noise=noise, step=set_rows(pool.step, zeros(jnp.int32)),
        token=set_rows(pool.token, jnp.full((k,), pad_id, jnp.int32)),
        prompt_len=set_rows(pool.prompt_len, jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)),
        limit=set_rows(pool.limit, limits), done=set_rows(pool.done, zeros(bool)),
        stopped=set_rows(pool.stopped, zeros(bool)), tokens=set_rows(pool.tokens, jnp.full((k, n), pad_id, jnp.int32)),
        sampling_logprobs=set_rows(pool.sampling_logprobs, zeros(jnp.float32, n)),
        model_logprobs=set_rows(pool.model_logprobs, zeros(jnp.float32, n)),
        logits=None if pool.logits is None else set_rows(pool.logits, zeros(jnp.float32, *pool.logits.shape[1:])))
    batch = pool.step.shape[0]
    inserted = jnp.zeros((batch,), bool).at[slots].set(True, mode="drop")
    all_logits = jnp.zeros((batch, logits.shape[-1]), logits.dtype).at[slots].set(logits, mode="drop")
    stop = jnp.asarray(sorted(set(int(i) for i in stop_ids)), jnp.int32)
    return _emit(pool, all_logits, inserted, cfg=cfg, stop=stop, pad_id=pad_id)


def _put_rows(cache: KVCache | LayerKVCache, small: KVCache | LayerKVCache, slots: Int[Array, "K"],
              column: Int[Array, "S"], kv_heads: int) -> KVCache | LayerKVCache:
    """`cache` with rows `slots` (out of range: dropped) holding `small`'s K rows, ring slot s taking
    `small`'s slot `column[s]`, and their Gated DeltaNet states replaced."""
    def put(buffer: Array, rows: Array, axis: int = 0) -> Array:  # rows of `buffer` along `axis`
        at = (slice(None),) * axis + (slots,)
        return buffer.at[at].set(rows.astype(buffer.dtype), mode="drop")

    if isinstance(cache, KVCache):  # [L, B, S, Hkv, hd]; DeltaNet states [Ld, B, ...]
        k, v = (put(c, jnp.take(n, column, axis=2), axis=1) for c, n in ((cache.k, small.k), (cache.v, small.v)))
        linear = None if cache.linear is None else jax.tree.map(
            lambda old, new: put(old, new, axis=1), cache.linear, small.linear)
        return dataclasses.replace(cache, k=k, v=v, linear=linear)

    # Per layer: keys [B * Hkv, hd, S], values [B * Hkv, S, hd] (row b's head h at b * Hkv + h);
    # DeltaNet states [B, ...] per layer.
    def per_layer(buffer: Array, rows: Array, length_axis: int) -> Array:
        split = lambda x: x.reshape(x.shape[0] // kv_heads, kv_heads, *x.shape[1:])  # noqa: E731
        placed = jnp.take(split(rows), column, axis=length_axis + 1)
        return put(split(buffer), placed).reshape(buffer.shape)

    k = tuple(per_layer(c, n, 2) for c, n in zip(cache.k, small.k, strict=True))
    v = tuple(per_layer(c, n, 1) for c, n in zip(cache.v, small.v, strict=True))
    linear = None if cache.linear is None else jax.tree.map(put, cache.linear, small.linear)
    return dataclasses.replace(cache, k=k, v=v, linear=linear)


def decode(weights: RolloutWeights, pool: Pool, waiting: Bool[Array, ""], *,
           cfg: SamplingConfig, stop_ids: Sequence[int], pad_id: int) -> Pool:
    """Decodes every running slot until all are done, or, when prompts are `waiting`, until one is
    (pure, traceable): the static sampler's decode step over the pool, its write index wrapped round."""
    model = weights.model()
    ring = pool.cache.max_len
    step_fn = weights.decode_step(model, ring)
    stop = jnp.asarray(sorted(set(int(i) for i in stop_ids)), jnp.int32)

    def running(pool: Pool) -> Bool[Array, ""]:
        return ~jnp.all(pool.done) & ~(waiting & jnp.any(pool.done))

    def next_token(pool: Pool) -> Pool:
        # The token fed now is new token `step - 1` of its row, at position prompt_len + step - 1.
        active = ~pool.done
        positions = jnp.maximum(pool.prompt_len + pool.step - 1, 0)[:, None]
        hidden, cache = step_fn(pool.token[:, None], positions, active[:, None], pool.cache)
        cache = dataclasses.replace(cache, index=cache.index % ring)
        return _emit(dataclasses.replace(pool, cache=cache), model.logits(hidden[:, 0]), active, cfg=cfg, stop=stop,
                     pad_id=pad_id)

    return jax.lax.while_loop(running, next_token, pool)


class ContinuousSampler:
    """`Sampler.generate`'s contract with continuous batching over a pool of `slots` decode rows.

    `stop_ids`, `pad_id`, `mesh`, `weights` as `Sampler`'s: `weights` makes the rollout weights of a
    model it is handed (dtype, layout rules, and the implementation: the layer scan or the per-layer
    copies, by platform unless set), made anew each call. With a mesh the slots are split over its
    `data` x `fsdp` x `expert` axes (rounded up to a multiple of their size). A call with fewer prompts
    than slots uses the batch bucket of its row count instead. `compilations` counts the programs
    compiled so far (an insert program per count bucket x prompt bucket, a decode program per pool
    shape, each per model graph and sampling settings), `compile_seconds` their time; `chunks` and
    `inserts` count the programs run (the host round trips) in the last call.
    """

    def __init__(self, *, stop_ids: Sequence[int], pad_id: int, slots: int = 16, mesh: Mesh | None = None,
                 weights: RolloutWeightsConfig = RolloutWeightsConfig()):
        check_int("ContinuousSampler.slots", slots, minimum=1)
        self.stop_ids = tuple(sorted(set(int(i) for i in stop_ids)))
        self.pad_id = int(pad_id)
        self.mesh = mesh
        self.spec = weights.spec(mesh)
        self._batch_multiple = 1 if mesh is None else math.prod(
            mesh.shape.get(axis, 1) for axis in ("data", "fsdp", "expert"))
        self.slots = math.ceil(slots / self._batch_multiple) * self._batch_multiple
        self.compilations = 0
        self.compile_seconds = 0.0
        self.chunks = self.inserts = 0
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self._jitted = {
            "insert": jax.jit(self._traced_insert, static_argnames=("cfg",), donate_argnames=("pool",)),
            "decode": jax.jit(self._traced_decode, static_argnames=("cfg",), donate_argnames=("pool",)),
            "empty": jax.jit(self._traced_empty, static_argnames=("cfg", "slots", "ring", "keep_logits")),
        }

    def clear_cache(self) -> None:
        """Nothing to free: a call's pool lives only as long as the call (the `Sampler` interface)."""

    # ---------------------------------------------------------------- traced programs

    def _traced(self, weights, fn, *args, **kwargs):
        if self.mesh is None:
            return _laid_out(fn(weights, *args, **kwargs), weights)
        with activation_sharding(self.mesh, self.spec.rules):
            return _laid_out(fn(weights, *args, **kwargs), weights)

    def _traced_insert(self, weights, pool, tokens, mask, slots, row_ids, limits, key, *, cfg):
        return self._traced(weights, insert, pool, tokens, mask, slots, row_ids, limits, key, cfg=cfg,
                            stop_ids=self.stop_ids, pad_id=self.pad_id)

    def _traced_decode(self, weights, pool, waiting, *, cfg):
        return self._traced(weights, decode, pool, waiting, cfg=cfg, stop_ids=self.stop_ids, pad_id=self.pad_id)

    def _traced_empty(self, weights, *, cfg, slots, ring, keep_logits):
        return self._traced(weights, empty_pool, slots, ring, cfg, keep_logits)

    def _run(self, name: str, args: tuple, **static) -> Pool:
        """Runs program `name` on `args`, compiling it on first use of their shapes and shardings."""
        signature = tuple((x.shape, x.dtype, sharding_key(x.sharding)) for x in jax.tree.leaves(args))
        program_key = (name, tuple(sorted(static.items())), jax.tree.structure(args), signature)
        program = self._programs.get(program_key)
        if program is None:
            start = time.perf_counter()
            program = self._jitted[name].lower(*args, **static).compile()
            seconds = time.perf_counter() - start
            self._programs[program_key] = program
            self.compilations += 1
            self.compile_seconds += seconds
            shapes = ", ".join(f"{k}={v}" for k, v in sorted(static.items()) if k != "cfg")
            if name != "empty":
                shapes = f"slots {args[1].step.shape[0]} x ring {args[1].cache.max_len}"
            if name == "insert":
                shapes += f", {args[2].shape[0]} prompts x {args[2].shape[1]}"
            log.info("continuous sampler: compiled program %d (%s: %s, %d new tokens) in %.1f s", self.compilations,
                     name, shapes, static["cfg"].max_new_tokens, seconds)
        return program(*args)

    # ---------------------------------------------------------------- host loop

    def generate(
        self,
        model: RolloutWeights | Transformer | tuple[nnx.GraphDef, nnx.State],
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        key: Key[Array, ""],
        *,
        keep_logits: bool = False,
        max_new_tokens: Sequence[int] | None = None,
    ) -> SampleOutput:
        """Samples one completion per prompt, as `Sampler.generate` (same errors, same output).

        `model`: the module or its `(graphdef, state)` split (its rollout weights made as `weights`
        says), or rollout weights (e.g. `Sampler.rollout_weights`'s), decoded as they are.

        `max_new_tokens` optionally limits each row to its own number of new tokens (each from 1 to
        `cfg.max_new_tokens`; a row that reaches it ends as by the length limit): a row limited to n
        equals the first n tokens of the unlimited row.
        """
        if isinstance(model, tuple):
            model = nnx.merge(*model)
        weights = model if isinstance(model, RolloutWeights) else IMPLEMENTATIONS[self.spec.layers].make(model,
                                                                                                        self.spec)
        model = weights.model()
        check_prompts(model, prompts, cfg)
        n_new = cfg.max_new_tokens
        limits = [n_new] * len(prompts) if max_new_tokens is None else [int(n) for n in max_new_tokens]
        if len(limits) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
        for i, n in enumerate(limits):
            if not 1 <= n <= n_new:
                raise ValueError(f"max_new_tokens[{i}] = {n}: each row's limit must be in [1, {n_new}] "
                                 f"(cfg.max_new_tokens)")
        # The buckets only choose shapes: programs are shared by configs that differ in them alone.
        program_cfg = dataclasses.replace(cfg, prompt_buckets=(1,), batch_buckets=(1,))
        ring = cache_length(bucket_length(max(map(len, prompts)), cfg.prompt_buckets), n_new)
        batch = min(self.slots, bucket_length(min(len(prompts), cfg.batch_buckets[-1]), cfg.batch_buckets))
        batch = math.ceil(batch / self._batch_multiple) * self._batch_multiple
        key = self._place(key)
        pool = self._run("empty", (weights,), cfg=program_cfg, slots=batch, ring=ring, keep_logits=keep_logits)

        out = _Outputs(len(prompts), n_new, model.cfg.vocab_size if keep_logits else 0, self.pad_id)
        pending = collections.deque(range(len(prompts)))
        slot_row = [-1] * batch  # the prompt each slot decodes (-1: free)
        done = np.ones(batch, bool)
        self.chunks = self.inserts = 0
        while True:
            free = [b for b in range(batch) if done[b]]
            finished = [b for b in free if slot_row[b] >= 0]
            if finished:
                out.collect(pool, finished, [slot_row[b] for b in finished])
                for b in finished:
                    slot_row[b] = -1
            if pending and free:
                rows = [pending.popleft() for _ in range(min(len(free), len(pending)))]
                for b, r in zip(free, rows):
                    slot_row[b] = r
                pool = self._insert(weights, pool, program_cfg, cfg, prompts, rows, free[:len(rows)], limits, key,
                                    batch)
            elif all(done):
                break
            else:
                waiting = self._place(np.asarray(bool(pending)))
                pool = self._run("decode", (weights, pool, waiting), cfg=program_cfg)
                self.chunks += 1
            done = to_host(pool.done)
        return out.result()

    def _insert(self, weights: RolloutWeights, pool: Pool, program_cfg: SamplingConfig, cfg: SamplingConfig,
                prompts: Sequence[Sequence[int]], rows: list[int], slots: list[int], limits: list[int],
                key: Key[Array, ""], batch: int) -> Pool:
        """Runs the insert program for prompts `rows` into pool slots `slots` (count and width bucketed)."""
        count = min(batch, 1 << (len(rows) - 1).bit_length())
        count = math.ceil(count / self._batch_multiple) * self._batch_multiple
        width = bucket_length(max(len(prompts[r]) for r in rows), cfg.prompt_buckets)
        padding = count - len(rows)
        tokens, mask = pad_rows([prompts[r] for r in rows] + [[]] * padding, width, pad_value=self.pad_id,
                                side="left")
        slot_ids = np.asarray(slots + [batch] * padding, np.int32)  # out of range: dropped
        row_ids = np.asarray(rows + [0] * padding, np.int32)
        row_limits = np.asarray([limits[r] for r in rows] + [1] * padding, np.int32)
        args = (weights, pool, *(self._place(x) for x in (tokens, mask, slot_ids, row_ids, row_limits)), key)
        self.inserts += 1
        return self._run("insert", args, cfg=program_cfg)

    def _place(self, x):
        """A host value on the devices: committed to one, or laid out over the mesh (replicated: the
        inserted rows are few; every process passes the same)."""
        if self.mesh is None:
            return jax.device_put(x, jax.devices()[0])
        return put(x, NamedSharding(self.mesh, PartitionSpec()))


class _Outputs:
    """The call's results on the host, filled row by row as slots finish."""

    def __init__(self, rows: int, n_new: int, vocab: int, pad_id: int):
        self.tokens = np.full((rows, n_new), pad_id, np.int32)
        self.lengths = np.zeros(rows, np.int32)
        self.stopped = np.zeros(rows, bool)
        self.sampling_logprobs = np.zeros((rows, n_new), np.float32)
        self.model_logprobs = np.zeros((rows, n_new), np.float32)
        self.logits = np.zeros((rows, n_new, vocab), np.float32) if vocab else None

    def collect(self, pool: Pool, slots: list[int], rows: list[int]) -> None:
        """Copies the finished `slots`' rows out of the pool into rows `rows`."""
        names = ("tokens", "step", "stopped", "sampling_logprobs", "model_logprobs")
        if self.logits is not None:
            names += ("logits",)
        host = to_host({name: getattr(pool, name) for name in names})
        self.tokens[rows] = host["tokens"][slots]
        self.lengths[rows] = host["step"][slots]
        self.stopped[rows] = host["stopped"][slots]
        self.sampling_logprobs[rows] = host["sampling_logprobs"][slots]
        self.model_logprobs[rows] = host["model_logprobs"][slots]
        if self.logits is not None:
            self.logits[rows] = host["logits"][slots]

    def result(self) -> SampleOutput:
        return SampleOutput(tokens=self.tokens, lengths=self.lengths,
                            stop_reasons=["stop_token" if s else "length" for s in self.stopped],
                            sampling_logprobs=self.sampling_logprobs, model_logprobs=self.model_logprobs,
                            logits=self.logits)

