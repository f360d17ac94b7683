"""The host-side sampler: host lists of token ids in, numpy out, over the pure decode loop (`decode.sample`).

`Sampler.generate(model or rollout weights, prompts, cfg, key)` rounds the batch and prompt length up
to buckets so a run compiles a handful of programs, jits over the weights with the model's graph static
(the weights change every step, the program does not), donates the KV cache back into the next call
of the same shape, keeps the rollout weights (`rollout_weights`) for as long as the model's weights
stay the same arrays, and splits the batch over the mesh's data axes.

The names other parts use from the sampling package are here too: `SamplingConfig`, `SampleResult`,
`cache_length`, `sample` (`decode.py`), and `decode_step` (`rollout_weights.py`).
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
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Int, Key

from sdft_jax.distributed import put, to_host
from sdft_jax.models.attention import KVCache, LayerKVCache
from sdft_jax.models.sharding import activation_sharding, logical_sharding
from sdft_jax.models.transformer import Transformer
from sdft_jax.padding import bucket_length, pad_rows
from sdft_jax.sampling.decode import (DEFAULT_BATCH_BUCKETS, DEFAULT_PROMPT_BUCKETS, SampleResult, SamplingConfig,
                                      cache_length, sample)
from sdft_jax.sampling.layer_copies import LayerCopies
from sdft_jax.sampling.rollout_weights import (RolloutWeights, RolloutWeightsConfig, StackedWeights, decode_step,
                                               sharding_key)

__all__ = ["DEFAULT_BATCH_BUCKETS", "DEFAULT_PROMPT_BUCKETS", "SampleOutput", "SampleResult", "Sampler",
           "SamplingConfig", "cache_length", "decode_step", "sample"]

log = logging.getLogger(__name__)

StopReason = Literal["stop_token", "length"]

# The implementations of `RolloutWeights`, by `RolloutWeightsConfig.layers`.
IMPLEMENTATIONS: dict[str, type[RolloutWeights]] = {"stacked": StackedWeights, "copies": LayerCopies}


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


@dataclasses.dataclass(frozen=True)
class _Kept:
    """Rollout weights and (weakly) the arrays of the model they were made from."""

    weights: RolloutWeights
    source: tuple[weakref.ref, ...]

    def made_from(self, leaves: Sequence[jax.Array]) -> bool:
        # jax arrays are immutable: the same live objects hold the same values.
        return len(leaves) == len(self.source) and all(
            ref() is x and not x.is_deleted() for ref, x in zip(self.source, leaves, strict=True))


def check_prompts(model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> int:
    """Raises ValueError, naming the row, for no prompts, an empty prompt, one above the largest prompt
    bucket, prompt + max_new_tokens above the model's max_position_embeddings, or ids outside the
    vocabulary; returns the prompt bucket they fit. Both samplers' rules."""
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


