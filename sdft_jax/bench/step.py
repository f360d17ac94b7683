"""One whole SDFT train step, ours against the same step in `transformers` torch.

`python -m sdft_jax.bench step --model smollm2-135m --batch 4 --prompt-len 256 --teacher-prompt-len 384
 --completion-len 128 --loss topk|full_kl [--lora-rank R] --json`

A step is: teacher forward on teacher_prompt ++ completion, student forward and backward on
student_prompt ++ completion, the loss over the completion, AdamW with clipping, EMA teacher update.
Both sides get the same random batch (every token real), fp32. Each engine runs in its own process.
Ours rematerialises per `--remat` (default `dots`: matmul outputs without batch dimensions are kept,
attention and elementwise ops recomputed in the backward pass, the fastest of the three on CPU);
torch keeps every activation.
Reported per engine: `tokens_per_s` (completion tokens per second of whole steps, median of `--runs`
after a first call), `step_s`, `peak_rss_mb`; ours also `compile_s`, `step_flops` and `mfu` =
step_flops / step_s / a matmul peak measured in the same process (a jitted 2048^3 fp32 matmul, median
of 5), reported as `matmul_peak_gflops`. `step_flops` is counted from the shapes (`step_flops()`:
every projection and attention matmul as computed (of a MoE layer, the router and the routed experts a
token runs: its active FLOPs); attention over the keys up to the end of each query block
(`attention.query_blocks`), the masked scores inside a block counted; the student's
forward counted once and its backward twice; the LM head over completion positions, including the
loss's recomputation of the student logits in its backward pass). XLA's own cost analysis is not
used: it counts the body of the scan over layers once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from sdft_jax.bench.harness import engine_prefix, finish_row, in_fresh_process, peak_rss_mb, timed


def _parse(argv):
    from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK

    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench step", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a registered name or an HF directory")
    p.add_argument("--random-model", choices=["qwen3_5", "qwen3_5_moe"], default=None,
                   help="instead of --model: a random Qwen3.5 model built by transformers at the size below, "
                        "its heads, experts and layer pattern those of Qwen3.5-35B-A3B scaled to --hidden")
    p.add_argument("--layers", type=int, default=8, help="--random-model: layers (3 linear : 1 full attention)")
    p.add_argument("--hidden", type=int, default=1024, help="--random-model: hidden size (a multiple of 128)")
    p.add_argument("--experts", type=int, default=32, help="--random-model: routed experts per layer")
    p.add_argument("--top-k", type=int, default=4, help="--random-model: experts per token")
    p.add_argument("--vocab", type=int, default=32768, help="--random-model: vocabulary size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--teacher-prompt-len", type=int, default=384)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--loss", choices=["topk", "full_kl"], default="topk")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--vocab-chunk-size", type=int, default=None,
                   help="the loss's vocab_chunk_size (default: LossConfig's; 0 = autodiff backward)")
    p.add_argument("--remat", choices=["none", "full", "dots"], default="dots",
                   help="our rematerialisation policy (default dots: the fastest on CPU, see docs/benchmarks.md)")
    p.add_argument("--query-block", type=int, default=DEFAULT_QUERY_BLOCK,
                   help=f"queries per attention block (default {DEFAULT_QUERY_BLOCK}, the library's; 0 = one block)")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="our step (not torch's) accumulates gradients over micro-batches of this many rows "
                        "(0 = the whole batch at once); the JSON's step_bytes is our compiled step's memory")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--engines", default="jax,torch")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed calls, trace one more of our steps with jax.profiler into DIR "
                        "(a Perfetto trace, perfetto_trace.json.gz, and the compiled HLO as step_hlo.txt: "
                        "each op's events map to the HLO op_name that says what it computes)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _batch(vocab: int, a: dict):
    import numpy as np

    from sdft_jax.distill.batch import make_step_batch

    rng = np.random.default_rng(0)
    rows = lambda n: [list(rng.integers(256, vocab, n)) for _ in range(a["batch"])]  # noqa: E731
    return make_step_batch(rows(a["prompt_len"]), rows(a["teacher_prompt_len"]), rows(a["completion_len"]),
                           pad_id=0)


def _matmul_peak_gflops() -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def step_flops(cfg, batch: int, prompt_len: int, teacher_prompt_len: int, completion_len: int,
               query_block: int) -> float:
    """Matmul FLOPs of one SDFT step (see the module docstring for what is counted)."""
    return float(sum(step_flops_parts(cfg, batch, prompt_len, teacher_prompt_len, completion_len,
                                      query_block).values()))


def step_flops_parts(cfg, batch: int, prompt_len: int, teacher_prompt_len: int, completion_len: int,
                     query_block: int) -> dict[str, float]:
    """`step_flops` by part of the step: `teacher_forward` (the teacher's layers over its prompt and the
    completion), `student_forward_backward` (the student's layers: forward, and a backward of twice
    that), `loss` (the LM heads inside the chunked loss: the teacher's logits, and the student's
    forward, recompute, d_hidden and d_head)."""
    from sdft_jax.models.attention import query_blocks

    H, E = cfg.num_heads, cfg.head_dim
    per_token = 2 * sum(_token_mixer_macs(cfg, kind.token_mixer) + _channel_macs(cfg, kind.channel_mixer)
                        for kind in cfg.layer_kinds)

    def forward(length: int) -> float:
        pairs = sum((end - start) * end for start, end in query_blocks(length, query_block))  # (query, key) scores
        attention = 2 * 2 * cfg.attention_layers * batch * pairs * H * E  # q.k and p.v
        return per_token * batch * length + attention

    head = 2 * cfg.hidden_size * cfg.vocab_size * batch * completion_len
    return dict(teacher_forward=float(forward(teacher_prompt_len + completion_len)),
                student_forward_backward=float(3 * forward(prompt_len + completion_len)),
                loss=float(head * 5))  # teacher; student forward, recompute, d_hidden, d_head


def _token_mixer_macs(cfg, mixer: str) -> int:
    """Multiply-adds per token of a token mixer, but attention's (query, key) products (counted per
    pair in `step_flops`): attention's projections (with Qwen3.5's output gate, q_proj's rows double),
    or Gated DeltaNet's projections and its chunked delta rule per value head (`DEFAULT_CHUNK` tokens a chunk:
    the chunk's k.k, q.k and its solve's products with v and k, its reads and write of the state; the
    unit-lower-triangular inverse itself, O(C^2) per token and head at most, is not counted)."""
    from sdft_jax.models.gated_deltanet import DEFAULT_CHUNK

    D = cfg.hidden_size
    if mixer == "attention":
        H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        return D * H * E * (2 if cfg.attention_output_gate else 1) + 2 * D * K * E + H * E * D
    net = cfg.deltanet
    Hk, Hv, Dk, Dv = net.num_key_heads, net.num_value_heads, net.key_head_dim, net.value_head_dim
    projections = D * (2 * Hk * Dk + 2 * Hv * Dv + 2 * Hv) + Hv * Dv * D
    rule = Hv * (DEFAULT_CHUNK * (3 * Dk + 2 * Dv) + 3 * Dk * Dv)
    return projections + rule


def _channel_macs(cfg, mixer: str) -> int:
    """Multiply-adds per token of a channel mixer: the dense MLP, or a MoE layer's router and the
    `top_k` routed experts a token runs (its active FLOPs), plus its shared expert and that one's gate."""
    D = cfg.hidden_size
    if mixer == "moe":
        moe = cfg.moe
        shared = (3 * D * moe.shared_expert_hidden + D) if moe.shared_expert_hidden else 0
        return D * moe.num_experts + 3 * D * moe.expert_hidden * moe.top_k + shared
    return 3 * D * cfg.intermediate_size


