"""Accelerator check: what one GPU (or TPU chip) does with a Qwen3-1.7B-shaped model, as one JSON object.

`python -m sdft_jax.bench accel [--json] [--tiny] [--rollout-mode static|continuous] [shape flags]`
(`launch/accel_check.sh` runs it; on an H100 / H200 in under 8 minutes). No checkpoint: the model is
built from a `ModelConfig` with Qwen3-1.7B's shape (28 layers, hidden 2048, 16 query / 8 KV heads of
128, MLP 6144, vocabulary 151936, tied embeddings, q/k norms) and random bf16 weights, on one device.

Four figures:

- `step`: the SDFT train step (teacher forward, student forward and backward, top-k loss, AdamW, EMA
  teacher; full fine-tuning, bf16 compute, fp32 masters), median seconds of `--runs` steps after the
  compiling one; `mfu` = `step_flops` (counted as `bench.step.step_flops` counts them: every matmul as
  computed, attention up to the end of each 128-query block, the backward twice the forward) over the
  step time, against the chip's dense bf16 peak (`PEAK_BF16_TFLOPS`: H100 SXM and H200 989 TFLOP/s;
  null on a chip not in the table, e.g. CPU); `matmul_flops`: the step's matmuls by the dtypes they
  ask for (`bench.matmul_flops`: an fp32 matmul runs as TF32 on an H100 / H200, at half the bf16 rate).
- `breakdown` (inside `step`): where the step's time goes, without a profiler (`bench.step_parts`):
  the teacher forward, the student forward and backward, the chunked loss, and the three together
  (`gradients`), each compiled and timed as its own program on the step's state and batch, with its
  share of `step_flops` (`bench.step.step_flops_parts`), TFLOP/s, MFU and share of the step's time;
  `update_s` = step less `gradients`: the optimizer and the teacher update. `--skip breakdown` leaves
  it out.
- `top_k`: the loss's teacher top-K on one chunk of its logits ([`LossConfig.chunk_size` tokens, the
  vocabulary], K = `LossConfig.top_k`): `models.top_k.top_k` (what the loss runs; on GPU grouped, with
  sorts of short rows) against `jax.lax.top_k` (on XLA:GPU a sort of each whole row when K > 16), median
  milliseconds and whether the two agree (`bench.top_k`).
- `rollout`: the sampler's new tokens per second over `--rollout-prompts` prompts (every row runs to
  `--new-tokens`: no stop ids), second call; `--rollout-mode` chooses static batches (`Sampler`) or
  continuous batching (`sampling.continuous`).
- `attention_parity`: the platform's fused attention kernel (`fused_attention.select("auto")`; on CPU,
  where that is the plain path, the "xla" kernel) against the plain path on the model's head shapes,
  rows of ragged length padded as a train step pads them: max absolute difference of the outputs on
  real rows and of the gradients (q, k, v) of a loss over them; in bf16 (beside it the plain path's own
  bf16-vs-fp32 difference, the yardstick) and fp32 (cuDNN runs no fp32: there the "xla" kernel).

`--loss-chunk N` / `--vocab-chunk N` set the loss's token chunk and vocabulary block (`LossConfig.chunk_size`,
`vocab_chunk_size`; the step row reports both): the loss's loops run 32 x 10 small matmuls per pass at
the defaults, which a device session can sweep with `--skip breakdown,top_k,rollout,parity`.
`--tiny` shrinks every shape so the command runs on CPU in seconds (the test suite checks its fields).
`--trace-only` traces the step on abstract weights and reports `step.matmul_flops` alone, on any machine
in seconds: what the check's step asks of the tensor cores before a GPU is at hand.
It imports neither grain nor ml_collections (a GPU host may have neither).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

# Dense bf16 matmul peak per chip (TFLOP/s, without sparsity): NVIDIA's H100 SXM and H200 datasheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
PEAK_NOTE = "dense bf16 (no sparsity): H100 SXM 989 TFLOP/s, H200 989 TFLOP/s (NVIDIA datasheets)"
ROLLOUT_MODES = ("static", "continuous")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench accel", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model and shapes (CPU, seconds): for tests")
    p.add_argument("--layers", type=int, default=None, help="override the model's layer count (default 28)")
    p.add_argument("--batch", type=int, default=None, help="train step rows (default 8)")
    p.add_argument("--prompt-len", type=int, default=None, help="student prompt tokens (default 256)")
    p.add_argument("--teacher-prompt-len", type=int, default=None, help="teacher prompt tokens (default 512)")
    p.add_argument("--completion-len", type=int, default=None, help="completion tokens (default 1024)")
    p.add_argument("--remat", choices=["none", "full", "dots"], default="dots",
                   help="the step's rematerialisation (default dots, as bench step)")
    p.add_argument("--attention", choices=["auto", "plain", "xla", "cudnn", "splash"], default="auto",
                   help="the model's attention kernel (default auto: cuDNN on GPU, splash on TPU, plain on CPU)")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="the loss's token chunk, LossConfig.chunk_size (default its default, 256)")
    p.add_argument("--vocab-chunk", type=int, default=None,
                   help="the loss's vocabulary block, LossConfig.vocab_chunk_size (default 16384; 0 = autodiff)")
    p.add_argument("--runs", type=int, default=None, help="timed steps / rollouts after the first (default 5 / 2)")
    p.add_argument("--rollout-mode", choices=ROLLOUT_MODES, default="static")
    p.add_argument("--rollout-prompts", type=int, default=None, help="prompts per rollout (default 64)")
    p.add_argument("--slots", type=int, default=None,
                   help="continuous mode: decode slots (default: --rollout-prompts, every row at once)")
    p.add_argument("--rollout-prompt-len", type=int, default=None, help="tokens per prompt (default 256)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 512)")
    p.add_argument("--skip", default="",
                   help="comma-separated parts not to run: step, breakdown, top_k, rollout, parity")
    p.add_argument("--trace-only", action="store_true",
                   help="only trace the step on abstract weights and report its matmul FLOPs by dtype "
                        "(nothing allocated, compiled or run: any machine, seconds)")
    p.add_argument("--json", action="store_true", help="print the JSON object on one line")
    return p.parse_args(argv)


def shapes(args) -> dict:
    """The run's shapes: the full check's, or `--tiny`'s, with any flag given overriding."""
    base = (dict(layers=2, batch=2, prompt_len=8, teacher_prompt_len=12, completion_len=8, runs=1,
                 rollout_prompts=4, rollout_prompt_len=6, new_tokens=5, parity_len=24, parity_batch=2)
            if args.tiny else
            dict(layers=28, batch=8, prompt_len=256, teacher_prompt_len=512, completion_len=1024, runs=5,
                 rollout_prompts=64, rollout_prompt_len=256, new_tokens=512, parity_len=2048, parity_batch=4))
    base["slots"] = args.slots
    base["loss_chunk"], base["vocab_chunk"] = args.loss_chunk, args.vocab_chunk
    for name in ("layers", "batch", "prompt_len", "teacher_prompt_len", "completion_len", "runs", "rollout_prompts",
                 "rollout_prompt_len", "new_tokens"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    return base


def model_config(tiny: bool, layers: int):
    """Qwen3-1.7B's architecture (or a tiny one of the same family) with `layers` layers."""
    from sdft_jax.models.config import ModelConfig

    if tiny:
        return ModelConfig(architecture="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                           rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=True, qk_norm=True)
    return ModelConfig(architecture="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_layers=layers, num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
                       rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True)


def chip_peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device kind (e.g. "NVIDIA H100 80GB HBM3"), None when not in the table."""
    return next((peak for chip, peak in PEAK_BF16_TFLOPS.items() if chip in device_kind), None)


def loss_config(s: dict):
    """The step's loss: top-K (K = 20) with `LossConfig`'s chunking but where `--loss-chunk` /
    `--vocab-chunk` set it."""
    from sdft_jax.distill.loss_config import LossConfig

    chunking = {name: s[key] for name, key in (("chunk_size", "loss_chunk"), ("vocab_chunk_size", "vocab_chunk"))
                if s.get(key) is not None}
    return LossConfig(name="topk", **chunking)


def _random_model(cfg, *, remat: str, attention: str):
    import jax.numpy as jnp
    from flax import nnx

    from sdft_jax.models.transformer import Transformer

    return Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=remat,
                       attention=attention)


def _step_inputs(cfg, s: dict, *, remat: str, attention: str, abstract: bool = False):
    """(graphdef, state, batch, step config, attention kernel) of the check's step; with `abstract` the
    model and the state are shapes only (`jax.ShapeDtypeStruct`s: nothing allocated)."""
    import numpy as np
    from flax import nnx

    from sdft_jax.distill.batch import make_step_batch
    from sdft_jax.distill.teacher import TeacherConfig
    from sdft_jax.distill.train_state import OptimConfig, abstract_train_state, init_train_state
    from sdft_jax.distill.train_step import StepConfig, shard_batch

    build = lambda: _random_model(cfg, remat=remat, attention=attention)  # noqa: E731
    model = nnx.eval_shape(build) if abstract else build()
    kernel = model.attention_kernel()
    step_cfg = StepConfig(loss=loss_config(s), teacher=TeacherConfig(mode="ema"),
                          optim=OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0))
    graphdef, state = (abstract_train_state if abstract else init_train_state)(model, step_cfg.optim)
    rng = np.random.default_rng(0)
    rows = lambda n: [rng.integers(256, cfg.vocab_size, n).tolist() for _ in range(s["batch"])]  # noqa: E731
    batch = shard_batch(make_step_batch(rows(s["prompt_len"]), rows(s["teacher_prompt_len"]),
                                        rows(s["completion_len"]), pad_id=0), None)
    return graphdef, state, batch, step_cfg, kernel


def _chunking(step_cfg) -> dict:
    return dict(loss_chunk_size=step_cfg.loss.chunk_size, vocab_chunk_size=step_cfg.loss.vocab_chunk_size)


def trace_step(cfg, s: dict, *, remat: str, attention: str) -> dict:
    """The step traced on abstract weights, neither compiled nor run (`--trace-only`): its matmul FLOPs by
    operand dtypes (`bench.matmul_flops`) beside `step_flops`, in seconds on any machine."""
    from sdft_jax.bench.matmul_flops import matmul_flops
    from sdft_jax.bench.step import step_flops
    from sdft_jax.distill.train_step import make_train_step
    from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK

    graphdef, state, batch, step_cfg, kernel = _step_inputs(cfg, s, remat=remat, attention=attention, abstract=True)
    traced = make_train_step(graphdef, state, step_cfg).trace(state, batch)
    flops = step_flops(cfg, s["batch"], s["prompt_len"], s["teacher_prompt_len"], s["completion_len"],
                       DEFAULT_QUERY_BLOCK)
    return dict(attention_kernel=kernel, remat=remat, batch=s["batch"], prompt_len=s["prompt_len"],
                teacher_prompt_len=s["teacher_prompt_len"], completion_len=s["completion_len"],
                **_chunking(step_cfg), step_flops=flops, **matmul_flops(traced.jaxpr))


def run_step(cfg, s: dict, *, remat: str, attention: str, peak: float | None, breakdown: bool = False) -> dict:
    """The train step's time, FLOPs and MFU (see the module docstring)."""
    import jax
    import numpy as np

    from sdft_jax.bench.matmul_flops import matmul_flops
    from sdft_jax.bench.step import step_flops
    from sdft_jax.distill.train_step import make_train_step
    from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK

    graphdef, state, batch, step_cfg, kernel = _step_inputs(cfg, s, remat=remat, attention=attention)
    step = make_train_step(graphdef, state, step_cfg)
    start = time.perf_counter()
    traced = step.trace(state, batch)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    matmuls = matmul_flops(traced.jaxpr)
    del traced
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)
        return metrics

    call()
    times = []
    for _ in range(s["runs"]):
        start = time.perf_counter()
        metrics = call()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = step_flops(cfg, s["batch"], s["prompt_len"], s["teacher_prompt_len"], s["completion_len"],
                       DEFAULT_QUERY_BLOCK)
    achieved = flops / step_s / 1e12
    loss = float(metrics["loss"]) if "loss" in metrics else None
    row = dict(attention_kernel=kernel, remat=remat, batch=s["batch"], prompt_len=s["prompt_len"],
               teacher_prompt_len=s["teacher_prompt_len"], completion_len=s["completion_len"],
               **_chunking(step_cfg), compile_s=round(compile_s, 2), step_s=round(step_s, 6), runs=s["runs"],
               step_flops=flops,
               tflops_per_s=round(achieved, 2), peak_tflops=peak,
               mfu=None if peak is None else round(achieved / peak, 4),
               completion_tokens_per_s=round(s["batch"] * s["completion_len"] / step_s, 1),
               loss=loss, loss_finite=loss is not None and bool(np.isfinite(loss)), **matmuls)
    if breakdown:
        del compiled
        row["breakdown"] = step_breakdown(graphdef, holder["state"], batch, step_cfg, cfg, s, step_s=step_s,
                                          peak=peak)
    return row


def step_breakdown(graphdef, state, batch, step_cfg, cfg, s: dict, *, step_s: float, peak: float | None) -> dict:
    """The step's parts timed as programs of their own (`bench.step_parts`), each with its FLOPs (the
    `gradients` part: all of `step_flops`), TFLOP/s, MFU and share of `step_s`; `update_s` = the step less
    `gradients`."""
    from sdft_jax.bench.step import step_flops_parts
    from sdft_jax.bench.step_parts import part_programs, time_parts
    from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK

    timed = time_parts(part_programs(graphdef, state, batch, step_cfg), runs=s["runs"])
    flops = step_flops_parts(cfg, s["batch"], s["prompt_len"], s["teacher_prompt_len"], s["completion_len"],
                             DEFAULT_QUERY_BLOCK)
    flops["gradients"] = sum(flops.values())
    parts = {}
    for name, t in timed.items():
        achieved = flops[name] / t["seconds"] / 1e12
        parts[name] = dict(t, flops=flops[name], tflops_per_s=round(achieved, 2),
                           mfu=None if peak is None else round(achieved / peak, 4),
                           share_of_step=round(t["seconds"] / step_s, 3))
    return dict(parts=parts, update_s=round(step_s - timed["gradients"]["seconds"], 6))


def run_top_k(cfg, *, runs: int) -> dict:
    """The loss's teacher top-K on one chunk of logits: `models.top_k.top_k` against `jax.lax.top_k`."""
    from sdft_jax.bench.top_k import measure
    from sdft_jax.distill.loss_config import LossConfig

    loss = LossConfig()
    return measure(rows=loss.chunk_size, vocab=cfg.vocab_size, k=min(loss.top_k, cfg.vocab_size), runs=runs,
                   engines=("lax", "top_k"))


def run_rollout(cfg, s: dict, *, mode: str, attention: str) -> dict:
    """The sampler's new tokens per second (second call) in rollout `mode`."""
    import jax
    import numpy as np

    from sdft_jax.sampling.sampler import SamplingConfig

    model = _random_model(cfg, remat="none", attention=attention)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(256, cfg.vocab_size, s["rollout_prompt_len"]).tolist() for _ in range(s["rollout_prompts"])]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=s["new_tokens"],
                              prompt_buckets=(s["rollout_prompt_len"],), batch_buckets=(s["rollout_prompts"],))
    slots = s["slots"] or s["rollout_prompts"]
    generate = rollout_fn(mode, slots=slots)
    keys = iter(range(1 << 30))
    start = time.perf_counter()
    generate(model, prompts, sampling, jax.random.key(next(keys)))
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    lengths = generate(model, prompts, sampling, jax.random.key(next(keys)))
    seconds = time.perf_counter() - start
    new = int(np.sum(lengths))
    return dict(mode=mode, slots=slots if mode == "continuous" else None, prompts=s["rollout_prompts"], prompt_len=s["rollout_prompt_len"],
                max_new_tokens=s["new_tokens"], new_tokens=new, first_call_s=round(first_s, 2),
                seconds=round(seconds, 6), tokens_per_s=round(new / seconds, 1))


