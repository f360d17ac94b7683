"""The pure decode loop: one prefill pass, then one jitted `lax.while_loop` of cached decode steps.

Prompts of different lengths are LEFT-padded into one `[B, P]` batch, so every row's last prompt
token sits in the last column: the prefill reads logits at that column only, and all rows then
write the cache at one shared slot per step (RoPE positions stay per row). The loop stops early once
every row has finished; a finished row is frozen (it emits `pad_id`, log-prob 0, and its length stops
counting). Its state is the `DecodeState` dataclass.

`sample` is traceable inside other jitted code (e.g. a train step that samples on device); the rollout
weights it reads (`rollout_weights.RolloutWeights`) decide how each step reads the layers. The host-side
`sampler.Sampler` buckets, batches, places and keeps the cache between calls.

Randomness is per row: row `i` of a call draws from `fold_in(key, i)` (its noise for all steps is
made before the loop), so its tokens do not depend on which other rows share the batch, on the
bucket, or on the mesh; they do depend on `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Key

from sdft_jax.models.attention import KVCache, LayerKVCache
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.padding import LENGTH_BUCKETS
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.sampling import processors
from sdft_jax.sampling.rollout_weights import RolloutWeights
from sdft_jax.validation import check_increasing, check_int

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


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
    """Cache slots one call needs: the prompt and every new token except the last (never fed back)."""
    return prompt_len + max_new_tokens - 1


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
    weights: RolloutWeights,
    prompt_tokens: Int[Array, "B P"],
    prompt_mask: Bool[Array, "B P"],
    key: Key[Array, ""],
    *,
    cfg: SamplingConfig,
    stop_ids: Sequence[int],
    pad_id: int,
    row_ids: Int[Array, "B"] | None = None,
    cache: KVCache | LayerKVCache | None = None,
    keep_logits: bool = False,
) -> tuple[SampleResult, KVCache | LayerKVCache]:
    """Generates up to `cfg.max_new_tokens` tokens for a LEFT-padded batch of prompts (pure, traceable).

    `weights` are the rollout weights (`rollout_weights.RolloutWeights`): the model, and how the loop reads
    its layers. `prompt_mask` marks real prompt tokens; a row with none is treated as finished from the
    start (used for batch padding). `row_ids` name each row's random stream (default `arange(B)`).
    `cache` (of the weights' `cache_type`, of batch B and at least `cache_length(P, max_new_tokens)`
    slots) is memory to work in, its contents ignored: pass the previous call's to reuse it; a fresh one
    is made when None. Returns the result and the (now used) cache, pinned to its layout. `cfg`,
    `stop_ids`, `pad_id` and `keep_logits` are static; the bucket fields of `cfg` are not used.
    """
    model = weights.model()
    batch, prompt_len = prompt_tokens.shape
    n_new = cfg.max_new_tokens
    settings = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    needed = cache_length(prompt_len, n_new)
    if cache is None:
        cache = weights.empty_cache(model, batch, needed)
    elif not isinstance(cache, weights.cache_type):
        raise ValueError(f"a {type(cache).__name__} does not fit {type(weights).__name__}, which decodes on a "
                         f"{weights.cache_type.__name__}")
    if cache.max_len < needed or cache.valid.shape[0] != batch:
        raise ValueError(f"cache of batch {cache.valid.shape[0]} x {cache.max_len} slots is too small for "
                         f"batch {batch}, prompt {prompt_len} + {n_new} new tokens (needs {needed} slots)")
    # Stale keys and values stay in the buffers; clearing `valid` hides them.
    # A hybrid model's Gated DeltaNet states are summaries, not slots: they start from zero.
    cache = dataclasses.replace(cache, valid=jnp.zeros_like(cache.valid), index=jnp.zeros((), jnp.int32),
                                linear=jax.tree.map(jnp.zeros_like, cache.linear))
    step_fn = weights.decode_step(model, cache.max_len)
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
    # Handed back laid out as `Sampler` makes it, so that the next call's program is this one.
    cache = weights.pin_cache(final.cache)
    result = SampleResult(tokens=final.tokens, lengths=final.lengths, stopped=final.stopped,
                          sampling_logprobs=final.sampling_logprobs, model_logprobs=final.model_logprobs,
                          logits=final.logits)
    return result, cache
