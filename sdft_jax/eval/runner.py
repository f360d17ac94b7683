"""Greedy evaluation of records: decode with the sampler, score, summarise, keep every prediction.

The summary (`accuracy`, `correct`, `total`, drops) and the per-item rows (index, completion,
prediction, expected, correct, reason) are both returned, so results can be audited item by item.
With `prompt="teacher"` the model is shown the demonstration in context: the teacher's accuracy,
whose gap to the student's is the signal SDFT learns from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
from transformers import PreTrainedTokenizerBase

from sdft_jax import storage
from sdft_jax.data.prompts import PromptConfig, render_prompts
from sdft_jax.data.records import Record
from sdft_jax.eval.scorers import score_record
from sdft_jax.models.transformer import Transformer
from sdft_jax.sampling.sampler import Sampler, SamplingConfig


# Spec section 7: tool use decodes up to 1024 new tokens, science 2048.
DEFAULT_MAX_NEW_TOKENS = {"tooluse": 1024, "science": 2048}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult:
    summary: dict[str, Any]
    items: list[dict[str, Any]]

    def write(self, directory: str | os.PathLike, name: str) -> None:
        """Writes `{name}.jsonl` (one row per item) and `{name}.summary.json` (local or remote `directory`)."""
        directory = os.fspath(directory)
        storage.makedirs(directory)
        rows = "".join(json.dumps(item) + "\n" for item in self.items)
        storage.write_text(os.path.join(directory, f"{name}.jsonl"), rows)
        storage.write_json(os.path.join(directory, f"{name}.summary.json"), self.summary)


def summarize(task: str, items: list[dict[str, Any]], dropped: dict[str, int] | None = None) -> dict[str, Any]:
    correct = sum(bool(i["correct"]) for i in items)
    total = len(items)
    return {"task": task, "accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "dropped": dict(dropped or {})}


def score_completions(records: Sequence[Record], completions: Sequence[str], truncated: Sequence[bool], *,
                      reference_compatible: bool = False) -> list[dict[str, Any]]:
    """Per-item rows for completions already decoded (one per record, in order)."""
    items = []
    for record, text, cut in zip(records, completions, truncated, strict=True):
        score = score_record(record, text, truncated=cut, reference_compatible=reference_compatible)
        items.append({"index": record.index, "completion": text, **score.as_dict()})
    return items


def evaluate(
    model: Transformer,
    tokenizer: PreTrainedTokenizerBase,
    sampler: Sampler,
    records: Sequence[Record],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    prompt_config: PromptConfig = PromptConfig(),
    prompt: Literal["student", "teacher"] = "student",
    reference_compatible: bool = False,
    sampling: SamplingConfig | None = None,
) -> EvalResult:
    """Greedy-decodes every record (student prompt, or teacher prompt with the demonstration) and scores it."""
    if not records:
        raise ValueError("evaluate: no records")
    task = records[0].task
    rendered = render_prompts(tokenizer, records, prompt_config, require_teacher=prompt == "teacher")
    items = list(rendered.items)
    base = sampling or SamplingConfig()
    cfg = dataclasses.replace(base, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)
    completions, truncated = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [list(i.teacher_ids if prompt == "teacher" else i.student_ids) for i in chunk]
        out = sampler.generate(model, prompts, cfg, jax.random.key(0))
        for row, reason in zip(out.completions(), out.stop_reasons):
            completions.append(tokenizer.decode(row, skip_special_tokens=True))
            truncated.append(reason == "length")
    rows = score_completions([i.record for i in items], completions, truncated,
                             reference_compatible=reference_compatible)
    summary = summarize(task, rows, rendered.dropped)
    summary.update(prompt=prompt, max_new_tokens=max_new_tokens,
                   mean_completion_chars=float(np.mean([len(c) for c in completions])) if completions else 0.0)
    return EvalResult(summary=summary, items=rows)


def evaluate_tasks(
    model: Transformer,
    tokenizer: PreTrainedTokenizerBase,
    sampler: Sampler,
    records_by_task: Mapping[str, Sequence[Record]],
    *,
    limit: int = 0,
    max_new_tokens: int = 0,
    batch_size: int = 16,
    prompt_config: PromptConfig = PromptConfig(),
    out_dir: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluates several tasks with one model; returns {task: summary} and writes each task's rows to `out_dir`.

    `limit` keeps the first N records of each task (0 = all); `max_new_tokens` 0 means the task's
    default (DEFAULT_MAX_NEW_TOKENS, else 32).
    """
    summaries = {}
    for task, records in records_by_task.items():
        records = records[:limit] if limit else records
        result = evaluate(model, tokenizer, sampler, records, batch_size=batch_size, prompt_config=prompt_config,
                          max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(task, 32))
        if out_dir is not None:
            result.write(out_dir, task)
        summaries[task] = result.summary
    return summaries
