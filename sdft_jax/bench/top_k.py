"""Time of the loss's top-K over a vocabulary: `models.top_k.top_k` against `jax.lax.top_k`, on the same rows.

`python -m sdft_jax.bench top_k --rows 256 --vocab 151936 --k 20 --json`

The rows are one loss chunk of teacher logits (default: 256 tokens of Qwen's 151,936-token vocabulary,
SDFT's K = 20), float32 from a fixed seed, N(0, 3^2). Engines, each jitted, a first (compiling) call, then
the median of `--runs` calls (`*_ms`):
- `lax`: `jax.lax.top_k`, the reference (on XLA:GPU a sort of each whole row when K > 16);
- `top_k`: `models.top_k.top_k`, what the loss calls (on GPU `grouped`, elsewhere `lax` itself);
- `grouped`: `models.top_k.grouped_top_k`, a max per group of 128 ids and two sorts of short rows;
- `sorted`: `models.top_k.sorted_top_k`, a stable sort of each whole row (not by default: ~20 s on XLA:CPU).
`*_same`: the engine's values and ids equal `lax`'s. `speedup_vs_lax`: `lax_ms` over `top_k_ms`. `bench accel`
reports the same figures at its loss chunk's shape (`top_k`).
"""

from __future__ import annotations

import argparse
import os
import statistics

from sdft_jax.bench.harness import finish_row, timed

ENGINES = ("lax", "top_k", "grouped", "sorted")
DEFAULT_ENGINES = ENGINES[:3]  # `sorted` sorts whole rows: on XLA:CPU ~20 s for the default shape


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench top_k", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="rows (tokens of a loss chunk)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--runs", type=int, default=5, help="timed calls per engine after the first (median reported)")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma-separated, of {','.join(ENGINES)}")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if "lax" not in engines or not set(engines) <= set(ENGINES):
        p.error(f"--engines: 'lax' and any of {', '.join(ENGINES[1:])}")
    if not 1 <= args.k <= args.vocab or args.rows < 1:
        p.error(f"--k must be in [1, --vocab] and --rows >= 1 (got k={args.k}, vocab={args.vocab}, rows={args.rows})")
    return args


def measure(*, rows: int, vocab: int, k: int, runs: int, engines=ENGINES) -> dict:
    """Each engine's median milliseconds and whether it equals `jax.lax.top_k`, on this process's default device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdft_jax.models import top_k

    fns = {"lax": jax.lax.top_k, "top_k": top_k.top_k, "grouped": top_k.grouped_top_k, "sorted": top_k.sorted_top_k}
    x = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32) * 3
    row: dict = {"rows": rows, "vocab": vocab, "k": k, "runs": runs}
    expected = None
    for engine in engines:
        fn = jax.jit(lambda x, fn=fns[engine]: tuple(fn(x, k)))
        _, times = timed(lambda: jax.block_until_ready(fn(x)), runs)
        values, ids = (np.asarray(a) for a in fn(x))
        if expected is None:  # lax, the first engine
            expected = (values, ids)
        row[f"{engine}_ms"] = round(1e3 * statistics.median(times), 3)
        row[f"{engine}_same"] = bool(np.array_equal(ids, expected[1]) and np.array_equal(values, expected[0]))
    if "top_k" in engines:
        row["speedup_vs_lax"] = round(row["lax_ms"] / row["top_k_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv or [])
    import jax

    from sdft_jax.bench.plan import cpu_model

    engines = ["lax"] + [e for e in ENGINES[1:] if e in args.engines.split(",")]
    row = {"bench": "top_k", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "loadavg_start": round(os.getloadavg()[0], 2),
           **measure(rows=args.rows, vocab=args.vocab, k=args.k, runs=args.runs, engines=engines)}
    finish_row(row, engines, rate="", as_json=args.json, width=16)
    return 0 if all(row[f"{e}_same"] for e in engines) else 1