class Sampler:
    """Generates from token-id prompts with whatever model (full or LoRA, sharded or not) it is handed.

    `stop_ids` end a row (EOS, `<|im_end|>`, ...; may be empty); `pad_id` fills the batch and the
    output after each row's end. `weights` says what the rollout weights are (dtype, layout rules and
    implementation: `RolloutWeightsConfig`, resolved for the mesh's platform as `spec`). With a `mesh`,
    the batch is split over its `data` x `fsdp` x `expert` axes (batch buckets are rounded up to a
    multiple of that size), the weights are laid out by the rollout rules, and the program is traced
    under them. `compilations` counts the programs compiled so far (one per batch bucket x prompt bucket
    x model graph x sampling settings) and `compile_seconds` the time they took; each new one is logged
    at INFO.

    With `keep_cache` a call's KV cache stays allocated and is donated to the next call of the same
    shape (no allocation per call), and the rollout weights are kept and reused while the model's
    weights are the same arrays (an evaluation's many calls make them once; a train loop, whose step
    replaces the weights, once per step: `weights_made` counts them); new per-layer copies are written
    into the kept ones' memory. `clear_cache()` frees both.
    """

    def __init__(self, *, stop_ids: Sequence[int], pad_id: int, mesh: Mesh | None = None,
                 weights: RolloutWeightsConfig = RolloutWeightsConfig(), keep_cache: bool = True):
        self.stop_ids = tuple(sorted(set(int(i) for i in stop_ids)))
        self.pad_id = int(pad_id)
        self.mesh = mesh
        self.spec = weights.spec(mesh)
        self.keep_cache = keep_cache
        self.compilations = 0
        self.compile_seconds = 0.0
        self.weights_made = 0
        self._batch_multiple = 1 if mesh is None else math.prod(
            mesh.shape.get(axis, 1) for axis in ("data", "fsdp", "expert"))
        self._cache: KVCache | LayerKVCache | None = None  # donated into the next same-shape call
        self._weights: _Kept | None = None
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self._jitted = jax.jit(self._traced, static_argnames=("cfg", "keep_logits"), donate_argnames=("cache",))

    def rollout_weights(self, model: Transformer | tuple[nnx.GraphDef, nnx.State]) -> RolloutWeights:
        """The weights the sampler reads for `model` (the module or its `(graphdef, state)` split): cast
        and laid out as `spec` says, by one jitted function. The kept ones when they were made from these
        very arrays; else new ones (kept, with `keep_cache`, until other weights or `clear_cache`)."""
        if isinstance(model, tuple):
            model = nnx.merge(*model)
        source = jax.tree.leaves(nnx.state(model))
        kept, self._weights = self._weights, None
        if kept is not None and kept.made_from(source):
            self._weights = kept
            return kept.weights
        # Weights that can take the old ones' memory get them; other old weights are freed first.
        into = kept.weights if kept is not None and kept.weights.writes_into else None
        del kept
        weights = IMPLEMENTATIONS[self.spec.layers].make(model, self.spec, into=into)
        del into
        self.weights_made += 1
        if self.keep_cache:
            self._weights = _Kept(weights=weights, source=tuple(weakref.ref(x) for x in source))
        return weights

    def _traced(self, weights: RolloutWeights, tokens: Int[Array, "B P"], mask: Bool[Array, "B P"],
                row_ids: Int[Array, "B"], key: Key[Array, ""], cache: KVCache | LayerKVCache, *, cfg: SamplingConfig,
                keep_logits: bool) -> tuple[SampleResult, KVCache | LayerKVCache]:
        """`sample` with this sampler's settings, traced under its mesh's activation sharding."""
        kwargs = dict(cfg=cfg, stop_ids=self.stop_ids, pad_id=self.pad_id, row_ids=row_ids, cache=cache,
                      keep_logits=keep_logits)
        if self.mesh is None:
            return sample(weights, tokens, mask, key, **kwargs)
        with activation_sharding(self.mesh, self.spec.rules):
            return sample(weights, tokens, mask, key, **kwargs)

    def _program(self, args: tuple, cfg: SamplingConfig, keep_logits: bool) -> jax.stages.Compiled:
        """The compiled program for these arguments' graph, shapes, dtypes and shardings (compiled on first use)."""
        # The buckets only chose the shapes, which the signature holds: configs that differ only in
        # their buckets share programs.
        cfg = dataclasses.replace(cfg, prompt_buckets=DEFAULT_PROMPT_BUCKETS, batch_buckets=DEFAULT_BATCH_BUCKETS)
        signature = tuple((x.shape, x.dtype, sharding_key(x.sharding)) for x in jax.tree.leaves(args))
        program_key = (cfg, keep_logits, jax.tree.structure(args), signature)  # the structure holds the graph
        program = self._programs.get(program_key)
        if program is None:
            start = time.perf_counter()
            program = self._jitted.lower(*args, cfg=cfg, keep_logits=keep_logits).compile()
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
        """Frees the KV cache and the rollout weights kept for the next call (e.g. before a memory-hungry
        train step)."""
        self._cache = self._weights = None

    @property
    def kept_cache(self) -> KVCache | LayerKVCache | None:
        """The KV cache kept for the next call of the same shape (donated to it), if any."""
        return self._cache

    @property
    def kept_weights(self) -> RolloutWeights | None:
        """The rollout weights kept for the next call on the same model weights, if any."""
        return None if self._weights is None else self._weights.weights

    def has_weights_of(self, model: Transformer) -> bool:
        """Whether the kept rollout weights were made from `model`'s weights as they are now (the very
        arrays, none deleted since), i.e. whether a call with `model` reuses them."""
        return self._weights is not None and self._weights.made_from(jax.tree.leaves(nnx.state(model)))

    def generate(
        self,
        model: RolloutWeights | Transformer | tuple[nnx.GraphDef, nnx.State],
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        key: Key[Array, ""],
        *,
        keep_logits: bool = False,
    ) -> SampleOutput:
        """Samples one completion per prompt (token ids, any lengths) with the model's current weights.

        `model` is rollout weights (`rollout_weights`, made once for many calls), or the module or its
        `(graphdef, state)` split (e.g. from a train state), whose rollout weights are then made (or the
        kept ones reused). Batches above the largest batch bucket run as several calls. `keep_logits`
        also returns every step's logits. Raises ValueError for an empty prompt, a prompt above the
        largest prompt bucket, or prompt + max_new_tokens above the model's max_position_embeddings,
        naming the row.
        """
        weights = model if isinstance(model, RolloutWeights) else self.rollout_weights(model)
        rollout_model = weights.model()
        prompt_len = check_prompts(rollout_model, prompts, cfg)
        largest = max(self._batch_bucket(b, cfg) for b in cfg.batch_buckets)
        parts = []
        for start in range(0, len(prompts), largest):
            chunk = prompts[start:start + largest]
            parts.append(self._run(weights, rollout_model, chunk, start, prompt_len, cfg, key, keep_logits))
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return SampleOutput(
            tokens=cat("tokens"), lengths=cat("lengths"),
            stop_reasons=["stop_token" if s else "length" for s in cat("stopped")],
            sampling_logprobs=cat("sampling_logprobs"), model_logprobs=cat("model_logprobs"),
            logits=cat("logits") if keep_logits else None,
        )

    def _batch_bucket(self, batch: int, cfg: SamplingConfig) -> int:
        """The batch bucket of `batch` rows (the largest bucket for more), rounded up to a multiple of
        the data-parallel size."""
        bucket = bucket_length(min(batch, cfg.batch_buckets[-1]), cfg.batch_buckets)
        return math.ceil(bucket / self._batch_multiple) * self._batch_multiple

    def _run(self, weights: RolloutWeights, model: Transformer, prompts: Sequence[Sequence[int]], start: int,
             prompt_len: int, cfg: SamplingConfig, key: Key[Array, ""], keep_logits: bool) -> SampleResult:
        """One call of the compiled program on at most the largest batch bucket; host arrays back."""
        batch = self._batch_bucket(len(prompts), cfg)
        rows = [*prompts, *[[]] * (batch - len(prompts))]  # batch padding: rows without a token
        tokens, mask = pad_rows(rows, prompt_len, pad_value=self.pad_id, side="left")
        row_ids = np.arange(start, start + batch, dtype=np.int32)
        tokens, mask, row_ids, key = self._place(tokens, mask, row_ids, key)
        cache = self._take_cache(weights, model, batch, cache_length(prompt_len, cfg.max_new_tokens))
        args = (weights, tokens, mask, row_ids, key, cache)
        result, cache = self._program(args, cfg, keep_logits)(*args)
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
        two = logical_sharding(("batch", "length"), tokens.shape, self.mesh, self.spec.rules)
        one = logical_sharding(("batch",), row_ids.shape, self.mesh, self.spec.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        # Every process passes the same prompts; each fills only its own devices' rows.
        return (put(tokens, two), put(mask, two), put(row_ids, one), put(key, replicated))

    def _take_cache(self, weights: RolloutWeights, model: Transformer, batch: int,
                    length: int) -> KVCache | LayerKVCache:
        """The kept cache when it fits this call exactly (type, shapes, dtypes), else a new one of the
        weights' layout (the old one is freed first)."""
        make = functools.partial(weights.empty_cache, model, batch, length)
        wanted = jax.eval_shape(make)
        old, self._cache = self._cache, None
        def layout(tree) -> tuple:
            return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]

        if old is not None and layout(old) == layout(wanted):
            return old
        del old
        if self.mesh is None:
            return jax.device_put(jax.jit(make)(), jax.devices()[0])
        with activation_sharding(self.mesh, self.spec.rules):
            return jax.jit(lambda: weights.pin_cache(make()))()
