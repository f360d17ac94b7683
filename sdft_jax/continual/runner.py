"""Runs a continual-learning plan: the base evaluation, then every stage in order; finished parts are skipped.

A stage is finished when its `summary.json` exists (the trainer writes it last, after the export);
an interrupted stage resumes from its latest checkpoint through the trainer itself. A stage that
diverges (`trainer.DivergedError`: nothing exported) is recorded in its `diverged.json` and the plan
goes on: one learning rate too large for a method does not stop a sweep; that stage and the stage 2
after it are skipped (now and on a restart), and the report lists them. The base
evaluation is finished when `<out_dir>/base/summary.json` exists. With `diagnose_teacher`, the
teacher-with-demonstration evaluations of `teacher_eval.py` run once, the stage-1 one just before its
cell's stage 2. Before each stage a progress line (`progress_line`) says which stage of how many starts,
and the time left, from the stages trained so far. After the runs, the report (results.csv, results.md,
results.png, the frontier files) is rebuilt from the files on disk.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from sdft_jax import distributed, storage
from sdft_jax.continual import teacher_eval
from sdft_jax.continual.plan import Plan, Run, diverged_path
from sdft_jax.continual.report import write_report

log = logging.getLogger(__name__)


def _read_json(path: str) -> dict[str, Any] | None:
    return storage.read_json(path) if storage.exists(path) else None


def evaluate_base(plan: Plan) -> dict[str, Any]:
    """Evaluates the starting model on every task of the plan (skipped when done); returns its summary."""
    path = os.path.join(plan.base_dir, "summary.json")
    done = _read_json(path)
    if done is not None:
        return done
    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.checkpoints.registry import resolve_model
    from sdft_jax.eval.runner import evaluate_tasks
    from sdft_jax.models.sharding import make_mesh
    from sdft_jax.sampling.sampler import Sampler
    from sdft_jax.tokenization import load_tokenizer, pad_token_id, stop_token_ids
    from sdft_jax.trainer import DTYPES, load_records

    cfg = plan.base_config
    t0 = time.perf_counter()
    mesh = make_mesh(cfg.mesh.shape())
    model_path = resolve_model(cfg.init_from or cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    model = load_hf(model_path, mesh=mesh, dtype=DTYPES[cfg.model.dtype], param_dtype=DTYPES[cfg.model.param_dtype])
    sampler = Sampler(stop_ids=stop_token_ids(tokenizer), pad_id=pad_token_id(tokenizer), mesh=mesh,
                      weights=cfg.rollout.weights())
    records = {t: load_records(cfg, t, "eval") for t in plan.eval_tasks}
    primary = jax.process_index() == 0
    evals = evaluate_tasks(model, tokenizer, sampler, records, limit=cfg.eval.limit,
                           max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                           prompt_config=cfg.prompts, scoring=cfg.eval.scoring,
                           out_dir=os.path.join(plan.base_dir, "eval") if primary else None)
    summary = {"model": model_path, "eval": evals, "time_s": time.perf_counter() - t0}
    if primary:
        storage.write_json(path, summary)
    return summary


def _stage1_dir(run: Run) -> str:
    return os.path.join(os.path.dirname(run.config.run_dir.rstrip("/")), "stage1")


def skip_reason(run: Run) -> str | None:
    """Why `run` is not trained now: finished before, diverged before, or its stage 1 diverged; None = train."""
    if storage.exists(os.path.join(run.config.run_dir, "summary.json")):
        return "finished before"
    if storage.exists(diverged_path(run.config.run_dir)):
        return "diverged before"
    if run.stage == 2 and storage.exists(diverged_path(_stage1_dir(run))):
        return "stage 1 diverged"
    return None


def run_stage(run: Run) -> dict[str, Any] | None:
    """Trains one stage and returns its summary (or the one it finished with before); None when it diverges
    (recorded in its `diverged.json`) or is skipped for a divergence (`skip_reason`)."""
    summary = _read_json(os.path.join(run.config.run_dir, "summary.json"))
    if summary is not None:
        log.info("%s stage %d: finished before, skipped", run.name, run.stage)
        return summary
    reason = skip_reason(run)
    if reason is not None:
        log.warning("%s stage %d: %s, skipped", run.name, run.stage, reason)
        return None
    # Stage 2 continues stage 1's export (full fine-tuning) or last checkpoint (LoRA); the summary is
    # written after both, so a stage 1 with one has them complete.
    stage1 = _stage1_dir(run)
    if run.stage == 2 and not storage.exists(os.path.join(stage1, "summary.json")):
        raise FileNotFoundError(f"{run.name} stage 2 continues stage 1 ({stage1}), which has not finished "
                                "(no summary.json)")
    from sdft_jax.trainer import DivergedError, train

    t0 = time.perf_counter()
    try:
        summary = train(run.config)
    except DivergedError as e:
        if jax.process_index() == 0:
            storage.write_json(diverged_path(run.config.run_dir), {
                "step": e.step, "nonfinite_steps": e.nonfinite_steps, "message": str(e),
                "time_s": time.perf_counter() - t0})
        log.error("%s stage %d diverged at step %d; the plan goes on without it", run.name, run.stage, e.step)
        jax.clear_caches()
        gc.collect()
        return None
    log.info("%s stage %d: %.0f s, eval %s", run.name, run.stage, time.perf_counter() - t0,
             {t: s["accuracy"] for t, s in summary["eval"].items()})
    # Each stage builds its own model, sampler and step: drop their compiled programs before the next.
    jax.clear_caches()
    gc.collect()
    return summary


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5940 else f"{seconds / 3600:.1f} h"


def progress_line(index: int, total: int, run: Run, trained_s: Sequence[float], *,
                  skipped: str | None = None) -> str:
    """The line printed as stage `index` (1-based) of `total` starts, e.g.
    `[3/12] sdft_topk lr 5e-05 seed 0 stage 1: 2 stages trained, 6.0 min each; ETA 1.0 h`, or with
    `skipped` (a `skip_reason`) `...: finished before, skipped`.

    The ETA is the mean time of the stages trained so far (in this invocation; skipped stages cost
    nothing) times the stages left, this one included.
    """
    head = f"[{index}/{total}] {run.method} lr {run.learning_rate:g} seed {run.seed} stage {run.stage}"
    if skipped:
        return f"{head}: {skipped}, skipped"
    if not trained_s:
        return f"{head}: starting (ETA after the first stage)"
    mean = sum(trained_s) / len(trained_s)
    left = total - index + 1
    return (f"{head}: {len(trained_s)} stage{'s' if len(trained_s) > 1 else ''} trained, {_minutes(mean)} each; "
            f"ETA {_minutes(mean * left)}")


def _print_line(line: str) -> None:
    print(line, flush=True)


def run_plan(plan: Plan, *, compilation_cache: bool = True, progress: Callable[[str], None] = _print_line) -> str:
    """Runs the whole plan and writes the report; returns the path of results.md. `progress` receives a
    line before each stage (`progress_line`)."""
    from sdft_jax.trainer import config_fingerprint

    distributed.maybe_initialize(plan.base_config.distributed, fingerprint=config_fingerprint(plan.base_config))
    if compilation_cache:
        # Every stage compiles the same programs (same shapes); the persistent cache makes it once.
        jax.config.update("jax_compilation_cache_dir", os.path.join(plan.out_dir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    storage.makedirs(plan.out_dir)
    t0 = time.perf_counter()
    evaluate_base(plan)
    if plan.diagnose_teacher:
        teacher_eval.evaluate_base_teacher(plan)
    trained_s: list[float] = []
    for index, run in enumerate(plan.runs, 1):
        skipped = skip_reason(run)
        progress(progress_line(index, len(plan.runs), run, trained_s, skipped=skipped))
        if skipped is not None and skipped != "finished before":
            continue
        finished = skipped is not None
        start = time.perf_counter()
        if plan.diagnose_teacher and teacher_eval.needs_stage1_teacher(plan, run):
            # before stage 2 trains (or, for a stage 2 finished before the switch was on, now)
            teacher_eval.evaluate_stage1_teacher(plan, run)
            jax.clear_caches()
            gc.collect()
        run_stage(run)
        if not finished:
            trained_s.append(time.perf_counter() - start)
    log.info("all runs finished in %.0f s", time.perf_counter() - t0)
    if jax.process_index() != 0:
        return os.path.join(plan.out_dir, "results.md")
    return write_report(plan)