def rollout_fn(mode: str, *, slots: int):
    """`(model, prompts, sampling, key) -> each row's new-token count` for a rollout mode: static
    batches (`Sampler`) or continuous batching (`ContinuousSampler`), both on their default rollout
    weights (bf16 on accelerators)."""
    if mode not in ROLLOUT_MODES:
        raise ValueError(f"rollout mode must be one of {list(ROLLOUT_MODES)}, got {mode!r}")
    if mode == "continuous":
        from sdft_jax.sampling.continuous import ContinuousSampler

        sampler = ContinuousSampler(stop_ids=(), pad_id=0, slots=slots)
    else:
        from sdft_jax.sampling.sampler import Sampler

        sampler = Sampler(stop_ids=(), pad_id=0)
    return lambda model, prompts, sampling, key: sampler.generate(model, prompts, sampling, key).lengths


def run_parity(cfg, s: dict, *, platform: str) -> list[dict]:
    """The fused kernel against the plain path on the model's head shapes (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdft_jax.models import attention, fused_attention

    B, T = s["parity_batch"], s["parity_len"]
    rng = np.random.default_rng(2)
    mask = np.zeros((B, T), bool)
    for b in range(B):  # a left-padded prompt ++ a right-padded completion, ragged
        start = int(rng.integers(0, T // 4))
        mask[b, start:start + int(rng.integers(T // 2, T - start + 1))] = True
    mask = jnp.asarray(mask)
    visible = attention.causal_visibility(jnp.arange(T), mask)
    keys = jax.random.split(jax.random.key(3), 4)
    q32 = jax.random.normal(keys[0], (B, T, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim), jnp.float32)
    k32, v32 = (jax.random.normal(key, (B, T, cfg.num_kv_heads, cfg.head_dim), jnp.float32) for key in keys[1:3])
    weights = jax.random.normal(keys[3], q32.shape, jnp.float32) * mask[:, :, None, None, None]

    def with_grads(kernel, dtype):
        def loss(q, k, v):
            if kernel == "plain":
                out = attention.causal_attention(q, k, v, visible, query_block=0)
            else:
                out = fused_attention.attend(q, k, v, visible, kernel=kernel, causal=True)
            return jnp.sum(out.astype(jnp.float32) * weights), out

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        (_, out), grads = fn(*(x.astype(dtype) for x in (q32, k32, v32)))
        real = np.asarray(mask)[:, :, None, None, None]
        return np.where(real, np.asarray(out, np.float32), 0), [np.asarray(g, np.float32) for g in grads]

    def max_diff(a, b):
        out_a, grads_a = a
        out_b, grads_b = b
        return (float(np.abs(out_a - out_b).max()),
                max(float(np.abs(x - y).max()) for x, y in zip(grads_a, grads_b, strict=True)))

    plain32 = with_grads("plain", jnp.float32)
    rows = []
    for dtype in (jnp.bfloat16, jnp.float32):
        kernel = fused_attention.select("auto", platform=platform, dtype=dtype)
        kernel = "xla" if kernel == "plain" else kernel
        plain = plain32 if dtype == jnp.float32 else with_grads("plain", dtype)
        out_diff, grad_diff = max_diff(with_grads(kernel, dtype), plain)
        row = dict(dtype=jnp.dtype(dtype).name, kernel=kernel, batch=B, length=T, max_abs_out=out_diff,
                   max_abs_grad=grad_diff)
        if dtype == jnp.bfloat16:
            row["plain_bf16_vs_fp32_out"], row["plain_bf16_vs_fp32_grad"] = max_diff(plain, plain32)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    started = time.perf_counter()
    s = shapes(args)
    cfg = model_config(args.tiny, s["layers"])
    device = jax.devices()[0]
    platform = jax.default_backend()
    peak = chip_peak_tflops(device.device_kind)
    skip = {part for part in args.skip.split(",") if part}
    unknown = skip - {"step", "breakdown", "top_k", "rollout", "parity"}
    if unknown:
        raise ValueError(f"--skip: unknown parts {sorted(unknown)} (step, breakdown, top_k, rollout, parity)")
    row: dict = dict(bench="accel", device=device.device_kind, platform=platform, device_count=jax.device_count(),
                     jax_version=jax.__version__, tiny=args.tiny, peak_bf16_tflops=peak, peak_note=PEAK_NOTE,
                     model=dict(shape="Qwen3-1.7B" if not args.tiny else "tiny qwen3", layers=cfg.num_layers,
                                hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                                head_dim=cfg.head_dim, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
                                tied_embeddings=cfg.tie_word_embeddings, weights="random bf16"))
    if args.trace_only:
        row["step"] = trace_step(cfg, s, remat=args.remat, attention=args.attention)
        skip = {"step", "top_k", "rollout", "parity"}
    if "step" not in skip:
        row["step"] = run_step(cfg, s, remat=args.remat, attention=args.attention, peak=peak,
                               breakdown="breakdown" not in skip)
    if "top_k" not in skip:
        row["top_k"] = run_top_k(cfg, runs=args.runs or 5)
    if "rollout" not in skip:
        row["rollout"] = run_rollout(cfg, s, mode=args.rollout_mode, attention=args.attention)
    if "parity" not in skip:
        row["attention_parity"] = run_parity(cfg, s, platform=platform)
    row["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(row) if args.json else json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
