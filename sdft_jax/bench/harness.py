"""Shared benchmark plumbing: timing with a first (compiling) call, peak RSS, one fresh process per
engine, and the result row every benchmark ends with."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Sequence


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(call: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    """(first call's seconds, seconds of each of `runs` further calls)."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, times


def _child(fn, args: dict, queue) -> None:
    try:
        queue.put((fn(args), None))
    except Exception as e:  # reported by the parent
        queue.put((None, f"{type(e).__name__}: {e}"))


def in_fresh_process(fn: Callable[[dict], dict], args: dict) -> dict:
    """Runs `fn(args)` in a new spawned process (so its peak RSS and threads are its own)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result, error = queue.get()
    proc.join()
    if error is not None:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed: {error}")
    return result


def engine_prefix(engine: str) -> str:
    """The prefix of an engine's figures in a result row: none for `jax`, `{engine}_` for the others."""
    return "" if engine == "jax" else f"{engine}_"


def finish_row(row: dict, engines: Sequence[str], *, rate: str, as_json: bool, width: int) -> None:
    """Completes a result row and prints it.

    Adds the load average at the end (other work on the machine slows every engine; with
    `loadavg_start` it tells whether the figures are to be trusted) and, when torch ran, every other
    engine's `speedup_vs_torch` (its `rate` figure over torch's). Prints the row one `key: value` per
    line, keys right-aligned to `width` (unless `as_json`), then as one JSON line.
    """
    row["loadavg_end"] = round(os.getloadavg()[0], 2)
    if "torch" in engines:
        for engine in engines:
            if engine != "torch":
                prefix = engine_prefix(engine)
                row[prefix + "speedup_vs_torch"] = round(row[prefix + rate] / row[engine_prefix("torch") + rate], 3)
    if not as_json:
        for k, v in row.items():
            print(f"{k:>{width}}: {v}")
    print(json.dumps(row))
