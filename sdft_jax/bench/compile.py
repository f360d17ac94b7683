"""Compile time of the jitted train step against depth, for a MoE model and a dense one.

`python -m sdft_jax.bench compile --layers 4 48 --json`

The step (`distill.train_step.make_train_step`) is lowered and compiled ahead of time on an abstract
train state (`distill.train_state.abstract_train_state` of an `nnx.eval_shape` model: no weight is
materialised), for each depth and each kind of model: `moe` (Qwen3-MoE, every layer sparse unless
`--dense-layers`) and `dense` (Qwen3 with the dense MLP). Layers are scanned (`decoder.DecoderStack`),
so compile time should barely grow with depth. `hybrid` is Qwen3.5-MoE-like (Gated DeltaNet x 3,
gated attention, repeated: one scan over periods of 4 layers; depths multiples of 4). Each measurement runs in a fresh process (nothing
cached from an earlier compile), the runs alternating over kinds and depths; `lower_s` is tracing and
lowering, `compile_s` XLA's compilation, `total_s` both, each the median of `--runs`; `hlo_lines` the
size of the compiled program (lines of its optimised HLO text), which does not depend on the machine's
load. `{kind}_ratio` is the deepest model's `total_s` over the shallowest's. Only compile time is
measured: the step is never run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from sdft_jax.bench.harness import finish_row, in_fresh_process

KINDS = ("moe", "dense", "hybrid")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench compile", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 48], help="depths to compile (>= 1 each)")
    p.add_argument("--kinds", default="moe,dense", help=f"comma-separated, of {KINDS}")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128, help="the dense MLP's hidden size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=32)
    p.add_argument("--dense-layers", type=int, nargs="*", default=[], help="the MoE model's dense layers")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--teacher-prompt-len", type=int, default=24)
    p.add_argument("--completion-len", type=int, default=16)
    p.add_argument("--loss", choices=["topk", "full_kl"], default="topk")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--remat", choices=["none", "full", "dots"], default="full", help="default: the trainer's")
    p.add_argument("--runs", type=int, default=3, help="fresh-process compiles per (kind, depth); median reported")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            p.error(f"--kinds: unknown kind {kind!r} (of {KINDS})")
    if not args.layers or min(args.layers) < 1:
        p.error("--layers: depths must be >= 1")
    return args


def model_config(kind: str, layers: int, a: dict):
    """The ModelConfig compiled for `kind` at depth `layers`: Qwen3-MoE, dense Qwen3, or a Qwen3.5-MoE
    hybrid (3 Gated DeltaNet layers then 1 gated attention layer, repeated; MoE with a shared expert) of
    the same widths."""
    from sdft_jax.models.config import ModelConfig
    from sdft_jax.models.gated_deltanet import DeltaNetConfig
    from sdft_jax.models.moe import MoeConfig

    moe = None
    if kind in ("moe", "hybrid"):
        moe = MoeConfig(num_experts=a["experts"], top_k=a["top_k"], expert_hidden=a["expert_hidden"],
                        shared_expert_hidden=a["expert_hidden"] if kind == "hybrid" else 0)
    common = dict(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                  num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, moe=moe)
    if kind == "hybrid":
        return ModelConfig(architecture="qwen3_5_moe", attention_output_gate=True, partial_rotary_factor=0.25,
                           zero_centered_norms=True, linear_layers=tuple(i for i in range(layers) if (i + 1) % 4),
                           deltanet=DeltaNetConfig(num_key_heads=2, num_value_heads=4, key_head_dim=16,
                                                   value_head_dim=16), **common)
    return ModelConfig(architecture="qwen3_moe" if kind == "moe" else "qwen3",
                       dense_layers=tuple(i for i in a["dense_layers"] if i < layers) if moe else (), **common)


def measure(a: dict) -> dict:
    """Lowers and compiles the train step of `a["kind"]` at depth `a["layers"]`; seconds of each."""
    import numpy as np
    from flax import nnx

    from sdft_jax.distill.batch import make_step_batch
    from sdft_jax.distill.losses import LossConfig
    from sdft_jax.distill.teacher import TeacherConfig
    from sdft_jax.distill.train_state import OptimConfig, abstract_train_state
    from sdft_jax.distill.train_step import StepConfig, make_train_step, shard_batch
    from sdft_jax.models.lora import LoraConfig
    from sdft_jax.models.transformer import Transformer

    cfg = model_config(a["kind"], a["layers"], a)
    lora = LoraConfig(rank=a["lora_rank"]) if a["lora_rank"] else None
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), lora=lora, remat=a["remat"]))
    step_cfg = StepConfig(loss=LossConfig(name=a["loss"]), teacher=TeacherConfig(mode="ema"),
                          optim=OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0))
    graphdef, state = abstract_train_state(model, step_cfg.optim)
    rng = np.random.default_rng(0)
    rows = lambda n: [list(rng.integers(3, a["vocab"], n)) for _ in range(a["batch"])]  # noqa: E731
    batch = shard_batch(make_step_batch(rows(a["prompt_len"]), rows(a["teacher_prompt_len"]),
                                        rows(a["completion_len"]), pad_id=0), None)
    step = make_train_step(graphdef, state, step_cfg)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - lowered_at
    return {"lower_s": lowered_at - start, "compile_s": compile_s, "hlo_lines": compiled.as_text().count("\n")}


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    shared = {k: v for k, v in vars(args).items() if k not in ("json", "kinds", "runs")}
    kinds = args.kinds.split(",")
    row: dict = {"bench": "compile", "layers": args.layers, "kinds": kinds, "runs": args.runs,
                 "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k,
                 "dense_layers": args.dense_layers, "lora_rank": args.lora_rank, "remat": args.remat,
                 "loadavg_start": round(os.getloadavg()[0], 2)}
    # Runs alternate over kinds and depths, so a change of load on the machine slows each about alike.
    results: dict[tuple[str, int], list[dict]] = {(kind, layers): [] for kind in kinds for layers in args.layers}
    for _ in range(args.runs):
        for kind, layers in results:
            results[(kind, layers)].append(in_fresh_process(measure, {**shared, "kind": kind, "layers": layers}))
    deepest, shallowest = str(max(args.layers)), str(min(args.layers))
    for kind in kinds:
        runs = {str(layers): results[(kind, layers)] for layers in args.layers}
        for figure, value in (("lower_s", lambda r: r["lower_s"]), ("compile_s", lambda r: r["compile_s"]),
                              ("total_s", lambda r: r["lower_s"] + r["compile_s"])):
            row[f"{kind}_{figure}"] = {d: round(statistics.median(map(value, rs)), 3) for d, rs in runs.items()}
        row[f"{kind}_hlo_lines"] = {d: rs[0]["hlo_lines"] for d, rs in runs.items()}
        row[f"{kind}_ratio"] = round(row[f"{kind}_total_s"][deepest] / row[f"{kind}_total_s"][shallowest], 3)
    finish_row(row, ["jax"], rate="", as_json=args.json, width=16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
