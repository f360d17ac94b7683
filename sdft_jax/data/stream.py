"""The input pipeline of a streamed training split (`data.streaming`): never held whole, resumable.

The counterpart of `pipeline.BatchIterator`, which shuffles globally over items it can index (a list,
or a memory-mapped `datasets.Dataset`). Here the items come from `open_items()`, an iterator that
reads the source again from its start (a file larger than memory, a streamed `datasets` source), and
are rendered as they are read. Built on Grain's `IterDataset`:

  epochs:   the passes one after the other (`num_epochs`, None = forever); its position is
            (epoch, elements read of it), and restoring it reads that epoch again up to the position.
            A `Skip` the source yields in place of an element (a bad row, a dropped prompt) is counted
            by reason in the same state (`skipped`), so a resumed run counts as an uninterrupted one.
  shuffle:  Grain's window shuffle: `shuffle_window` items at a time, each window in its own order
            (windows run on across an epoch boundary, so every epoch's order differs).
  batch:    global batches of `global_batch_size` items (an incomplete last batch is dropped).

Every host reads the same stream and yields the same whole global batch, in the same order (the
trainer samples every global batch on the whole mesh). The state is a small JSON-serialisable dict:
Grain's (the window's start position and the place in it) plus what the order depends on; a resume
reads the source again up to the current window's start, so it costs one pass over what was read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import grain
from grain.experimental import WindowShuffleIterDataset

from sdft_jax.data.pipeline import check_fingerprint
from sdft_jax.data.records import Skip
from sdft_jax.validation import check_int

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """What the order of a streamed split's items depends on.

    Attributes:
      global_batch_size: items per step over all hosts.
      seed: the window shuffle's seed (window i is shuffled with seed + i).
      num_epochs: passes over the items; None repeats forever.
      shuffle_window: items shuffled together (1 = the source's order). Larger mixes better and holds
        more items in memory.
    """

    global_batch_size: int
    seed: int = 0
    num_epochs: int | None = None
    shuffle_window: int = 10_000

    def __post_init__(self):
        check_int("StreamConfig.global_batch_size", self.global_batch_size, minimum=1)
        check_int("StreamConfig.seed", self.seed)
        if self.num_epochs is not None:
            check_int("StreamConfig.num_epochs", self.num_epochs, minimum=1, hint="None = forever")
        check_int("StreamConfig.shuffle_window", self.shuffle_window, minimum=1)


class _Epochs(grain.IterDataset):
    """The items of `open_items()`, pass after pass."""

    def __init__(self, open_items: Callable[[], Iterator[Any]], num_epochs: int | None):
        super().__init__()
        self._open_items = open_items
        self._num_epochs = num_epochs

    def __iter__(self) -> _EpochsIterator:
        self.reader = _EpochsIterator(self._open_items, self._num_epochs)  # the latest, for its epoch
        return self.reader

    def __str__(self) -> str:
        return "StreamEpochs"


class _EpochsIterator(grain.DatasetIterator):
    def __init__(self, open_items: Callable[[], Iterator[Any]], num_epochs: int | None):
        super().__init__()
        self._open_items = open_items
        self._num_epochs = num_epochs
        self._epoch, self._position, self._kept = 0, 0, 0  # kept: items (not skips) of this pass
        self._skipped: dict[str, int] = {}
        self._items: Iterator[Any] | None = None

    def _read(self) -> Any:
        """The next element of the current pass (an item or a `Skip`); StopIteration at its end."""
        if self._items is None:
            self._items = self._open_items()
        element = next(self._items)
        self._position += 1
        if isinstance(element, Skip):
            self._skipped[element.reason] = self._skipped.get(element.reason, 0) + 1
        else:
            self._kept += 1
        return element

    def __next__(self):
        while self._num_epochs is None or self._epoch < self._num_epochs:
            try:
                element = self._read()
            except StopIteration:
                if not self._kept:  # an empty pass: repeating it would never end
                    raise ValueError(f"the streamed split yielded no items (skipped: {self._skipped})") from None
                self._epoch, self._position, self._kept, self._items = self._epoch + 1, 0, 0, None
                continue
            if not isinstance(element, Skip):
                return element
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, "skipped": dict(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        epoch, position = state["epoch"], state["position"]
        self._epoch, self._position, self._kept, self._items = epoch, 0, 0, None
        self._skipped = {}
        if self._num_epochs is None or epoch < self._num_epochs:
            for _ in range(position):  # read the pass again up to the position
                try:
                    self._read()
                except StopIteration:
                    raise ValueError(f"iterator state is past the end of the streamed split: epoch {epoch} has "
                                     f"{self._position} elements, the state says {position} were read") from None
        self._skipped = dict(state["skipped"])  # what the state counted, the pass read again included


class StreamBatchIterator(Generic[T]):
    """Successive whole global batches of a streamed split, with a saveable position.

    `next()` returns a list of `global_batch_size` items, the same on every host. `open_items` reads
    the split from its start each time it is called (see the module docstring).
    """

    def __init__(self, open_items: Callable[[], Iterator[T]], config: StreamConfig):
        self.config = config
        self._epochs = _Epochs(open_items, config.num_epochs)
        ds: grain.IterDataset = self._epochs
        if config.shuffle_window > 1:
            ds = WindowShuffleIterDataset(ds, window_size=config.shuffle_window, seed=config.seed)
        ds = ds.batch(config.global_batch_size, drop_remainder=True, batch_fn=list)
        self._iterator = ds.__iter__()
        self._next = 0

    @property
    def batches_done(self) -> int:
        return self._next

    @property
    def skipped(self) -> dict[str, int]:
        """The `Skip`s read so far, by reason (the reader runs up to a shuffle window ahead of the batches)."""
        return dict(self._epochs.reader.get_state()["skipped"])

    @property
    def epoch(self) -> float:
        """The pass the reader is in (0 first; it reads up to a shuffle window ahead of the batches)."""
        return float(self._epochs.reader.get_state()["epoch"])

    def __iter__(self) -> Iterator[list[T]]:
        return self

    def __next__(self) -> list[T]:
        batch = next(self._iterator)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """The position (JSON-serialisable): restoring it continues with exactly the next global batch."""
        return {"next_batch": self._next, "stream": self._iterator.get_state(), **self._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position from `get_state`; raises ValueError if the pipeline differs from it."""
        check_fingerprint(state, self._fingerprint())
        next_batch = state.get("next_batch")
        if not isinstance(next_batch, int) or next_batch < 0 or not isinstance(state.get("stream"), dict):
            raise ValueError(f"invalid streamed iterator state {state!r}")
        self._iterator.set_state(state["stream"])
        self._next = next_batch

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"streamed": True, "global_batch_size": c.global_batch_size, "seed": c.seed,
                "num_epochs": c.num_epochs, "shuffle_window": c.shuffle_window}
