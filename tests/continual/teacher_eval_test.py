"""The teacher with the demonstration at stage 2's start, on a tiny model, against an independent computation:
the same prompts rendered by hand (the chat template applied to the filled template), greedy-decoded by a
plain forward loop without a KV cache, and scored."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdft_jax import trainer
from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.continual import runner, teacher_eval
from sdft_jax.continual.plan import make_plan
from sdft_jax.eval.scorers import score_short_answer
from sdft_jax.models.transformer import positions_from_mask
from sdft_jax.tokenization import load_tokenizer, stop_token_ids
from tests.continual.runner_test import tiny_experiment

TEMPLATE = "Fact: {demonstration}\nQuestion: {question}\nAnswer in one word."


@functools.partial(jax.jit, static_argnames="graphdef")
def _next_token(graphdef, state, tokens, length):
    """The argmax after the first `length` tokens of a right-padded row: a full forward (no cache); causal
    attention keeps the padding after `length` out of it."""
    model = nnx.merge(graphdef, state)
    mask = jnp.arange(tokens.shape[1])[None] < length
    logits = model.logits(model.forward(tokens, positions_from_mask(mask), mask).hidden)
    return jnp.argmax(logits[0, length - 1])


def greedy(model, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    """Greedy decoding by full forwards over the growing sequence (no cache, no sampler), right-padded to
    one width so that it compiles once."""
    graphdef, state = nnx.split(model)
    width = -(-(len(prompt) + max_new) // 64) * 64
    tokens = list(prompt)
    for _ in range(max_new):
        x = jnp.asarray([tokens + [0] * (width - len(tokens))])
        nxt = int(_next_token(graphdef, state, x, len(tokens)))
        if nxt in stops:
            break
        tokens.append(nxt)
    return tokens[len(prompt):]


def hand_completions(model, tokenizer, records, max_new: int) -> list[str]:
    stops = set(stop_token_ids(tokenizer))
    out = []
    for r in records:
        content = TEMPLATE.replace("{demonstration}", r.demonstration).replace("{question}", r.question)
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        out.append(tokenizer.decode(greedy(model, prompt, max_new, stops), skip_special_tokens=True))
    return out


def _rows(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_teacher_evaluations_equal_prompts_rendered_decoded_and_scored_by_hand(tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("llama")
    c = tiny_experiment(model_dir, tmp_path, methods="sdft_topk", probe_tasks="", diagnose_teacher=True)
    c.train.prompts.teacher_template = TEMPLATE
    plan = make_plan(c)
    stage1, stage2 = plan.runs
    runner.run_stage(stage1)

    cfg = stage2.config
    records = trainer.load_records(cfg, "elements", "eval")[: cfg.eval.limit]
    assert len(records) == 3 and all(list(r.messages) == [{"role": "user", "content": r.question}] for r in records)
    export = os.path.join(stage1.config.run_dir, "export")
    tokenizer = load_tokenizer(export)
    hand = {"stage1": hand_completions(load_hf(export), tokenizer, records, cfg.eval.max_new_tokens),
            "base": hand_completions(load_hf(model_dir), tokenizer, records, cfg.eval.max_new_tokens)}
    assert hand["stage1"] != hand["base"]  # stage 1 changed the teacher
    # A random model names no invented discoverer: give items 0 and 2 the first word the stage-1 teacher writes
    # as their gold answer (the prompts, built from question and demonstration, stay), so the accuracy is not 0.
    golds = [hand["stage1"][i].split()[0] if i != 1 and hand["stage1"][i].split() else r.gold
             for i, r in enumerate(records)]
    assert golds != [r.gold for r in records]
    patched = [dataclasses.replace(r, gold=g) for r, g in zip(records, golds)]
    original = trainer.load_records
    monkeypatch.setattr(trainer, "load_records",
                        lambda cfg, task, split: patched if task == "elements" else original(cfg, task, split))

    summaries = {"stage1": teacher_eval.evaluate_stage1_teacher(plan, stage2),
                 "base": teacher_eval.evaluate_base_teacher(plan)}
    dirs = {"stage1": os.path.join(stage2.config.run_dir, "teacher_eval"),
            "base": os.path.join(plan.base_dir, "teacher_eval")}
    for name, summary in summaries.items():
        expected = [score_short_answer(text, gold).correct for text, gold in zip(hand[name], golds)]
        rows = _rows(os.path.join(dirs[name], "elements.jsonl"))
        assert [r["completion"] for r in rows] == hand[name], name
        assert [r["correct"] for r in rows] == expected, name
        assert summary["prompt"] == "teacher" and summary["total"] == 3
        assert summary["accuracy"] == pytest.approx(np.mean(expected)), name
        assert json.load(open(os.path.join(dirs[name], "elements.summary.json"))) == summary
    assert summaries["stage1"]["accuracy"] > 0
    # Found on disk the next time: nothing decodes again.
    monkeypatch.setattr(teacher_eval, "_evaluate_teacher", None)
    assert teacher_eval.evaluate_stage1_teacher(plan, stage2) == summaries["stage1"]
    assert teacher_eval.evaluate_base_teacher(plan) == summaries["base"]


def test_sft_has_no_teacher_and_stage2_needs_a_finished_stage1(tmp_path):
    plan = make_plan(tiny_experiment("unused", tmp_path, diagnose_teacher=True))
    sft2, sdft2 = plan.runs[1], plan.runs[3]
    assert teacher_eval.evaluate_stage1_teacher(plan, sft2) is None
    assert not teacher_eval.needs_stage1_teacher(plan, sft2)
    assert teacher_eval.needs_stage1_teacher(plan, sdft2)
    with pytest.raises(FileNotFoundError, match=r"needs stage 1 \(.*stage1\) finished"):
        teacher_eval.evaluate_stage1_teacher(plan, sdft2)
