"""Memory and time of the chunked SDFT loss against the dense reference (value and gradient).

`python -m sdft_jax.bench loss --vocab 151936 --hidden 4096 --tokens 8192 --loss topk --json`

Both paths are compiled for `value_and_grad` with respect to the student hidden states and LM head.
Memory comes from XLA's compiled memory analysis, which needs no buffers, so the dense figure is
available even where the dense path cannot run (`--skip-dense-run`). Reported per path:
- `temp_bytes`: XLA's temporary buffers, i.e. the working memory the loss adds on top of its inputs
  and outputs (the LM-head weights and their gradient exist whatever the loss does);
- `total_bytes`: arguments + outputs + temporaries - aliased, the allocation of one call.
(XLA's `peak_memory_in_bytes` is left out: on CPU it ignores the temporaries.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import typing

import jax
import jax.numpy as jnp

from sdft_jax.distill import losses


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench loss", description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=8192, help="completion tokens in the batch (batch x length)")
    p.add_argument("--batch", type=int, default=4, help="sequences; must divide --tokens")
    p.add_argument("--loss", choices=typing.get_args(losses.LossName), default="topk")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--vocab-chunk-size", type=int, default=losses.LossConfig().vocab_chunk_size,
                   help="0: autodiff backward; N: the blocked backward over N vocab columns (head_grad.py)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="hidden states and heads")
    p.add_argument("--runs", type=int, default=3, help="timed runs per path (median reported)")
    p.add_argument("--skip-dense-run", action="store_true", help="compile the dense path for its memory only")
    p.add_argument("--compile-only", action="store_true", help="compile both paths for their memory; run neither")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    if args.tokens % args.batch:
        p.error(f"--batch {args.batch} must divide --tokens {args.tokens}")
    return args


def _inputs(args, dtype):
    b, c, d, v = args.batch, args.tokens // args.batch, args.hidden, args.vocab
    k = jax.random.split(jax.random.key(0), 6)
    # Unit hidden states and heads scaled by 1/sqrt(D) give O(1) logits, as a trained model's are.
    scale = d**-0.5
    return dict(
        student_hidden=jax.random.normal(k[0], (b, c, d), dtype),
        student_head=(jax.random.normal(k[1], (d, v), jnp.float32) * scale).astype(dtype),
        mask=jnp.ones((b, c), bool),
        teacher_hidden=jax.random.normal(k[2], (b, c, d), dtype),
        teacher_head=(jax.random.normal(k[3], (d, v), jnp.float32) * scale).astype(dtype),
        targets=jax.random.randint(k[4], (b, c), 0, v),
        sampler_logprobs=jnp.full((b, c), -jnp.log(float(v)), jnp.float32),
    )


def _objective(loss_fn, cfg):
    def value_and_grad(student_hidden, student_head, mask, teacher_hidden, teacher_head, targets, sampler_logprobs):
        def f(h, w):
            return loss_fn(h, w, mask, cfg, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                           targets=targets, sampler_logprobs=sampler_logprobs)[0]
        return jax.value_and_grad(f, argnums=(0, 1))(student_hidden, student_head)

    return jax.jit(value_and_grad)


def _measure(loss_fn, cfg, args, run: bool) -> dict:
    dtype = jnp.dtype(args.dtype)
    shapes = jax.eval_shape(lambda: _inputs(args, dtype))
    t0 = time.perf_counter()
    compiled = _objective(loss_fn, cfg).lower(**shapes).compile()
    out = {"compile_s": round(time.perf_counter() - t0, 2)}
    ma = compiled.memory_analysis()
    out.update(
        temp_bytes=ma.temp_size_in_bytes,
        argument_bytes=ma.argument_size_in_bytes,
        output_bytes=ma.output_size_in_bytes,
        total_bytes=ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes,
    )
    if run:
        inputs = jax.block_until_ready(jax.jit(lambda: _inputs(args, dtype))())
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            value, _ = jax.block_until_ready(compiled(**inputs))
            times.append(time.perf_counter() - t0)
        out.update(median_s=round(statistics.median(times), 3), runs=args.runs, loss=float(value))
        del inputs
    return out


def main(argv: list[str]) -> int:
    """Runs the benchmark and prints its JSON line."""
    args = _parse(argv)
    cfg = losses.LossConfig(name=args.loss, top_k=args.top_k, chunk_size=args.chunk_size,
                            vocab_chunk_size=args.vocab_chunk_size)
    chunked = _measure(losses.chunked_loss, cfg, args, run=not args.compile_only)
    dense = _measure(losses.dense_loss, cfg, args, run=not (args.skip_dense_run or args.compile_only))
    result = {
        "bench": "loss",
        "loss": args.loss,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "tokens": args.tokens,
        "batch": args.batch,
        "chunk_size": args.chunk_size,
        "top_k": args.top_k,
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "chunked": chunked,
        "dense": dense,
        "dense_over_chunked_temp": round(dense["temp_bytes"] / max(chunked["temp_bytes"], 1), 1),
        "dense_over_chunked_total": round(dense["total_bytes"] / max(chunked["total_bytes"], 1), 2),
    }
    if "median_s" in dense:
        result["dense_over_chunked_time"] = round(dense["median_s"] / chunked["median_s"], 2)
        result["abs_loss_diff"] = abs(dense["loss"] - chunked["loss"])
    if not args.json:
        gib = lambda n: f"{n / 2**30:8.2f} GiB"
        for name, r in (("chunked", chunked), ("dense", dense)):
            t = f"{r['median_s']:.3f} s" if "median_s" in r else "not run"
            print(f"{name:8s} temp {gib(r['temp_bytes'])}  total {gib(r['total_bytes'])}  time {t}", file=sys.stderr)
    print(json.dumps(result))
    return 0
