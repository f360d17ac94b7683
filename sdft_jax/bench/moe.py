"""Time of the grouped (dropless) MoE channel mixer against the all-experts reference, forward + backward.

`python -m sdft_jax.bench moe --tokens 4096 --hidden 2048 --experts 64 --top-k 8 --expert-hidden 512 --json`

Each path (`models.moe.sparse_moe`, `models.moe.reference_moe`) is jitted as `value_and_grad` of the sum
of its outputs with respect to the activations and every weight; a first call compiles, then the
median of `--runs` calls is reported. FLOPs are the routed experts' matmuls (forward and backward, 3x
the forward), against the active FLOPs (what the routing asks for, `models.moe.active_flops`): the
reference spends E/k times them; the grouped path spends them plus, on CPU, each expert's rows
rounded up to whole windows of rows (`models.grouped_matmul.tiled_grouped_matmul`), counted from the routing.
The router and the shared expert cost the same in both paths and are not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from sdft_jax.bench.harness import finish_row, peak_rss_mb, timed
from sdft_jax.models import grouped_matmul, moe

BACKWARD_FACTOR = 3  # forward + backward matmul FLOPs over the forward's (d input and d weight)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench moe", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--shared-expert-hidden", type=int, default=0)
    p.add_argument("--no-norm-topk-prob", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="activations and weights")
    p.add_argument("--runs", type=int, default=3, help="timed calls per path after the first (median reported)")
    p.add_argument("--skip-reference", action="store_true", help="time the grouped path only")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    return p.parse_args(argv)


def _inputs(args, cfg: moe.MoeConfig, dtype) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Unit activations and weights scaled by 1/sqrt(fan_in): O(1) activations, a spread-out routing."""
    shapes = {name: shape for name, (shape, _) in moe.param_shapes(args.hidden, cfg).items()}
    keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
    x = jax.random.normal(keys[0], (args.tokens, args.hidden), jnp.float32).astype(dtype)
    w = {name: (jax.random.normal(k, shape, jnp.float32) * shape[-2] ** -0.5).astype(dtype)
         for k, (name, shape) in zip(keys[1:], shapes.items())}
    return x, w


def _objective(fn, cfg: moe.MoeConfig):
    def loss(x, w):
        out = fn(x, w, cfg)
        return jnp.sum(out.hidden.astype(jnp.float32)) + out.aux_loss

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _measure(fn, cfg, x, w, runs: int) -> dict:
    step = _objective(fn, cfg)
    first, times = timed(lambda: jax.block_until_ready(step(x, w)), runs)
    return {"first_call_s": round(first, 3), "median_s": round(statistics.median(times), 4),
            "times_s": [round(t, 4) for t in times]}


def _grouped_rows(x, w, cfg: moe.MoeConfig) -> int:
    """Rows the grouped matmuls multiply for this routing: T*k, or each expert's rows rounded up to
    whole windows of `DEFAULT_TILE` rows where `grouped_matmul` is the tiled one (CPU)."""
    routing = jax.jit(lambda x, r: moe.route(x, r, cfg))(x, w["router"])
    sizes = np.bincount(np.asarray(routing.expert_ids).reshape(-1), minlength=cfg.num_experts)
    if jax.default_backend() != "cpu":
        return int(sizes.sum())
    return int(np.sum(-(-sizes // grouped_matmul.DEFAULT_TILE)) * grouped_matmul.DEFAULT_TILE)


def main(argv: list[str]) -> int:
    """Runs the benchmark and prints its JSON line."""
    args = _parse(argv)
    load_start = round(os.getloadavg()[0], 2)
    cfg = moe.MoeConfig(num_experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_hidden,
                        norm_topk_prob=not args.no_norm_topk_prob, shared_expert_hidden=args.shared_expert_hidden)
    x, w = jax.block_until_ready(_inputs(args, cfg, jnp.dtype(args.dtype)))
    active = BACKWARD_FACTOR * moe.active_flops(args.tokens, args.hidden, cfg)
    grouped_rows = _grouped_rows(x, w, cfg)
    grouped_flops = active * grouped_rows // (args.tokens * args.top_k)
    reference_flops = active * args.experts // args.top_k
    row = {
        "bench": "moe", "tokens": args.tokens, "hidden": args.hidden, "experts": args.experts,
        "top_k": args.top_k, "expert_hidden": args.expert_hidden, "shared_expert_hidden": args.shared_expert_hidden,
        "dtype": args.dtype, "backend": jax.default_backend(), "runs": args.runs, "loadavg_start": load_start,
        "active_gflop": round(active / 1e9, 1),
    }
    grouped = _measure(moe.sparse_moe, cfg, x, w, args.runs)
    row.update({f"grouped_{k}": v for k, v in grouped.items()})
    row["grouped_gflop"] = round(grouped_flops / 1e9, 1)
    row["grouped_active_gflop_per_s"] = round(active / 1e9 / grouped["median_s"], 1)
    if not args.skip_reference:
        reference = _measure(moe.reference_moe, cfg, x, w, args.runs)
        row.update({f"reference_{k}": v for k, v in reference.items()})
        row["reference_gflop"] = round(reference_flops / 1e9, 1)
        row["reference_gflop_per_s"] = round(reference_flops / 1e9 / reference["median_s"], 1)
        row["speedup"] = round(reference["median_s"] / grouped["median_s"], 2)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    finish_row(row, ("jax",), rate="speedup", as_json=args.json, width=28)
    return 0
