"""Orbax checkpoints of a run: the full train state and the data iterator state, together.

A checkpoint holds everything a resume needs (student or adapters, optimizer, teacher, step, PRNG,
where the data iterator stands, and the run's own counters) so a resumed run continues exactly. Orbax
writes each step into a temporary directory and renames it only when complete, so a crash mid-save
(even a killed process) leaves no checkpoint that `latest_step` would return, and the temporary
directory is removed when the next run opens the checkpoints; saves may run asynchronously while
training continues. Works with local paths and `gs://` buckets, single- or multi-host.

A state with a non-finite value is never saved (`NonFiniteStateError`): a checkpoint always holds
weights a run can continue from. Each leaf's checksum is saved beside the arrays and checked on
restore, since Orbax reads corrupted array bytes without complaint. `restore_latest` takes the newest
checkpoint that restores and checks; one that does not (a data file removed or corrupted) is set aside
with a warning naming it, and a run with checkpoints of which none restores fails with `CheckpointError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sdft_jax import storage

log = logging.getLogger(__name__)

RUN_ITEM = "run"  # the optional JSON item of a run's own counters (`save(..., run_state=...)`)
CHECKSUM_ITEM = "checksums"  # JSON item: each state leaf's checksum, verified on restore
DAMAGED_DIR = "damaged_checkpoints"  # beside `checkpoints/`: local checkpoints that did not restore


class CheckpointError(RuntimeError):
    """No checkpoint of a run restores (each one's error is in the message)."""


class NonFiniteStateError(ValueError):
    """A state to be saved holds NaN or infinite values (named in the message); nothing was saved."""


def _names(path) -> list[str]:
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                out.append(str(getattr(key, attr)))
                break
        else:
            raise TypeError(f"unsupported pytree key {key!r}")
    return out


def to_tree(state: Any) -> dict:
    """Any pytree as a nested dict of named leaves (readable checkpoint layout)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = _names(path)
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_tree(tree: dict, like: Any) -> Any:
    """Inverse of `to_tree`, using `like` (same structure) for the pytree layout."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in leaves_with_path:
        node = tree
        for name in _names(path):
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as unsigned 32-bit words (one per element; two for a 64-bit element)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_summaries(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(finite, checksum) of each leaf: whether it holds no NaN nor infinity, and the sum modulo 2**32
    of its words weighted by odd numbers (2 i + 1), which any change of a single word alters. Exact
    integer arithmetic: equal on every layout and shard count of the same values."""
    finite, checksums = [], []
    for x in leaves:
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True))
        words = _words(x).reshape(-1)
        weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        checksums.append(jnp.sum(words * weights, dtype=jnp.uint32))
    return jnp.stack(finite), jnp.stack(checksums)


def _summaries(state: Any) -> tuple[dict[str, bool], dict[str, int]]:
    """Each array leaf's name (`params/layers/...`): whether it is finite, and its checksum. One jitted
    pass over the (sharded) arrays, collective on every process."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(state)[0] if isinstance(x, jax.Array)]
    if not leaves:
        return {}, {}
    finite, checksums = (_on_host(a) for a in _leaf_summaries([x for _, x in leaves]))
    names = ["/".join(_names(path)) for path, _ in leaves]
    return dict(zip(names, finite.tolist())), dict(zip(names, checksums.tolist()))


def _on_host(x: jax.Array) -> np.ndarray:
    """The whole value of a small array on every process (gathered if it spans other processes' devices)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def nonfinite_leaves(state: Any) -> list[str]:
    """The names (`params/layers/...`) of the leaves of `state` holding a NaN or an infinity."""
    return [name for name, ok in _summaries(state)[0].items() if not ok]


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """Logs at debug level, instead of printing, the errors of the reads Orbax abandons when one read of a
    damaged checkpoint fails (its other coroutines, and TensorStore callbacks into a closed event loop,
    report through `sys.unraisablehook`, a screenful each)."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: log.debug("abandoned checkpoint read: %s", unraisable.exc_value)
    try:
        yield
    finally:
        gc.collect()  # the abandoned coroutines report when collected: now, while the hook is ours
        sys.unraisablehook = hook


def _reason(error: Exception, limit: int = 300) -> str:
    """One line for a failed restore: the error's first line, without TensorStore's spec dump."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    for dump in (" [tensorstore_spec=", " See full TensorStore details"):
        first = first.split(dump)[0]
    return f"{type(error).__name__}: {first[:limit]}"


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: its step, the train state, the data iterator's state and the run's counters
    (`{}` for a checkpoint saved without)."""

    step: int
    state: Any
    data: dict
    run: dict


class Checkpointer:
    """Keep-last-N, optionally asynchronous checkpoints under `{run_dir}/checkpoints/{step}`."""

    def __init__(self, run_dir: str, *, keep: int = 2, async_save: bool = True):
        directory = run_dir if run_dir.startswith("gs://") else os.path.abspath(run_dir)
        self.directory = os.path.join(directory, "checkpoints")
        self.damaged_directory = os.path.join(directory, DAMAGED_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, run_state: dict | None = None) -> None:
        """Saves `state`, the data iterator's state and the run's JSON counters as checkpoint `step`.

        Raises NonFiniteStateError, saving nothing, when a floating-point leaf of `state` holds a NaN or
        an infinity: a diverged state is never written over a run's last good one.
        """
        finite, checksums = _summaries(state)
        bad = [name for name, ok in finite.items() if not ok]
        if bad:
            raise NonFiniteStateError(f"step {step}: not saved: non-finite values in {_listed(bad)}")
        items = {"state": ocp.args.StandardSave(to_tree(state)), "data": ocp.args.JsonSave(data_state),
                 CHECKSUM_ITEM: ocp.args.JsonSave(checksums)}
        if run_state is not None:
            items[RUN_ITEM] = ocp.args.JsonSave(run_state)
        self._manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """The state at `step`, placed with the shardings of `like` (an initialised state), and the data state."""
        restored = self._restore(step, like)
        return restored.state, restored.data

    def _restore(self, step: int, like: Any) -> Restored:
        abstract = to_tree(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like))
        items = {"state": ocp.args.StandardRestore(abstract), "data": ocp.args.JsonRestore()}
        optional = [n for n in (RUN_ITEM, CHECKSUM_ITEM) if storage.exists(os.path.join(self.directory, str(step), n))]
        items.update({name: ocp.args.JsonRestore() for name in optional})
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = from_tree(restored["state"], like)
        # Orbax reads corrupted array bytes without complaint; the checksums saved with them do not match.
        finite, checksums = _summaries(state)
        saved = restored[CHECKSUM_ITEM] if CHECKSUM_ITEM in optional else {}
        changed = [name for name, value in checksums.items() if name in saved and saved[name] != value]
        if changed:
            raise ValueError(f"the values of {_listed(changed)} do not match the checksums saved with them")
        bad = [name for name, ok in finite.items() if not ok]
        if bad:  # never saved so
            raise ValueError(f"non-finite values in {_listed(bad)}")
        has_run = RUN_ITEM in optional
        return Restored(step=step, state=state, data=restored["data"],
                        run=dict(restored[RUN_ITEM]) if has_run else {})

    def restore_latest(self, like: Any) -> Restored | None:
        """The newest checkpoint that restores (onto the shardings of `like`), None without any.

        Newer ones that fail to restore (a file removed, truncated or corrupted) are logged as warnings
        naming their directory and error, then set aside: moved to `{run_dir}/damaged_checkpoints/` for a
        local run, deleted from a bucket, so that the resumed run can save their steps again. Raises
        CheckpointError, touching nothing, when checkpoints exist but none restores (damage, or a config
        that no longer matches them).
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            restored = self._try_restore(step, like)
            if isinstance(restored, str):
                failures.append((step, restored))
                continue
            for bad, reason in failures:
                self._set_aside(bad, reason, fallback=step)
            return restored
        if failures:
            listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise CheckpointError(f"{self.directory}: no checkpoint restores ({listed})")
        return None

    def _try_restore(self, step: int, like: Any) -> Restored | str:
        """The checkpoint at `step`, or why it does not restore."""
        with _quiet_abandoned_reads():  # entered first: its exit collects what the failed read left
            try:
                return self._restore(step, like)
            except Exception as e:  # noqa: BLE001 -- any failure to read a checkpoint counts as damage here
                return _reason(e)

    def _set_aside(self, step: int, reason: str, *, fallback: int) -> None:
        path = os.path.join(self.directory, str(step))
        remote = storage.is_remote(path)
        target = os.path.join(self.damaged_directory, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        where = "deleted" if remote else f"moved to {target}"
        if jax.process_index() == 0:
            if remote:
                storage.rmtree(path)
            else:
                os.makedirs(self.damaged_directory, exist_ok=True)
                shutil.move(path, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"sdft_jax checkpoint {step} set aside")
        self._manager.reload()
        log.warning("checkpoint %s does not restore (%s): %s; resuming from step %d instead", path, reason, where,
                    fallback)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
