"""Run, model and data files on a local disk or in a bucket (`gs://...`): whole-file operations over both.

Local paths go through the ordinary `os` and `open` calls; remote ones through `etils.epath` (for
`gs://` it needs `gcsfs`, the `gcs` extra, or TensorFlow). A bucket has no append, no rename and no
directories, so everything here reads or writes a whole file, and `makedirs` of a remote path does
nothing (an object's name creates its prefix). An object appears only when its upload completes, so a
reader never sees half a file; a directory can however be half uploaded: `copy_tree(..., last=...)`
uploads a marker file after everything else, and readers trust the directory only when it is there.
A local file is written the same way, whole or not at all: under a temporary name beside it, synced,
then renamed over it (`cache.atomic_file`); `remove_partials` deletes what a killed writer left.

Remote inputs (model and data directories) are downloaded once into the local cache with `local_copy`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from etils import epath

from sdft_jax import cache

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URL (`gs://bucket/...`), False for a local path."""
    return "://" in os.fspath(path)


def exists(path: PathLike) -> bool:
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def makedirs(path: PathLike) -> None:
    """`os.makedirs(path, exist_ok=True)`; nothing for a remote path (objects create their prefixes)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
    if is_remote(path):
        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes the whole file, replacing it atomically: a reader, or a run restarted after a kill, finds
    the old content or the new, never part of it."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)  # an object appears only when its upload completes
        return
    with cache.atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: PathLike) -> Any:
    return json.loads(read_text(path))


def write_json(path: PathLike, value: Any) -> None:
    """Writes `value` as indented JSON, atomically (`write_bytes`)."""
    write_text(path, json.dumps(value, indent=2))


def rmtree(path: PathLike) -> None:
    """Removes a directory tree (every object under a remote prefix); nothing if it does not exist."""
    if is_remote(path):
        if epath.Path(path).exists():
            epath.Path(path).rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_partials(directory: PathLike) -> list[str]:
    """Deletes, anywhere under a local `directory` that one process writes (a run directory), the
    temporary files and directories that interrupted atomic writes left; returns their paths. Nothing
    for a remote one: an interrupted upload leaves no object."""
    if is_remote(directory):
        return []
    return cache.remove_partials(directory, recursive=True)


def _copy_file(src: PathLike, dst: PathLike) -> None:
    """Copies one file; a local `dst` is replaced atomically, a remote one appears when uploaded."""
    s = epath.Path(src) if is_remote(src) else None
    with contextlib.ExitStack() as stack:
        fin = stack.enter_context(s.open("rb") if s else open(src, "rb"))
        if is_remote(dst):
            fout = stack.enter_context(epath.Path(dst).open("wb"))
        else:
            fout = stack.enter_context(open(stack.enter_context(cache.atomic_file(dst)), "wb"))
        shutil.copyfileobj(fin, fout, 16 << 20)


def copy_tree(local_dir: PathLike, dst: PathLike, *, last: Sequence[str] = ()) -> None:
    """Copies the files of a local directory tree under `dst` (local or remote), replacing same-named ones.

    The files named in `last` (paths relative to `local_dir`) are copied after all the others, so a
    reader that waits for them never takes a half-copied directory for a complete one.
    """
    local_dir = os.fspath(local_dir)
    files = []
    for root, _, names in os.walk(local_dir):
        files += [os.path.relpath(os.path.join(root, n), local_dir) for n in sorted(names)]
    files.sort(key=lambda rel: (last.index(rel) + 1 if rel in last else 0, rel))
    for rel in files:
        target = os.path.join(os.fspath(dst), rel)
        makedirs(os.path.dirname(target))
        _copy_file(os.path.join(local_dir, rel), target)


def _download(src: epath.Path, dst: str) -> None:
    if src.is_dir():
        os.makedirs(dst, exist_ok=True)
        for child in src.iterdir():
            _download(child, os.path.join(dst, child.name))
    else:
        _copy_file(src, dst)


def local_copy(path: PathLike) -> str:
    """A local path with the content of `path`: `path` itself if local, else a copy in the cache.

    A remote file or directory is downloaded once, into `<cache>/remote/<hash of the URL>/<name>`, and
    reused afterwards: remote inputs (models, data) are taken to be immutable. The download is built
    under a temporary name and renamed into place when complete, so a half download is never reused.
    """
    path = os.fspath(path)
    if not is_remote(path):
        return path
    url = path.rstrip("/")
    src = epath.Path(url)
    target = os.path.join(cache.cache_root(), "remote", hashlib.sha256(url.encode()).hexdigest()[:16])
    out = os.path.join(target, src.name)
    if not os.path.isdir(target):
        if not src.exists():
            raise FileNotFoundError(f"{url}: does not exist")
        with cache.atomic_directory(target) as tmp:
            _download(src, os.path.join(tmp, src.name))
    return out
