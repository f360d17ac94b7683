"""`python -m sdft_jax.bench accel --tiny`: on CPU in seconds, its JSON object and each figure's meaning;
the chip table; `launch/accel_check.sh`, which runs it."""

import json
import pathlib
import subprocess
import sys

import pytest

from sdft_jax.bench import accel
from sdft_jax.bench.step import step_flops

REPO = pathlib.Path(__file__).resolve().parents[2]


def accel_row(*flags: str) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert accel.main(["--tiny", "--json", *flags]) == 0
    lines = buffer.getvalue().strip().splitlines()
    assert len(lines) == 1, "one JSON object on one line"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def tiny_row():
    return accel_row()


def test_tiny_run_reports_every_field(tiny_row):
    row = tiny_row
    assert row["bench"] == "accel" and row["tiny"] is True and row["platform"] == "cpu"
    assert row["peak_bf16_tflops"] is None and "H100 SXM 989" in row["peak_note"]
    assert row["model"]["tied_embeddings"] and row["model"]["weights"] == "random bf16"

    step = row["step"]
    args = accel.parse_args(["--tiny"])
    shapes = accel.shapes(args)
    cfg = accel.model_config(True, shapes["layers"])
    assert step["step_flops"] == step_flops(cfg, shapes["batch"], shapes["prompt_len"], shapes["teacher_prompt_len"],
                                            shapes["completion_len"], 128)
    assert step["attention_kernel"] == "plain"  # auto on CPU
    assert step["step_s"] > 0 and step["mfu"] is None and step["loss_finite"]
    # The matmuls counted on the traced program agree with the analytic count (which counts attention to
    # the end of each query block, and not the blocked loss's recomputed logits), and in this bf16 model
    # none is fp32 x fp32 (the mixed ones take fp32 logit gradients or attention probabilities).
    assert sum(step["matmul_flops"].values()) == pytest.approx(step["step_flops"], rel=0.05)
    assert step["matmul_loops_counted_once"] == 0 and set(step["matmul_flops"]) <= {"bf16", "f32*bf16", "bf16*f32"}

    # The loss's teacher top-K on one chunk: the platform's against jax.lax.top_k, the same ids and values.
    assert row["top_k"]["rows"] == 256 and row["top_k"]["vocab"] == cfg.vocab_size and row["top_k"]["k"] == 20
    assert row["top_k"]["top_k_same"] is True and row["top_k"]["lax_ms"] > 0 and row["top_k"]["top_k_ms"] > 0

    # The breakdown: every part of the step with its share of the FLOPs and of the step's time.
    breakdown = step["breakdown"]
    parts = breakdown["parts"]
    assert tuple(parts) == ("teacher_forward", "student_forward_backward", "loss", "gradients")
    assert parts["gradients"]["flops"] == step["step_flops"]
    assert sum(parts[p]["flops"] for p in ("teacher_forward", "student_forward_backward", "loss")) == step["step_flops"]
    for part in parts.values():
        assert part["seconds"] > 0 and part["mfu"] is None
        assert part["share_of_step"] == pytest.approx(part["seconds"] / step["step_s"], abs=2e-3)
    assert breakdown["update_s"] == pytest.approx(step["step_s"] - parts["gradients"]["seconds"], abs=1e-4)

    rollout = row["rollout"]
    assert rollout["mode"] == "static"
    assert rollout["new_tokens"] == shapes["rollout_prompts"] * shapes["new_tokens"]  # no stop ids: every row runs
    assert rollout["tokens_per_s"] == pytest.approx(rollout["new_tokens"] / rollout["seconds"], rel=0.01)

    bf16, fp32 = row["attention_parity"]
    assert (bf16["dtype"], fp32["dtype"]) == ("bfloat16", "float32")
    assert bf16["kernel"] == fp32["kernel"] == "xla"  # CPU: the plain path's fused stand-in
    assert fp32["max_abs_out"] < 1e-5 and fp32["max_abs_grad"] < 1e-5
    # In bf16 the kernel is no further from the plain path than bf16 rounding puts the plain path from fp32.
    assert bf16["max_abs_out"] <= bf16["plain_bf16_vs_fp32_out"]
    assert bf16["max_abs_grad"] <= bf16["plain_bf16_vs_fp32_grad"]
    assert 0 < bf16["plain_bf16_vs_fp32_out"] < 0.1


