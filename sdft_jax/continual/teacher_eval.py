"""The teacher's accuracy on task B with the demonstration in its prompt, at stage 2's start (`diagnose_teacher`).

SDFT learns task B from the gap between the student (the question alone) and the teacher (the question
and the demonstration in context). If the teacher itself does not answer B from its context, stage 2
has nothing to distill; these evaluations measure that, on task B's eval items with the teacher prompt
(the run's own template), greedy, as the report's accuracies are measured:

- the stage-1 student as teacher (stage 2's teacher as it starts with `stage2_teacher = "stage1"`):
  stage 1's export with full fine-tuning, its last checkpoint's adapters with LoRA (what stage 2 loads);
  written to `<cell>/stage2/teacher_eval/<task_b>.jsonl` (+ `.summary.json`), for every SDFT cell;
- the base model as teacher (the recipe's stage-2 teacher), once: `<out_dir>/base/teacher_eval/`.

Each is skipped when its summary exists, and depends only on stage 1 (or the base model), so turning
`diagnose_teacher` on after a sweep ran fills in what is missing without training anything.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from sdft_jax import storage
from sdft_jax.config import TrainConfig
from sdft_jax.continual.plan import METHODS, Plan, Run, teacher_eval_dir


def summary_path(stage_dir: str, task: str) -> str:
    """The summary of a teacher evaluation of `task` under `stage_dir` (base or stage-2 directory)."""
    return os.path.join(teacher_eval_dir(stage_dir), f"{task}.summary.json")


def _evaluate_teacher(model, mesh, tokenizer_dir: str, cfg: TrainConfig, task: str, out_dir: str) -> dict[str, Any]:
    """Greedy evaluation of `task` with the teacher prompt of `cfg`; rows and summary written to `out_dir`."""
    from sdft_jax.eval.runner import DEFAULT_MAX_NEW_TOKENS, evaluate
    from sdft_jax.sampling.sampler import Sampler
    from sdft_jax.tokenization import load_tokenizer, pad_token_id, stop_token_ids
    from sdft_jax.trainer import load_records

    tokenizer = load_tokenizer(tokenizer_dir)
    sampler = Sampler(stop_ids=stop_token_ids(tokenizer), pad_id=pad_token_id(tokenizer), mesh=mesh,
                      weights=cfg.rollout.weights())
    records = load_records(cfg, task, "eval")
    records = records[:cfg.eval.limit] if cfg.eval.limit else records
    result = evaluate(model, tokenizer, sampler, records, prompt="teacher", prompt_config=cfg.prompts,
                      max_new_tokens=cfg.eval.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(task, 32),
                      batch_size=cfg.eval.batch_size, scoring=cfg.eval.scoring)
    if jax.process_index() == 0:
        result.write(out_dir, task)
    return result.summary


def evaluate_base_teacher(plan: Plan) -> dict[str, Any]:
    """The base model as teacher on task B (skipped when done); returns the evaluation's summary."""
    path = summary_path(plan.base_dir, plan.task_b)
    if storage.exists(path):
        return storage.read_json(path)
    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.checkpoints.registry import resolve_model
    from sdft_jax.models.sharding import make_mesh
    from sdft_jax.trainer import DTYPES

    cfg = plan.base_config
    mesh = make_mesh(cfg.mesh.shape())
    model_path = resolve_model(cfg.init_from or cfg.model.name)
    model = load_hf(model_path, mesh=mesh, dtype=DTYPES[cfg.model.dtype], param_dtype=DTYPES[cfg.model.param_dtype])
    return _evaluate_teacher(model, mesh, model_path, cfg, plan.task_b, teacher_eval_dir(plan.base_dir))


def has_teacher(run: Run) -> bool:
    """Whether the run's method distills from a teacher (SFT does not)."""
    return METHODS[run.method][0] == "sdft"


def needs_stage1_teacher(plan: Plan, run: Run) -> bool:
    """Whether `run` is the stage 2 of an SDFT cell whose stage-1 teacher evaluation is still missing."""
    return run.stage == 2 and has_teacher(run) and not storage.exists(summary_path(run.config.run_dir, plan.task_b))


def evaluate_stage1_teacher(plan: Plan, run: Run) -> dict[str, Any] | None:
    """The stage-1 student as teacher on task B, for the stage-2 `run` of an SDFT method (skipped when
    done; None for SFT). FileNotFoundError when stage 1 has not finished."""
    if run.stage != 2 or not has_teacher(run):
        return None
    stage2_dir = run.config.run_dir
    path = summary_path(stage2_dir, plan.task_b)
    if storage.exists(path):
        return storage.read_json(path)
    from sdft_jax.trainer import load_run_model

    stage1_dir = os.path.join(os.path.dirname(stage2_dir.rstrip("/")), "stage1")
    if not storage.exists(os.path.join(stage1_dir, "summary.json")):
        raise FileNotFoundError(f"{run.name}: the stage-1 teacher evaluation needs stage 1 ({stage1_dir}) finished "
                                "(no summary.json)")
    # What stage 2 starts from: the adapters of stage 1's last checkpoint (LoRA), or its export.
    loaded = load_run_model(stage1_dir, "checkpoint" if run.config.model.lora.rank else "export")
    summary = _evaluate_teacher(loaded.model, loaded.mesh, loaded.path, run.config, plan.task_b,
                                teacher_eval_dir(stage2_dir))
    del loaded
    return summary
