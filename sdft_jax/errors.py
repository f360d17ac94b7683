"""The classes of error a command reports in one line, and the exit status of each.

A run can fail because of what it was given (a config key, a data row, a model directory, a
checkpoint) or because training diverged. Each of these has its own exception class, defined beside
the code that raises it; a command (`sdft_jax.cli.run_main`) prints such an error as one line,
without a traceback, and exits with the class's status below, so a script can tell them apart.
Anything else is a bug: it keeps its traceback and Python's status 1.

This module is a leaf (it imports nothing of ours): the table names the classes by their qualified
names, so the modules that define them need not import each other; tests/errors_test.py checks that
every name resolves to an exception class.

| status | class of error | raised as |
|---|---|---|
| 2 | command-line usage (unknown flag, missing `--config`) | absl `app.UsageError`, argparse |
| 3 | configuration (a key's value, a rule between keys) | `sdft_jax.config.ConfigError` |
| 4 | data (a prompt, dataset row or predictions file) | `sdft_jax.data.records.DataError` |
| 5 | model (a model directory, its config.json or weights) | `sdft_jax.errors.ModelError` |
| 6 | checkpoint (none of a run's checkpoints restores) | `sdft_jax.checkpointing.CheckpointError` |
| 7 | divergence (too many non-finite steps) | `sdft_jax.trainer.DivergedError` |
"""

from __future__ import annotations

import dataclasses

USAGE = 2
CONFIG = 3
DATA = 4
MODEL = 5
CHECKPOINT = 6
DIVERGED = 7


class ModelError(ValueError):
    """A model directory (or file) that cannot be used: missing, unreadable, or not the model it claims
    to be. The message names the file and, where there is one, the key or tensor."""


@dataclasses.dataclass(frozen=True)
class ErrorClass:
    """One class of error: its exit status, what it is called in the one-line message, and the
    qualified names (`module.Class`) of the exceptions that belong to it (subclasses included)."""

    status: int
    label: str
    exceptions: tuple[str, ...]


ERROR_CLASSES: tuple[ErrorClass, ...] = (
    ErrorClass(CONFIG, "invalid config", ("sdft_jax.config.ConfigError",)),
    ErrorClass(DATA, "bad data", ("sdft_jax.data.records.DataError",)),
    ErrorClass(MODEL, "bad model", ("sdft_jax.errors.ModelError",)),
    ErrorClass(CHECKPOINT, "checkpoint error", ("sdft_jax.checkpointing.CheckpointError",)),
    ErrorClass(DIVERGED, "training diverged", ("sdft_jax.trainer.DivergedError",)),
)


def classify(error: BaseException) -> ErrorClass | None:
    """The class `error` belongs to (by its type or any base of it), or None for an unexpected error."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(error).__mro__}
    for error_class in ERROR_CLASSES:
        if names.intersection(error_class.exceptions):
            return error_class
    return None
