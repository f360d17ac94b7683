"""The local cache directory and crash-safe file and directory writes.

A file or directory is built under a temporary name beside its target (`.{name}.partial-XXXX`) and
renamed into place only when complete, so a crash (or a concurrent builder) never leaves a half-written
file or directory that a later run would trust. What a killed process leaves under such a name is
never read; `remove_partials` deletes it at the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

CACHE_ENV = "SDFT_JAX_CACHE"
PARTIAL = ".partial-"  # the infix of a temporary name: `.{name}.partial-XXXX` beside `name`

_UMASK = os.umask(0o22)
os.umask(_UMASK)  # read once: the mode an ordinary `open(..., "w")` would give a new file


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
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{PARTIAL}", dir=parent)
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


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `target` that replaces `target` when the block exits without error.

    The block writes the whole file there; it is synced to disk and renamed over `target`, so a reader
    sees the old content or the new, never part of either, even after a kill or a power loss.
    """
    target = os.fspath(target)
    parent = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}{PARTIAL}", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the result is an ordinary file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(parent)


def _fsync_directory(directory: str) -> None:
    """Makes a rename in `directory` durable (where the platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_partial(name: str) -> bool:
    """Whether `name` is the temporary name of an `atomic_file` or `atomic_directory` write."""
    return name.startswith(".") and PARTIAL in name


def remove_partials(directory: str | os.PathLike, *, name: str | None = None, recursive: bool = False) -> list[str]:
    """Deletes what interrupted atomic writes left in `directory` (of target `name` only, if given);
    returns the paths removed.

    Only for directories one process writes at a time (a run directory, an export's parent): a
    concurrent writer's temporary file would be deleted under it.
    """
    removed: list[str] = []
    for root, dirs, files in os.walk(os.fspath(directory)):  # nothing for a missing directory
        for entry in [*dirs, *files]:
            if is_partial(entry) and (name is None or entry.startswith(f".{name}{PARTIAL}")):
                path = os.path.join(root, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                removed.append(path)
        dirs[:] = [d for d in dirs if not is_partial(d)] if recursive else []
    return removed
