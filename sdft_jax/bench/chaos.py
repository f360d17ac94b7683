"""Kill -9 at random moments: a tiny run killed and resumed must end exactly as an uninterrupted one.

`python -m sdft_jax.bench chaos --trials 20 --seed 0`

A tiny random llama (`testing.tiny`) trains for a few steps (`testing.configs.tiny_config`: rollout,
step, evaluation at the start and the end, a checkpoint every step, the export) in a child process,
once uninterrupted (the reference, timed) and then once per trial on a fresh run directory. Each trial
kills the child with SIGKILL at a moment drawn from the seeded generator, restarts it on the same run
directory until it finishes, and compares the result with the reference (`compare_runs`): every
metrics row (all values but timings and per-process counters), `summary.json` (but the export's path),
and every exported tensor bit for bit; a partial file or Orbax temporary directory left at the end is a
difference too.

The moment of the kill, by trial in turn (`--targets`):
- `uniform`: a time drawn uniformly over the reference's wall time (from the child's start; most land
  in start-up and compilation, which is where a real run spends its time on a tiny model);
- `checkpoint`: as soon as an Orbax temporary directory of a step >= k (drawn) appears: mid-save;
- `metrics_row`: as soon as metrics.jsonl holds k (drawn) complete rows;
- `export`: as soon as the export's `.export.partial-*` directory appears: mid-export;
- `summary`: as soon as the export is in place, before (or while) `summary.json` is written;
- `metrics_rewrite`: killed mid-save first (so the restart has rows to drop), then the restart is
  killed as soon as it rewrites metrics.jsonl (its partial file, or a new file in place).
The run directory is polled every `--poll-ms`, so a write shorter than that (a rewrite of a small
metrics file) is usually killed just after it; each attempt reports what the kill left (`left`: partial
files, temporary directories, a torn metrics line), which says which window was hit. The in-process
fault injection of tests/trainer_test.py hits each window exactly; this checks the real signal.

Prints one JSON object: `trials`, `identical`, `failures`, the reference's seconds and timeline (when
each kind of file first appeared), and per trial its attempts (target, kill time, what was left),
`restarts` and the first difference. Exits 1 when a trial failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from sdft_jax.cache import is_partial

TARGETS = ("uniform", "checkpoint", "metrics_row", "export", "summary", "metrics_rewrite")
# Metric values that differ between processes by design: wall-clock times, throughput, and the sampler's
# count of programs compiled by this process.
VOLATILE_PREFIXES = ("time/",)
VOLATILE_KEYS = ("tokens_per_s", "sampler/compilations")

_CHILD = ("import json, sys\n"
          "from sdft_jax.config import load_train_config\n"
          "from sdft_jax.testing.configs import tiny_config\n"
          "from sdft_jax.trainer import train\n"
          "train(load_train_config(tiny_config(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))))\n")


# -- comparing two run directories -----------------------------------------------------------------------

def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE_PREFIXES) and k not in VOLATILE_KEYS}


def _metrics_difference(reference: str, run: str) -> str | None:
    from sdft_jax.metrics import read_metrics

    rows_a, rows_b = read_metrics(reference), read_metrics(run)
    if len(rows_a) != len(rows_b):
        return f"metrics.jsonl: {len(rows_b)} rows, the reference has {len(rows_a)}"
    for number, (a, b) in enumerate(zip(rows_a, rows_b), start=1):
        a, b = _compared(a), _compared(b)
        if a.keys() != b.keys():
            return f"metrics.jsonl row {number}: keys {sorted(a.keys() ^ b.keys())} in one run only"
        for key in a:
            if not _same_value(a[key], b[key]):
                return f"metrics.jsonl row {number} (step {a.get('step')}): {key} = {b[key]!r}, reference {a[key]!r}"
    return None


def _summary_difference(reference: str, run: str) -> str | None:
    from sdft_jax import storage

    summaries = []
    for d in (reference, run):
        path = os.path.join(d, "summary.json")
        if not os.path.exists(path):
            return f"{path}: missing"
        summary = storage.read_json(path)
        # The export's path names its own run directory; what it holds is compared below.
        summary["export"] = os.path.basename(summary["export"]) if summary.get("export") else summary.get("export")
        summaries.append({k: v for k, v in summary.items() if not k.startswith("time")})
    if summaries[0] != summaries[1]:
        keys = sorted(k for k in summaries[0].keys() | summaries[1].keys()
                      if summaries[0].get(k) != summaries[1].get(k))
        return f"summary.json: {keys[0]} = {summaries[1].get(keys[0])!r}, reference {summaries[0].get(keys[0])!r}"
    return None


def _export_difference(reference: str, run: str) -> str | None:
    from sdft_jax.checkpoints.safetensors_io import SafetensorsDir

    dirs = [os.path.join(d, "export") for d in (reference, run)]
    if not os.path.isdir(dirs[1]):
        return f"{dirs[1]}: missing"
    files = [sorted(os.listdir(d)) for d in dirs]
    if files[0] != files[1]:
        return f"export: files {files[1]}, reference {files[0]}"
    a, b = SafetensorsDir(dirs[0]), SafetensorsDir(dirs[1])
    if a.names != b.names:
        return f"export: tensors {sorted(a.names ^ b.names)} in one run only"
    for name in sorted(a.names):
        x, y = np.asarray(a.read(name)), np.asarray(b.read(name))
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"export: {name} is {y.dtype}{list(y.shape)}, reference {x.dtype}{list(x.shape)}"
        if x.tobytes() != y.tobytes():
            differ = np.frombuffer(x.tobytes(), np.uint8) != np.frombuffer(y.tobytes(), np.uint8)
            return f"export: {name}: {int(np.count_nonzero(differ))} bytes differ"
    for file in files[0]:  # config, tokenizer: the same bytes
        if not file.endswith(".safetensors"):
            with open(os.path.join(dirs[0], file), "rb") as f, open(os.path.join(dirs[1], file), "rb") as g:
                if f.read() != g.read():
                    return f"export: {file} differs"
    return None


def leftovers(run: str) -> list[str]:
    """Paths (relative to `run`) of what interrupted writes leave: atomic writes' partials, Orbax
    temporary directories, and `metrics.jsonl#torn` for a metrics file whose last line has no newline."""
    out = []
    for root, dirs, files in os.walk(run):
        for name in dirs + files:
            if is_partial(name) or ".orbax-checkpoint-tmp" in name:
                out.append(os.path.relpath(os.path.join(root, name), run))
    metrics = os.path.join(run, "metrics.jsonl")
    if os.path.exists(metrics) and os.path.getsize(metrics):
        with open(metrics, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                out.append("metrics.jsonl#torn")
    return sorted(out)


def compare_runs(reference: str, run: str) -> str | None:
    """The first difference between two finished run directories (None: identical): metrics rows (all
    but volatile values), summary (but the export's path), exported tensors bit for bit and the export's
    other files byte for byte, then anything an interrupted write left in `run`."""
    for check in (_metrics_difference, _summary_difference, _export_difference):
        difference = check(reference, run)
        if difference:
            return difference
    left = leftovers(run)
    return f"left behind: {left}" if left else None


# -- watching and killing a child run ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a poll of the run directory saw."""
    elapsed: float  # seconds since the child started
    rows: int  # complete lines of metrics.jsonl
    saving: tuple[int, ...]  # steps of Orbax temporary checkpoint directories
    metrics_inode: int | None
    metrics_partial: bool
    export_partial: bool
    exported: bool
    summary: bool


def snapshot(run: str, elapsed: float) -> Snapshot:
    names = os.listdir(run) if os.path.isdir(run) else []
    ckpt = os.path.join(run, "checkpoints")
    saving = []
    for name in os.listdir(ckpt) if os.path.isdir(ckpt) else []:
        head = name.split(".", 1)[0]
        if ".orbax-checkpoint-tmp" in name and head.isdigit():
            saving.append(int(head))
    metrics = os.path.join(run, "metrics.jsonl")
    rows, inode = 0, None
    try:
        with open(metrics, "rb") as f:
            rows, inode = f.read().count(b"\n"), os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        pass
    return Snapshot(elapsed=elapsed, rows=rows, saving=tuple(sorted(saving)), metrics_inode=inode,
                    metrics_partial=any(is_partial(n) and n.startswith(".metrics.jsonl") for n in names),
                    export_partial=any(is_partial(n) and n.startswith(".export") for n in names),
                    exported=os.path.isfile(os.path.join(run, "export", "config.json")),
                    summary="summary.json" in names)


@dataclasses.dataclass(frozen=True)
class Kill:
    """When to kill one attempt: `target` (of TARGETS but metrics_rewrite, plus `rewrite`) and its number
    (seconds for `uniform`, a step for `checkpoint`, a row count for `metrics_row`)."""
    target: str
    at: float = 0.0

    def fires(self, s: Snapshot, first: Snapshot) -> bool:
        if self.target == "uniform":
            return s.elapsed >= self.at
        if self.target == "checkpoint":
            return any(step >= self.at for step in s.saving)
        if self.target == "metrics_row":
            return s.rows >= self.at
        if self.target == "export":
            return s.export_partial
        if self.target == "summary":
            return s.exported and not s.summary
        if self.target == "rewrite":  # the restart's rewrite of metrics.jsonl: its partial, or a new file
            return s.metrics_partial or (s.metrics_inode is not None and s.metrics_inode != first.metrics_inode)
        raise ValueError(f"unknown kill target {self.target!r}")


@dataclasses.dataclass
class Attempt:
    returncode: int
    seconds: float
    killed_at: float | None  # seconds after the start, None if it was not killed
    left: list[str]  # what the kill left (leftovers)
    timeline: dict[str, float]  # when each kind of file first appeared
    log: str


def run_child(model_dir: str, run: str, overrides: dict, log_path: str, *, kill: Kill | None = None,
              poll_s: float = 0.005, timeout_s: float = 600.0, env: dict | None = None) -> Attempt:
    """Runs the tiny training in a child process on `run` and, if `kill` fires first, SIGKILLs it."""
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, model_dir, run, json.dumps(overrides)],
                                stdout=log, stderr=log, env=env, start_new_session=True)
    first = snapshot(run, 0.0)
    timeline: dict[str, float] = {}
    killed_at = None
    while proc.poll() is None:
        elapsed = time.perf_counter() - start
        s = snapshot(run, elapsed)
        for event, seen in (("metrics_row", s.rows > 0), ("checkpoint_save", bool(s.saving)),
                            ("export_partial", s.export_partial), ("exported", s.exported), ("summary", s.summary)):
            if seen:
                timeline.setdefault(event, round(elapsed, 3))
        if kill is not None and kill.fires(s, first):
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and nothing else
            killed_at = elapsed
            break
        if elapsed > timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"the training child ran past {timeout_s:.0f} s (log: {log_path})")
        time.sleep(poll_s)
    returncode = proc.wait()
    seconds = time.perf_counter() - start
    with open(log_path, "rb") as f:
        tail = f.read()[-2000:].decode("utf-8", "replace")
    return Attempt(returncode, seconds, killed_at, leftovers(run) if killed_at is not None else [], timeline, tail)


