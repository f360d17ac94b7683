"""What the `--config=FILE` commands (`python -m sdft_jax.train`, `python -m sdft_jax.continual`) share.

Both take exactly one flag, an ml_collections config file, and validate it completely before anything
is imported that compiles or loads a model: a mistake costs seconds, and names the key.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

import ml_collections
from absl import app
from absl.flags import FlagHolder

from sdft_jax.config import ConfigError

T = TypeVar("T")


def validated_config(argv: list[str], flag: FlagHolder[ml_collections.ConfigDict], example: str,
                     validate: Callable[[ml_collections.ConfigDict], T]) -> T | None:
    """`validate(flag.value)`, or None after printing why the config is invalid (exit status 2 then).

    Positional arguments and a missing flag are usage errors (`--config=EXAMPLE is required`). Once
    the config is valid, logging is set up for a long run: INFO, except absl's own logger (through
    which orbax logs every file operation at INFO).
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flag.value is None:
        raise app.UsageError(f"--config={example} is required")
    try:
        valid = validate(flag.value)
    except ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return None
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    return valid
