"""Time of the chunked Gated DeltaNet rule against the per-token recurrence and `transformers`' torch
chunked rule, forward + backward, on the same inputs.

`python -m sdft_jax.bench deltanet --tokens 4096 --heads 16 --head-dim 128 --json`

Each engine runs in a fresh process (its peak RSS is its own) on the same inputs (seeded numpy): q and
k L2-normed, [batch, tokens, key heads, head dim]; v [batch, tokens, heads, head dim]; log-decays g < 0
and beta in (0, 1) per value head. The timed call is the gradient of the sum of the outputs with
respect to q, k, v, g and beta:
- `jax` (no prefix): `models.gated_deltanet.chunked_gated_delta_rule`, jitted `value_and_grad`;
- `jax_recurrent`: `models.gated_deltanet.recurrent_gated_delta_rule`, the same way;
- `torch`: HF `torch_chunk_gated_delta_rule` (the fallback without flash-linear-attention), autograd.
jax compiles first (`*_compile_s`); a first call warms up; the median of `--runs` further calls is reported, as
tokens/s (batch x tokens over the seconds of one forward + backward). `*_temp_mb` is XLA's own count of
the temporary buffers of the compiled step (jax only); `*_peak_rss_mb` is the process's peak RSS.
`*_out_sum` / `*_grad_sum` (sums of the outputs and of the gradients) say the engines computed the same.
"""

from __future__ import annotations

import argparse
import os
import statistics

from sdft_jax.bench.harness import engine_prefix, finish_row, in_fresh_process

ENGINES = ("jax", "jax_recurrent", "torch")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench deltanet", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16, help="value heads")
    p.add_argument("--key-heads", type=int, default=0, help="query / key heads (0 = --heads)")
    p.add_argument("--head-dim", type=int, default=128, help="key and value head dim")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=2, help="timed calls per engine after the first (median reported)")
    p.add_argument("--skip-recurrent", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    return p.parse_args(argv)


def _inputs(args: dict) -> dict:
    """The engines' common inputs, numpy float32, from a fixed seed."""
    import numpy as np

    rng = np.random.default_rng(0)
    B, T, Hk, Hv, E = args["batch"], args["tokens"], args["key_heads"], args["heads"], args["head_dim"]

    def unit(shape):
        x = rng.standard_normal(shape, np.float32)
        return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)

    return {
        "q": unit((B, T, Hk, E)), "k": unit((B, T, Hk, E)),
        "v": rng.standard_normal((B, T, Hv, E), np.float32),
        "g": -0.1 * np.logaddexp(0, rng.standard_normal((B, T, Hv))).astype(np.float32),  # -0.1 softplus
        "beta": (1 / (1 + np.exp(-rng.standard_normal((B, T, Hv))))).astype(np.float32),
    }


def _run_jax(args: dict) -> dict:
    import functools
    import time

    import jax
    import jax.numpy as jnp

    from sdft_jax.bench.harness import peak_rss_mb, timed
    from sdft_jax.models import gated_deltanet as gdn

    rule = gdn.recurrent_gated_delta_rule if args["engine"] == "jax_recurrent" else functools.partial(
        gdn.chunked_gated_delta_rule, chunk_size=args["chunk_size"])
    inputs = [jnp.asarray(a) for a in _inputs(args).values()]

    def loss(q, k, v, g, beta):
        return jnp.sum(rule(q, k, v, g, beta)[0])

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    start = time.perf_counter()
    compiled = step.lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    result = {}
    first, times = timed(lambda: result.update(out=jax.block_until_ready(compiled(*inputs))), args["runs"])
    value, grads = result["out"]
    return {"compile_s": compile_s, "first_call_s": first, "times_s": times, "peak_rss_mb": peak_rss_mb(),
            "temp_mb": None if memory is None else memory.temp_size_in_bytes / 2**20,
            "out_sum": float(value), "grad_sum": float(sum(jnp.sum(g) for g in grads))}


def _run_torch(args: dict) -> dict:
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from sdft_jax.bench.harness import peak_rss_mb, timed

    inputs = [torch.from_numpy(a) for a in _inputs(args).values()]
    result = {}

    def call():
        leaves = [a.clone().requires_grad_(True) for a in inputs]
        out, _ = torch_chunk_gated_delta_rule(*leaves, chunk_size=args["chunk_size"])
        value = out.sum()
        value.backward()
        result.update(value=value.item(), grad_sum=sum(a.grad.sum().item() for a in leaves))

    first, times = timed(call, args["runs"])
    return {"first_call_s": first, "times_s": times, "peak_rss_mb": peak_rss_mb(),
            "out_sum": result["value"], "grad_sum": result["grad_sum"]}


def _run_engine(args: dict) -> dict:
    return _run_torch(args) if args["engine"] == "torch" else _run_jax(args)


def main(argv: list[str]) -> int:
    """Runs the benchmark and prints its JSON line."""
    args = _parse(argv)
    key_heads = args.key_heads or args.heads
    if args.heads % key_heads:
        raise SystemExit(f"--heads ({args.heads}) must be a multiple of --key-heads ({key_heads})")
    common = {"batch": args.batch, "tokens": args.tokens, "heads": args.heads, "key_heads": key_heads,
              "head_dim": args.head_dim, "chunk_size": args.chunk_size, "runs": args.runs}
    row = {"bench": "deltanet", **common, "loadavg_start": round(os.getloadavg()[0], 2)}
    engines = [e for e in ENGINES if not (e == "jax_recurrent" and args.skip_recurrent)
               and not (e == "torch" and args.skip_torch)]
    for engine in engines:
        measured = in_fresh_process(_run_engine, {**common, "engine": engine})
        prefix = engine_prefix(engine)
        median = statistics.median(measured["times_s"])
        if "compile_s" in measured:
            row[prefix + "compile_s"] = round(measured["compile_s"], 3)
        row[prefix + "first_call_s"] = round(measured["first_call_s"], 3)
        row[prefix + "median_s"] = round(median, 4)
        row[prefix + "tokens_per_s"] = round(args.batch * args.tokens / median, 1)
        row[prefix + "peak_rss_mb"] = round(measured["peak_rss_mb"], 1)
        if measured.get("temp_mb") is not None:
            row[prefix + "temp_mb"] = round(measured["temp_mb"], 1)
        row[prefix + "out_sum"] = round(measured["out_sum"], 3)
        row[prefix + "grad_sum"] = round(measured["grad_sum"], 3)
    if "jax_recurrent" in engines:
        row["speedup_vs_recurrent"] = round(row["tokens_per_s"] / row["jax_recurrent_tokens_per_s"], 2)
    finish_row(row, engines, rate="tokens_per_s", as_json=args.json, width=30)
    return 0