# -- trials ------------------------------------------------------------------------------------------------

def plan_kills(target: str, rng: np.random.Generator, reference_s: float, steps: int, rows: int) -> list[Kill]:
    """The kills of one trial, one per attempt before the last, drawn from `rng`."""
    if target == "uniform":
        return [Kill("uniform", round(float(rng.uniform(0.0, reference_s)), 3))]
    if target == "checkpoint":
        return [Kill("checkpoint", int(rng.integers(1, steps + 1)))]
    if target == "metrics_row":
        return [Kill("metrics_row", int(rng.integers(1, rows + 1)))]
    if target == "metrics_rewrite":
        return [Kill("checkpoint", int(rng.integers(1, steps + 1))), Kill("rewrite")]
    return [Kill(target)]


def run_trial(trial: int, target: str, kills: list[Kill], model_dir: str, reference: str, work: str,
              overrides: dict, env: dict, max_restarts: int) -> dict:
    run = os.path.join(work, f"trial_{trial:03d}")
    log_path = run + ".log"
    attempts, difference = [], None
    for number in range(len(kills) + max_restarts + 1):
        kill = kills[number] if number < len(kills) else None
        a = run_child(model_dir, run, overrides, log_path, kill=kill, env=env)
        attempts.append({"target": kill.target if kill else None, "at": kill.at if kill else None,
                         "killed": a.killed_at is not None,
                         "kill_s": round(a.killed_at, 3) if a.killed_at is not None else None,
                         "left": a.left, "returncode": a.returncode})
        if a.killed_at is None and a.returncode != 0:
            last = [line for line in a.log.splitlines() if line.strip()]
            difference = f"attempt {number + 1} exited {a.returncode}: {last[-1] if last else ''}"
            break
        if a.killed_at is None:  # finished (a kill that never fired: the run ended first)
            break
    else:
        difference = f"not finished after {max_restarts} restarts"
    if difference is None:
        difference = compare_runs(reference, run)
    return {"trial": trial, "target": target, "attempts": attempts, "restarts": len(attempts) - 1,
            "identical": difference is None, "difference": difference}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench chaos", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6, help="killed runs, each compared with the reference")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, taken in turn, of {TARGETS}")
    p.add_argument("--steps", type=int, default=3, help="training steps of the tiny run")
    p.add_argument("--devices", type=int, default=2, help="fake CPU devices of the child (mesh data x tensor)")
    p.add_argument("--max-restarts", type=int, default=3, help="unkilled restarts allowed to finish a trial")
    p.add_argument("--work-dir", default=None, help="where runs go (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    for target in args.targets.split(","):
        if target not in TARGETS:
            p.error(f"--targets: unknown target {target!r} (of {TARGETS})")
    if args.trials < 1 or args.steps < 1 or args.devices < 1 or args.max_restarts < 0:
        p.error("--trials, --steps and --devices must be >= 1, --max-restarts >= 0")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from sdft_jax.testing.tiny import write_tiny_model

    load_start = round(os.getloadavg()[0], 2)
    work = args.work_dir or tempfile.mkdtemp(prefix="sdft_jax-chaos-")
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    # Saved asynchronously (the trainer's default): the save overlaps the next step, a wider window.
    overrides = {"train.steps": args.steps, "checkpoint.async_save": True, "mesh.data": args.devices,
                 "mesh.tensor": 1}
    try:
        model_dir = write_tiny_model(os.path.join(work, "model"), "llama")
        reference = os.path.join(work, "reference")
        ref = run_child(model_dir, reference, overrides, reference + ".log", env=env)
        if ref.returncode != 0:
            raise RuntimeError(f"the uninterrupted run failed ({ref.returncode}): {ref.log[-500:]}")
        from sdft_jax.metrics import read_metrics

        rows = len(read_metrics(reference))
        rng = np.random.default_rng(args.seed)
        targets = args.targets.split(",")
        trials = []
        for trial in range(args.trials):
            target = targets[trial % len(targets)]
            kills = plan_kills(target, rng, ref.seconds, args.steps, rows)
            result = run_trial(trial, target, kills, model_dir, reference, work, overrides, env, args.max_restarts)
            trials.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    finally:
        if not (args.keep or args.work_dir):
            shutil.rmtree(work, ignore_errors=True)
    identical = sum(t["identical"] for t in trials)
    out = {"bench": "chaos", "trials": len(trials), "identical": identical, "failures": len(trials) - identical,
           "seed": args.seed, "steps": args.steps, "devices": args.devices, "reference_s": round(ref.seconds, 2),
           "reference_timeline": ref.timeline, "per_trial": trials, "loadavg_start": load_start,
           "loadavg_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(out))
    return 0 if identical == len(trials) else 1