def run_jax(a: dict) -> dict:
    import jax

    from sdft_jax.bench.plan import memory_of
    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.distill.losses import LossConfig
    from sdft_jax.distill.teacher import TeacherConfig
    from sdft_jax.distill.train_state import OptimConfig, init_train_state
    from sdft_jax.distill.train_step import StepConfig, make_train_step, shard_batch
    from sdft_jax.models.lora import LoraConfig

    lora = LoraConfig(rank=a["lora_rank"]) if a["lora_rank"] else None
    model = load_hf(a["path"], lora=lora, remat=a["remat"], query_block=a["query_block"])
    chunking = {} if a["vocab_chunk_size"] is None else {"vocab_chunk_size": a["vocab_chunk_size"]}
    cfg = StepConfig(loss=LossConfig(name=a["loss"], **chunking), teacher=TeacherConfig(mode="ema"),
                     optim=OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0),
                     micro_batch_size=a["micro_batch_size"])
    graphdef, state = init_train_state(model, cfg.optim)
    del model
    batch = shard_batch(_batch(a["vocab"], a), None)
    step = make_train_step(graphdef, state, cfg)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    first, times = timed(call, a["runs"])
    step_s = statistics.median(times)
    if a.get("profile"):
        os.makedirs(a["profile"], exist_ok=True)
        with open(os.path.join(a["profile"], "step_hlo.txt"), "w") as f:
            f.write(compiled.as_text())
        with jax.profiler.trace(a["profile"], create_perfetto_trace=True):
            call()
    peak = _matmul_peak_gflops()
    flops = step_flops(_model_config(a["path"]), a["batch"], a["prompt_len"], a["teacher_prompt_len"],
                       a["completion_len"], a["query_block"])
    return dict(step_s=step_s, first_call_s=first, compile_s=compile_s, step_bytes=memory_of(compiled),
                step_flops=flops, matmul_peak_gflops=round(peak, 1), mfu=round(flops / step_s / (peak * 1e9), 4),
                peak_rss_mb=peak_rss_mb())


