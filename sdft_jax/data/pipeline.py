"""The input pipeline: shuffled, repeated, batched prompt items, sharded over hosts, resumable.

Built on Grain's `MapDataset`: a seeded global shuffle that changes every epoch, repeated for a number
of epochs, cut into global batches (batches may span an epoch boundary; an incomplete last batch is
dropped). Every host builds the same global batches and keeps its own disjoint slice of each.

The iterator state is a small JSON-serialisable dict (the index of the next global batch plus what
the order depends on). It names a global batch, not a host's position, so a run resumed on a different
number of hosts continues with exactly the next global batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import grain
import jax

_log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """What the order of items depends on.

    Attributes:
      global_batch_size: items per step over all hosts; a multiple of the number of hosts.
      seed: the shuffle seed; each epoch is shuffled differently from it.
      num_epochs: passes over the items; None repeats forever.
      shuffle: shuffle the items (off: epochs repeat the input order).
    """

    global_batch_size: int
    seed: int = 0
    num_epochs: int | None = 1
    shuffle: bool = True

    def __post_init__(self):
        if self.global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {self.global_batch_size}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {self.num_epochs}")


class BatchIterator(Generic[T]):
    """This host's slices of successive global batches, with a saveable position.

    `next()` returns a list of `global_batch_size // process_count` items. `items` is any random-access
    source with a length: a list, or a `datasets.Dataset` (rows are then read from its memory-mapped
    Arrow files as batches are made, never all at once).
    """

    def __init__(self, items: Sequence[T], config: PipelineConfig, *, process_index: int | None = None,
                 process_count: int | None = None):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        if config.global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} is not a multiple of {self.process_count} hosts")
        if not items:
            raise ValueError("no items to iterate over")
        self.config = config
        self.num_items = len(items)
        self.per_host = config.global_batch_size // self.process_count
        self._dataset = _global_batches(items, config)
        if len(self._dataset) == 0:
            raise ValueError(f"{self.num_items} items x {config.num_epochs} epoch(s) do not fill one global "
                             f"batch of {config.global_batch_size}")
        if config.num_epochs is not None:
            left = (self.num_items * config.num_epochs) % config.global_batch_size
            if left:
                _log.info("the last %d item(s) of the last epoch do not fill a global batch and are not used", left)
        self._next = 0

    @property
    def num_batches(self) -> int | None:
        """Global batches in the whole run; None when repeating forever."""
        return None if self.config.num_epochs is None else len(self._dataset)

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self._next * self.config.global_batch_size / self.num_items

    def __iter__(self) -> Iterator[list[T]]:
        return self

    def __next__(self) -> list[T]:
        if self.num_batches is not None and self._next >= self.num_batches:
            raise StopIteration
        batch = self._dataset[self._next]
        self._next += 1
        lo = self.process_index * self.per_host
        return batch[lo:lo + self.per_host]

    def get_state(self) -> dict[str, Any]:
        """The position (JSON-serialisable): restoring it continues with exactly the next global batch."""
        return {"next_batch": self._next, **self._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position from `get_state`; raises ValueError if the pipeline differs from it."""
        check_fingerprint(state, self._fingerprint())
        next_batch = state.get("next_batch")
        if not isinstance(next_batch, int) or next_batch < 0 or (
                self.num_batches is not None and next_batch > self.num_batches):
            raise ValueError(f"invalid next_batch {next_batch!r} in iterator state")
        self._next = next_batch

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"num_items": self.num_items, "global_batch_size": c.global_batch_size, "seed": c.seed,
                "num_epochs": c.num_epochs, "shuffle": c.shuffle}


def check_fingerprint(state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raises ValueError unless iterator `state` was saved by a pipeline with the fingerprint `expected`
    (what the order of its items depends on)."""
    got = {k: state.get(k) for k in expected}
    if got != expected:
        raise ValueError(f"iterator state is for a different pipeline: {got} vs this {expected}")


def _global_batches(items: Sequence[T], config: PipelineConfig) -> grain.MapDataset:
    ds = grain.MapDataset.source(items)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    # reseed_each_epoch: every epoch gets its own order, derived from the one seed.
    ds = ds.repeat(config.num_epochs, reseed_each_epoch=True)
    return ds.batch(config.global_batch_size, drop_remainder=True, batch_fn=list)
