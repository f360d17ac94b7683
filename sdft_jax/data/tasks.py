"""One way to get the records of any task: offline tasks are generated, the others read from disk
(a remote `data_dir`, `gs://...`, is downloaded once into the local cache first); all at once
(`load_task`) or as a stream read again on every pass (`open_task`, the trainer's `data.streaming`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

from sdft_jax import storage
from sdft_jax.data import offline_tasks
from sdft_jax.data.readers import read_task, stream_task
from sdft_jax.data.records import ReadResult, Record, Skip

log = logging.getLogger(__name__)


def load_task(
    task: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    offline: offline_tasks.OfflineTaskConfig = offline_tasks.OfflineTaskConfig(),
    **read_options: Any,
) -> ReadResult:
    """The records of an offline task (generated from `offline`; nothing skipped) or of an upstream /
    JSONL task read from `data_dir` with `read_task(..., **read_options)`, with the bad rows it skipped
    by reason (logged with their counts)."""
    if task in offline_tasks.TASK_NAMES:
        return ReadResult(records=offline_tasks.make_task(task, split, offline))
    _check_data_dir(task, data_dir)
    result = read_task(storage.local_copy(data_dir), task, split, **read_options)
    if result.num_skipped:
        log.warning("%s/%s: skipped %d bad rows %s", task, split, result.num_skipped, dict(result.skipped))
    return result


def _check_data_dir(task: str, data_dir: str | os.PathLike | None) -> None:
    if not data_dir:
        raise ValueError(f"task {task!r} needs a data directory (the folder holding {task}_data/)")


def load_records(task: str, split: str, **options: Any) -> list[Record]:
    """The records of `load_task(task, split, **options)`."""
    return list(load_task(task, split, **options).records)


class Records(Protocol):
    """A task split that can be read again from its start (`RecordStream`, or generated records); a bad row
    skipped is yielded as a `Skip` in its place."""

    def open(self) -> Iterator[Record | Skip]: ...


class _Generated:
    def __init__(self, records: tuple[Record, ...]):
        self.records = records

    def open(self) -> Iterator[Record]:
        return iter(self.records)


def open_task(
    task: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    offline: offline_tasks.OfflineTaskConfig = offline_tasks.OfflineTaskConfig(),
    **read_options: Any,
) -> Records:
    """The records of `task`'s `split` as `load_task` gives them, read as a stream: each `open()` reads
    the source again from its start (an offline task's generated records are held: they are small)."""
    if task in offline_tasks.TASK_NAMES:
        return _Generated(offline_tasks.make_task(task, split, offline))
    _check_data_dir(task, data_dir)
    return stream_task(storage.local_copy(data_dir), task, split, **read_options)