def _model_config(path: str):
    from sdft_jax.models.config import ModelConfig

    return ModelConfig.from_hf(path)


def run_torch(a: dict) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from sdft_jax.bench.torch_step import TorchSDFTStep, TorchStepConfig, random_adapters
    from sdft_jax.models.config import ModelConfig
    from sdft_jax.models.lora import LoraConfig

    torch.set_num_threads(a["threads"])
    cfg = ModelConfig.from_hf(a["path"])
    lora = random_adapters(cfg, LoraConfig(rank=a["lora_rank"])) if a["lora_rank"] else None
    ref = TorchSDFTStep(a["path"], TorchStepConfig(loss=a["loss"], top_k=20, learning_rate=1e-5, teacher="ema"),
                        lora=lora)
    batch = _batch(cfg.vocab_size, a)
    first, times = timed(lambda: ref.step(batch), a["runs"])
    return dict(step_s=statistics.median(times), first_call_s=first, peak_rss_mb=peak_rss_mb(),
                threads=torch.get_num_threads())


def write_random_qwen3_5(out_dir: str, architecture: str, layers: int, hidden: int, experts: int, top_k: int,
                         vocab: int) -> str:
    """A random Qwen3.5 directory (built and saved by `transformers`) shaped like Qwen3.5-35B-A3B at
    hidden size `hidden` (2048 there): layers 3 Gated DeltaNet : 1 gated attention; attention
    hidden/128 query heads and 2 KV heads of 256, partial RoPE 0.25; DeltaNet hidden/128 key and
    hidden/64 value heads of 128; `experts` routed experts of hidden/4, `top_k` per token, and a
    shared expert of hidden/4."""
    from sdft_jax.testing.tiny import write_tiny_qwen3_5_model

    if hidden % 128:
        raise ValueError(f"--hidden must be a multiple of 128, got {hidden}")
    sizes = dict(hidden_size=hidden, num_attention_heads=hidden // 128, num_key_value_heads=2, head_dim=256,
                 linear_num_key_heads=hidden // 128, linear_num_value_heads=hidden // 64, linear_key_head_dim=128,
                 linear_value_head_dim=128, vocab_size=vocab, max_position_embeddings=4096)
    if architecture == "qwen3_5_moe":
        sizes.update(moe_intermediate_size=hidden // 4, shared_expert_intermediate_size=hidden // 4)
    else:
        sizes.update(intermediate_size=3 * hidden)
    layer_types = [("full_attention" if i % 4 == 3 else "linear_attention") for i in range(layers)]
    return write_tiny_qwen3_5_model(out_dir, architecture, layer_types=layer_types, num_experts=experts,
                                    top_k=top_k, sizes=sizes)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.random_model is None:
        return _bench(args, args.model, _resolve(args.model))
    with tempfile.TemporaryDirectory(prefix="sdft-bench-model-") as tmp:
        path = in_fresh_process(_write_random, dict(
            out_dir=tmp, architecture=args.random_model, layers=args.layers, hidden=args.hidden,
            experts=args.experts, top_k=args.top_k, vocab=args.vocab))["path"]
        name = (f"random {args.random_model} {args.layers}x{args.hidden}"
                + (f" {args.experts} experts top-{args.top_k}" if args.random_model == "qwen3_5_moe" else ""))
        return _bench(args, name, path)


def _write_random(a: dict) -> dict:
    return {"path": write_random_qwen3_5(**a)}


def _resolve(model: str) -> str:
    from sdft_jax.checkpoints.registry import resolve_model

    return resolve_model(model)


def _bench(args, model_name: str, path: str) -> int:
    from sdft_jax.models.config import ModelConfig

    shared = dict(path=path, batch=args.batch, prompt_len=args.prompt_len, teacher_prompt_len=args.teacher_prompt_len,
                  completion_len=args.completion_len, loss=args.loss, lora_rank=args.lora_rank, remat=args.remat,
                  query_block=args.query_block, vocab_chunk_size=args.vocab_chunk_size,
                  micro_batch_size=args.micro_batch_size, runs=args.runs, threads=args.threads,
                  vocab=ModelConfig.from_hf(path).vocab_size, profile=args.profile)
    tokens = args.batch * args.completion_len
    row: dict = {"bench": "step", **{k: v for k, v in shared.items() if k not in ("path", "profile")},
                 **({"profile": args.profile} if args.profile else {}), "model": model_name,
                 "loadavg_start": round(os.getloadavg()[0], 2)}
    engines = args.engines.split(",")
    for engine in engines:
        r = in_fresh_process(run_jax if engine == "jax" else run_torch, shared)
        prefix = engine_prefix(engine)
        row[prefix + "tokens_per_s"] = round(tokens / r["step_s"], 2)
        row.update({prefix + k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    finish_row(row, engines, rate="tokens_per_s", as_json=args.json, width=22)
    return 0


if __name__ == "__main__":
    sys.exit(main())
