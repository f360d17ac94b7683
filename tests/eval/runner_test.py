"""The eval runner: greedy decoding, scoring, and the teacher-prompt view."""

import pytest

from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.data.records import Record
from sdft_jax.eval.runner import SCORING_MODES, decode_completion, evaluate, score_completions, summarize
from sdft_jax.sampling.sampler import Sampler
from sdft_jax.tokenization import load_tokenizer, stop_token_ids


def _record(i, answer="Velmora"):
    return Record(task="capitals", index=i, source="test", messages=({"role": "user", "content": f"Q{i}?"},),
                  demonstration=f"The capital is {answer}.", gold=answer)


def test_score_completions_and_summary():
    records = [_record(0), _record(1), _record(2)]
    rows = score_completions(records, ["It is Velmora.", "No idea", "Velmora, I think"], [False, False, True])
    assert [r["correct"] for r in rows] == [True, False, True]  # an answer before the length cut counts
    s = summarize("capitals", rows, {"student_overlong": 1})
    assert (s["correct"], s["total"], s["accuracy"], s["dropped"]) == (2, 3, pytest.approx(2 / 3), {"student_overlong": 1})
    assert s["scoring"] == "project" and [r["truncated"] for r in rows] == [False, False, True]


def _tool_record(i):
    return Record(task="tooluse", index=i, source="test", messages=({"role": "user", "content": "q"},),
                  demonstration=None, gold=({"Action": "getX", "Action_Input": '{"a": 1}'},))


def test_scoring_mode_picks_the_scorers():
    records = [_tool_record(0), _tool_record(1)]
    answer = 'Action: getX\nAction Input: {"a": 1}'
    texts, cut = [f"<think>{answer}</think>{answer}", answer], [False, True]
    project = score_completions(records, texts, cut)
    recipe = score_completions(records, texts, cut, scoring="recipe")
    assert [r["correct"] for r in project] == [True, False]  # thinking stripped; a cut call list zeroed
    assert [r["correct"] for r in recipe] == [False, True]  # thinking scanned; a cut completion scored
    assert [r["reason"] for r in project] == ["correct", "truncated"]
    assert summarize("tooluse", recipe, scoring="recipe")["scoring"] == "recipe"
    with pytest.raises(ValueError, match=r"unknown scoring 'paper'; expected one of \('project', 'recipe'\)"):
        score_completions(records, texts, cut, scoring="paper")


def test_recipe_mode_keeps_special_tokens(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir("qwen2"))
    ids = tok.encode("The answer is B", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert decode_completion(tok, ids) == "The answer is B"
    assert decode_completion(tok, ids, "recipe") == "The answer is B<|im_end|>"


def test_config_and_runner_name_the_same_modes():
    import typing

    from sdft_jax.config import EvalSection

    assert typing.get_args(typing.get_type_hints(EvalSection)["scoring"]) == SCORING_MODES


def test_greedy_decoding_is_deterministic_and_teacher_prompts_differ(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    tok, model = load_tokenizer(path), load_hf(path)
    sampler = Sampler(stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
    records = [_record(i) for i in range(3)]
    a = evaluate(model, tok, sampler, records, max_new_tokens=6)
    b = evaluate(model, tok, sampler, records, max_new_tokens=6)
    assert a.items == b.items and a.summary["total"] == 3
    t = evaluate(model, tok, sampler, records, max_new_tokens=6, prompt="teacher")
    assert t.summary["prompt"] == "teacher"
    assert [i["completion"] for i in t.items] != [i["completion"] for i in a.items]
    # Recipe mode decodes the same tokens with the special ones kept (as the recipe's evaluators see them).
    r = evaluate(model, tok, sampler, records, max_new_tokens=6, scoring="recipe")
    assert r.summary["scoring"] == "recipe" and a.summary["scoring"] == "project"
    specials = tok.all_special_tokens
    for kept, skipped in zip(r.items, a.items):
        text = kept["completion"]
        for special in specials:
            text = text.replace(special, "")
        assert text == skipped["completion"]
