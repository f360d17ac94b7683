"""Throughput of our sampler against `transformers` torch `generate` on the same model and batch.

`python -m sdft_jax.bench generate --model smollm2-135m --batch 8 --prompt-len 128 --new-tokens 64 --json`

Every engine samples at temperature 1, top_p 1, top_k 0 (transformers would otherwise apply top_k
50), from the same random prompts of exactly `--prompt-len` tokens, and is forced to produce
exactly `--new-tokens` tokens per row (no stop ids for us; `min_new_tokens` for torch). Engines:
`jax` (our `Sampler` as shipped: on CPU, rollout weights as per-layer copies, unrolled in the decode
loop), `jax_scan` (the same on stacked rollout weights, `RolloutWeightsConfig(layers="stacked")`: layers
scanned, the TPU/GPU default) and `torch`.

Each engine lives in its own process (so `peak_rss_mb` is its own), loads the model and makes a
first call, then the timed calls take turns between the engines, one call at a time: load from other
work on the machine then falls on all engines alike. Reported per engine (`jax` unprefixed, others
prefixed `jax_scan_` / `torch_`):
- `new_tokens_per_s`: batch x new tokens / the median wall time of `--runs` calls;
- `compile_s` (ours): the sampler's compile time, part of the first call; `warmup_s` (torch): its
  first call minus the median;
- `speedup_vs_torch`: the ratio of `new_tokens_per_s`.
torch runs with `torch.set_num_threads(--threads)` (default: all cores) and `OMP_WAIT_POLICY=PASSIVE`
unless the environment sets it; XLA:CPU uses all cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time

from sdft_jax.bench.harness import finish_row

ENGINES = ("jax", "jax_scan", "torch")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="registered name or HF directory")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="timed calls per engine after the first (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "runs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    engines = args.engines.split(",")
    if not engines or any(e not in ENGINES for e in engines) or len(set(engines)) != len(engines):
        p.error(f"--engines: choose from {','.join(ENGINES)}, got {args.engines!r}")
    return args


def _prompts(vocab: int, batch: int, length: int, seed: int):
    import numpy as np

    # Ordinary tokens only: the low ids of the vocabularies we use are special tokens.
    return np.random.default_rng(seed).integers(256, vocab, size=(batch, length)).astype(np.int32)


def _jax_engine(args: dict, layers: str):
    """A call that samples once, and the figures known after the first call."""
    import jax

    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.sampling.rollout_weights import RolloutWeightsConfig
    from sdft_jax.sampling.sampler import Sampler, SamplingConfig

    model = load_hf(args["path"])
    prompts = _prompts(model.cfg.vocab_size, args["batch"], args["prompt_len"], args["seed"]).tolist()
    sampler = Sampler(stop_ids=(), pad_id=0, weights=RolloutWeightsConfig(layers=layers))
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args["new_tokens"],
                         prompt_buckets=(args["prompt_len"],), batch_buckets=(args["batch"],))
    calls = iter(range(1 << 30))

    def call():
        out = sampler.generate(model, prompts, cfg, jax.random.key(next(calls)))
        assert (out.lengths == args["new_tokens"]).all()

    return call, lambda: {"compile_s": sampler.compile_seconds, "compilations": sampler.compilations}


def _torch_engine(args: dict):
    # Idle OpenMP workers sleep instead of spinning: with spinning, 2 torch threads on 2 cores that
    # other processes also use ran 5x slower than 1 thread here. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    torch.set_num_threads(args["threads"])
    model = transformers.AutoModelForCausalLM.from_pretrained(args["path"], dtype=torch.float32).eval()
    ids = torch.tensor(_prompts(model.config.vocab_size, args["batch"], args["prompt_len"], args["seed"]),
                       dtype=torch.long)
    mask = torch.ones_like(ids)
    n = args["new_tokens"]
    calls = iter(range(1 << 30))

    def call():
        torch.manual_seed(next(calls))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        assert out.shape == (ids.shape[0], ids.shape[1] + n), out.shape

    return call, lambda: {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}


def _worker(engine: str, args: dict, conn) -> None:
    """Serves timed calls over `conn`: "run" -> seconds of one call; "stop" -> final figures."""
    try:
        if engine == "torch":
            call, info = _torch_engine(args)
        else:
            call, info = _jax_engine(args, layers="stacked" if engine == "jax_scan" else "auto")
        start = time.perf_counter()
        call()
        conn.send(("ready", time.perf_counter() - start))
        while conn.recv() == "run":
            start = time.perf_counter()
            call()
            conn.send(("time", time.perf_counter() - start))
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        conn.send(("done", {**info(), "peak_rss_mb": peak_rss_mb}))
    except Exception as e:  # noqa: BLE001 -- reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _receive(engine: str, conn, expected: str):
    kind, value = conn.recv()
    if kind == "error":
        raise RuntimeError(f"{engine} engine failed: {value}")
    assert kind == expected, (engine, kind)
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from sdft_jax.checkpoints.registry import resolve_model

    shared = {"path": resolve_model(args.model), "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "threads": args.threads, "seed": args.seed}
    engines = args.engines.split(",")
    row: dict = {"model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "runs": args.runs, "cpu_count": os.cpu_count(),
                 "loadavg_start": round(os.getloadavg()[0], 2)}
    ctx = multiprocessing.get_context("spawn")
    conns, procs, first, times = {}, [], {}, {e: [] for e in engines}
    try:
        for engine in engines:  # loaded and warmed one after the other, not competing
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(engine, shared, child), daemon=True)
            proc.start()
            procs.append(proc)
            conns[engine] = parent
            first[engine] = _receive(engine, parent, "ready")
        for run in range(args.runs):
            for engine in engines if run % 2 == 0 else engines[::-1]:  # alternate who goes first
                conns[engine].send("run")
                times[engine].append(_receive(engine, conns[engine], "time"))
        final = {}
        for engine in engines:
            conns[engine].send("stop")
            final[engine] = _receive(engine, conns[engine], "done")
    finally:
        for proc in procs:
            proc.join(timeout=60)
    tokens = args.batch * args.new_tokens
    for engine in engines:
        prefix = "" if engine == "jax" else f"{engine}_"
        median = statistics.median(times[engine])
        row[prefix + "new_tokens_per_s"] = round(tokens / median, 2)
        row[prefix + "seconds"] = round(median, 4)
        row[prefix + "first_call_s"] = round(first[engine], 3)
        if engine == "torch":
            row[prefix + "warmup_s"] = round(max(first[engine] - median, 0.0), 3)
        for name, value in final[engine].items():
            row[prefix + name] = round(value, 3) if isinstance(value, float) else value
    finish_row(row, engines, rate="new_tokens_per_s", as_json=args.json, width=32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