def test_full_shape_is_qwen3_1_7b():
    shapes = accel.shapes(accel.parse_args([]))
    cfg = accel.model_config(False, shapes["layers"])
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (28, 2048, 16, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings, cfg.qk_norm) == (6144, 151936, True, True)
    assert accel.shapes(accel.parse_args(["--batch", "3", "--layers", "4"]))["batch"] == 3


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", None), ("cpu", None)])
def test_chip_peak(kind, peak):
    assert accel.chip_peak_tflops(kind) == peak


def test_continuous_mode_generates_every_row():
    """`--rollout-mode continuous` plugs in `sampling.continuous`: with no stop ids, every row runs to the end."""
    args = accel.parse_args(["--tiny", "--rollout-mode", "continuous", "--slots", "3"])
    shapes = accel.shapes(args)
    cfg = accel.model_config(True, shapes["layers"])
    row = accel.run_rollout(cfg, shapes, mode="continuous", attention="auto")
    assert row["slots"] == 3 and row["new_tokens"] == shapes["rollout_prompts"] * shapes["new_tokens"]


def test_runs_without_grain_ml_collections_or_datasets():
    """A GPU host may have none of them (the H200 image of docs/benchmarks.md has neither grain,
    ml_collections nor datasets): with the three unimportable, `python -m sdft_jax.bench accel` starts,
    and every module the bench imports (lazily, per part) imports."""
    code = """
import runpy, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("grain", "ml_collections", "datasets"):
            raise ImportError(f"no module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Missing())
import sdft_jax.bench.accel, sdft_jax.bench.step, sdft_jax.distill.train_step, sdft_jax.distill.batch
import sdft_jax.sampling.sampler, sdft_jax.sampling.continuous, sdft_jax.models.fused_attention
import sdft_jax.bench.step_parts
sys.argv = ["python -m sdft_jax.bench", "accel", "--help"]
runpy.run_module("sdft_jax.bench", run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "--rollout-mode" in proc.stdout


def test_launch_script_runs_the_bench(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch" / "accel_check.sh"), "--dry-run", "--skip", "rollout"],
                          capture_output=True, text=True, check=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.stdout.split() == ["python3", "-m", "sdft_jax.bench", "accel", "--json", "--skip", "rollout"]


def test_trace_only_counts_the_matmuls_of_the_step_that_runs(tiny_row):
    """`--trace-only` traces the same step on abstract weights: the same matmuls, nothing else run."""
    row = accel_row("--trace-only")
    assert set(row) - {"rollout", "attention_parity"} == set(tiny_row) - {"top_k", "rollout", "attention_parity"}
    assert "rollout" not in row and "attention_parity" not in row
    step, ran = row["step"], tiny_row["step"]
    assert step["matmul_flops"] == ran["matmul_flops"] and step["step_flops"] == ran["step_flops"]
    assert "step_s" not in step and "breakdown" not in step


def test_loss_chunking_flags_reach_the_step(tiny_row):
    """`--loss-chunk` / `--vocab-chunk` set the step's `LossConfig` chunking (for sweeping it on a device) and
    are reported; the loss does not depend on them."""
    assert (tiny_row["step"]["loss_chunk_size"], tiny_row["step"]["vocab_chunk_size"]) == (256, 16384)
    step = accel_row("--skip", "breakdown,top_k,rollout,parity", "--loss-chunk", "4", "--vocab-chunk", "0")["step"]
    assert (step["loss_chunk_size"], step["vocab_chunk_size"]) == (4, 0)
    assert step["loss"] == pytest.approx(tiny_row["step"]["loss"], rel=1e-4)
