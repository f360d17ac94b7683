"""The local cache directory and crash-safe directory writes.

A directory is built under a temporary name beside its target and renamed into place only when
complete, so a crash (or a concurrent builder) never leaves a half-written directory that a later run
would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

CACHE_ENV = "SDFT_JAX_CACHE"


def cache_root() -> str:
    """`$SDFT_JAX_CACHE`, else `~/.cache/sdft_jax`."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sdft_jax")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[str]:
    """Yields a fresh temporary directory that becomes `target` when the block exits without error.

    If `target` appears meanwhile (another process finished first), the new copy is discarded.
    """
    target = os.fspath(target)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary shared directory
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
