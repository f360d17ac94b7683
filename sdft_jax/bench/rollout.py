"""Rollout throughput with continuous batching against static batches, on rows of very different lengths.

`python -m sdft_jax.bench rollout --model smollm2-135m --prompts 64 --slots 16 --max-new-tokens 256 --lengths heavy-tail --json`

Both engines decode the same prompts (random ordinary token ids, 16 to 64 of them, seeded) greedily
with no stop ids, each row up to its own length budget, drawn once per run (`--lengths`):
- `heavy-tail`: one row in ten (exactly `round(prompts / 10)` rows, at seeded positions) runs to
  `--max-new-tokens`; every other row's budget is log-uniform between `max_new_tokens / 32` and
  `max_new_tokens / 4` (8 to 64 tokens for 256): most rows short, a few long;
- `uniform`: uniform between 1 and `--max-new-tokens`; `fixed`: every row `--max-new-tokens`.
Engines:
- `static`: `Sampler` as shipped (on CPU, per-layer weight copies), the prompts in batches of `--slots`
  rows in order; a static batch decodes until its longest row ends, so each batch is called with the
  largest budget among its rows and every row is then cut to its own budget (what a per-row limit
  would give: the loop stops only when every row has);
- `continuous`: `ContinuousSampler` with `--slots` decode slots and the per-row budgets.
A first call of each compiles; then `--runs` timed calls take turns between the engines (the median
is reported). `useful_new_tokens` is the sum of the budgets (both engines must produce exactly those,
checked: `tokens_equal`, the rows' tokens identical); `*_new_tokens_per_s` is that over the median
seconds; `speedup_vs_static` the ratio; `static_row_steps` the decode rows x steps the static batches
ran (`useful_new_tokens` / it: the static engine's utilisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

from sdft_jax.bench.harness import finish_row, peak_rss_mb

LENGTHS = ("heavy-tail", "uniform", "fixed")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench rollout", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="registered name or HF directory")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--slots", type=int, default=16, help="continuous decode slots = static batch size")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--lengths", default="heavy-tail", choices=LENGTHS, help="how each row's budget is drawn")
    p.add_argument("--prompt-len", default="16,64", help="MIN,MAX prompt tokens (uniform)")
    p.add_argument("--runs", type=int, default=1, help="timed calls per engine after the first (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    for name in ("prompts", "slots", "max_new_tokens", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        low, high = (int(x) for x in args.prompt_len.split(","))
    except ValueError:
        p.error(f"--prompt-len must be MIN,MAX integers, got {args.prompt_len!r}")
    if not 1 <= low <= high:
        p.error(f"--prompt-len must have 1 <= MIN <= MAX, got {args.prompt_len!r}")
    args.prompt_len = (low, high)
    return args


def budgets(kind: str, rows: int, max_new_tokens: int, seed: int) -> list[int]:
    """Each row's new-token budget, as `--lengths` says (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng([seed, 1])
    n = max_new_tokens
    if kind == "fixed":
        return [n] * rows
    if kind == "uniform":
        return rng.integers(1, n + 1, size=rows).tolist()
    low, high = max(1, n // 32), max(1, n // 4)
    out = np.exp(rng.uniform(np.log(low), np.log(high + 1), size=rows)).astype(int).clip(low, high)
    out[rng.choice(rows, size=round(rows / 10), replace=False)] = n
    return out.tolist()


def prompts(vocab: int, rows: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """Random prompts of ordinary tokens (the low ids of the vocabularies we use are special tokens)."""
    import numpy as np

    rng = np.random.default_rng([seed, 0])
    first = min(256, vocab // 2)  # a tiny test vocabulary has fewer than 256 ids
    return [rng.integers(first, vocab, size=rng.integers(lengths[0], lengths[1] + 1)).tolist() for _ in range(rows)]


def run(args: argparse.Namespace) -> dict:
    """Runs both engines; returns the result row (without the load average at the end)."""
    import jax
    import numpy as np

    from sdft_jax.bench.plan import cpu_model
    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.checkpoints.registry import resolve_model
    from sdft_jax.sampling.continuous import ContinuousSampler
    from sdft_jax.sampling.sampler import Sampler, SamplingConfig

    row = {"model": args.model, "prompts": args.prompts, "slots": args.slots, "max_new_tokens": args.max_new_tokens,
           "lengths": args.lengths, "prompt_len": list(args.prompt_len), "runs": args.runs,
           "backend": jax.default_backend(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "loadavg_start": round(os.getloadavg()[0], 2)}
    model = load_hf(resolve_model(args.model))
    rows = prompts(model.cfg.vocab_size, args.prompts, args.prompt_len, args.seed)
    limits = budgets(args.lengths, args.prompts, args.max_new_tokens, args.seed)
    n = args.max_new_tokens
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=n, batch_buckets=(args.slots,))
    key = jax.random.key(args.seed)
    static = Sampler(stop_ids=(), pad_id=0)
    continuous = ContinuousSampler(stop_ids=(), pad_id=0, slots=args.slots)
    batches = [range(s, min(s + args.slots, args.prompts)) for s in range(0, args.prompts, args.slots)]

    def run_static() -> np.ndarray:
        tokens = np.zeros((args.prompts, n), np.int32)
        for batch in batches:
            longest = max(limits[i] for i in batch)
            batch_cfg = dataclasses.replace(cfg, max_new_tokens=longest)
            out = static.generate(model, [rows[i] for i in batch], batch_cfg, key)
            tokens[batch.start:batch.stop, :longest] = out.tokens
        return tokens

    def run_continuous() -> np.ndarray:
        return continuous.generate(model, rows, cfg, key, max_new_tokens=limits).tokens

    engines = {"static": run_static, "continuous": run_continuous}
    results, first, times = {}, {}, {name: [] for name in engines}
    for name, call in engines.items():
        start = time.perf_counter()
        results[name] = call()
        first[name] = time.perf_counter() - start
    for _ in range(args.runs):
        for name, call in engines.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    useful = int(sum(limits))
    cut = np.arange(n)[None, :] < np.asarray(limits)[:, None]
    same = [bool((results["static"][i][cut[i]] == results["continuous"][i][cut[i]]).all()) for i in range(args.prompts)]
    row.update(useful_new_tokens=useful, budget_mean=round(useful / args.prompts, 1),
               rows_at_max=int(sum(b == n for b in limits)),
               static_row_steps=int(sum(len(b) * max(limits[i] for i in b) for b in batches)),
               tokens_equal=all(same), rows_differing=[i for i, s in enumerate(same) if not s])
    for name in engines:
        median = statistics.median(times[name])
        row[f"{name}_new_tokens_per_s"] = round(useful / median, 2)
        row[f"{name}_seconds"] = round(median, 3)
        row[f"{name}_first_call_s"] = round(first[name], 3)
    row.update(static_compile_s=round(static.compile_seconds, 3), static_compilations=static.compilations,
               continuous_compile_s=round(continuous.compile_seconds, 3),
               continuous_compilations=continuous.compilations, continuous_chunks=continuous.chunks,
               continuous_inserts=continuous.inserts, peak_rss_mb=round(peak_rss_mb(), 1))
    row["speedup_vs_static"] = round(row["continuous_new_tokens_per_s"] / row["static_new_tokens_per_s"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv or [])
    row = run(args)
    finish_row(row, (), rate="new_tokens_per_s", as_json=args.json, width=26)
    return 0 if row["tokens_equal"] else 1
