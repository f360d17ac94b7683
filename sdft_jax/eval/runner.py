"""Greedy evaluation of records: decode with the sampler, score, summarise, keep every prediction.

The summary (`accuracy`, `correct`, `total`, drops, the scoring mode) and the per-item rows (index,
completion, truncated, prediction, expected, correct, reason) are both returned, so results can be
audited item by item. With `prompt="teacher"` the model is shown the demonstration in context: the
teacher's accuracy, whose gap to the student's is the signal SDFT learns from.

`scoring` picks the rules: "project" (`scorers.py`, the default) or "recipe" (`recipe_scorers.py`,
the hosted recipe's evaluators, quirks included; `docs/scoring.md`). In "recipe" mode completions are
also decoded as the recipe decodes them: special tokens kept, so a completion that stopped ends with
its end-of-turn text (e.g. `<|im_end|>`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import jax
import numpy as np
from transformers import PreTrainedTokenizerBase

from sdft_jax import storage
from sdft_jax.data.prompts import PromptConfig, render_prompts
from sdft_jax.data.records import Record
from sdft_jax.eval import recipe_scorers, scorers
from sdft_jax.models.transformer import Transformer
from sdft_jax.sampling.sampler import Sampler, SamplingConfig


# Spec section 7: tool use decodes up to 1024 new tokens, science 2048.
DEFAULT_MAX_NEW_TOKENS = {"tooluse": 1024, "science": 2048}

Scoring = Literal["project", "recipe"]
SCORING_MODES: tuple[str, ...] = get_args(Scoring)
_SCORE_RECORD = {"project": scorers.score_record, "recipe": recipe_scorers.score_record}


def check_scoring(scoring: str) -> Scoring:
    """`scoring` if it is a known mode, else a ValueError naming the modes."""
    if scoring not in SCORING_MODES:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORING_MODES}")
    return scoring  # type: ignore[return-value]


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


def decode_completion(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], scoring: Scoring = "project") -> str:
    """A completion's text as `scoring`'s evaluators see it: the recipe decodes with special tokens kept
    (a completion that stopped ends with its end-of-turn text), the project without them."""
    return tokenizer.decode(list(ids), skip_special_tokens=check_scoring(scoring) == "project")


def summarize(task: str, items: list[dict[str, Any]], dropped: dict[str, int] | None = None, *,
              scoring: Scoring = "project") -> dict[str, Any]:
    correct = sum(bool(i["correct"]) for i in items)
    total = len(items)
    return {"task": task, "accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "dropped": dict(dropped or {}), "scoring": scoring}


def score_completions(records: Sequence[Record], completions: Sequence[str], truncated: Sequence[bool], *,
                      scoring: Scoring = "project") -> list[dict[str, Any]]:
    """Per-item rows for completions already decoded (one per record, in order), scored by `scoring`'s rules."""
    score_record = _SCORE_RECORD[check_scoring(scoring)]
    items = []
    for record, text, cut in zip(records, completions, truncated, strict=True):
        score = score_record(record, text, truncated=cut)
        items.append({"index": record.index, "completion": text, "truncated": bool(cut), **score.as_dict()})
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
    scoring: Scoring = "project",
    sampling: SamplingConfig | None = None,
) -> EvalResult:
    """Greedy-decodes every record (student prompt, or teacher prompt with the demonstration) and scores it."""
    if not records:
        raise ValueError("evaluate: no records")
    check_scoring(scoring)
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
            completions.append(decode_completion(tokenizer, row, scoring))
            truncated.append(reason == "length")
    rows = score_completions([i.record for i in items], completions, truncated, scoring=scoring)
    summary = summarize(task, rows, rendered.dropped, scoring=scoring)
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
    scoring: Scoring = "project",
    out_dir: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluates several tasks with one model; returns {task: summary} and writes each task's rows to `out_dir`.

    `limit` keeps the first N records of each task (0 = all); `max_new_tokens` 0 means the task's
    default (DEFAULT_MAX_NEW_TOKENS, else 32); `scoring` the rules ("project" or "recipe").
    """
    summaries = {}
    for task, records in records_by_task.items():
        records = records[:limit] if limit else records
        result = evaluate(model, tokenizer, sampler, records, batch_size=batch_size, prompt_config=prompt_config,
                          max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(task, 32), scoring=scoring)
        if out_dir is not None:
            result.write(out_dir, task)
        summaries[task] = result.summary
    return summaries
