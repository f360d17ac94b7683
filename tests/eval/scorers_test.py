"""Tests of sdft_jax/eval/scorers.py on hand-written completions."""

import json
import pathlib

import pytest

from sdft_jax.data.records import Record
from sdft_jax.eval import scorers

DATA_DIR = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "self-distillation"

NESTED_GOLD = [{"Action": "updateUserProfile",
                "Action_Input": '{"userId": "u1", "profileData": {"pictureUrl": "https://x/y.jpg"}}'}]
TWO_CALL_GOLD = [{"Action": "searchImages", "Action_Input": '{"color": "wild", "size": "small"}'},
                 {"Action": "searchImages", "Action_Input": '{"color": "wild", "size": "large"}'}]


def _tool_text(*calls):
    return "\n".join(f"Thought: go\nAction: {a}\nAction Input: {i}" for a, i in calls)


# --- tool use -----------------------------------------------------------------------------------------


def test_nested_arguments_parse_with_balanced_reader():
    text = _tool_text(("updateUserProfile", '{"userId": "u1", "profileData": {"pictureUrl": "https://x/y.jpg"}}'))
    calls = scorers.parse_tool_calls(text)
    assert calls.actions == ("updateUserProfile",)
    assert calls.arguments == {"userId": "u1", "profileData": {"pictureUrl": "https://x/y.jpg"}}
    score = scorers.score_tooluse(text, NESTED_GOLD)
    assert score.correct and score.reason == "correct"
    assert score.prediction == {"actions": ["updateUserProfile"], "arguments": calls.arguments}


def test_strings_with_braces_and_multiline_objects():
    text = 'Action: f\nAction Input: {"q": "a } b { c", "n": [1, {"k": 2}]}\nObservation: ...'
    assert scorers.parse_tool_calls(text).arguments == {"q": "a } b { c", "n": [1, {"k": 2}]}
    pretty = 'Action: f\nAction Input: ```json\n{\n  "a": 1,\n  "b": "x"\n}\n```'
    assert scorers.parse_tool_calls(pretty).arguments == {"a": 1, "b": "x"}


def test_repeated_keys_merge_later_wins():
    # Gold of two calls sharing keys merges to the last call's values: {"color": "wild", "size": "large"}.
    assert scorers.gold_tool_calls(TWO_CALL_GOLD).arguments == {"color": "wild", "size": "large"}
    assert scorers.gold_tool_calls(TWO_CALL_GOLD).actions == ("searchImages", "searchImages")
    both = _tool_text(("searchImages", '{"color": "wild", "size": "small"}'),
                      ("searchImages", '{"color": "wild", "size": "large"}'))
    assert scorers.score_tooluse(both, TWO_CALL_GOLD).correct
    # Only the merged dict is compared: a first call with any size still matches (a known weakness).
    assert scorers.score_tooluse(both.replace("small", "medium"), TWO_CALL_GOLD).correct
    # The order of calls decides which value wins.
    swapped = _tool_text(("searchImages", '{"color": "wild", "size": "large"}'),
                         ("searchImages", '{"color": "wild", "size": "small"}'))
    assert not scorers.score_tooluse(swapped, TWO_CALL_GOLD).correct
    # Actions are a multiset: one call is not two.
    one = _tool_text(("searchImages", '{"color": "wild", "size": "large"}'))
    score = scorers.score_tooluse(one, TWO_CALL_GOLD)
    assert not score.correct and score.reason == "wrong"


def test_invalid_json_blocks_are_skipped():
    text = _tool_text(("f", "{'a': 1}"), ("g", '{"b": 2}'), ("h", "none"), ("k", '["list"]'))
    calls = scorers.parse_tool_calls(text)
    assert calls.actions == ("f", "g", "h", "k")
    assert calls.arguments == {"b": 2}  # single quotes: not JSON; "none": no object; a list: not an object


def test_input_without_object_does_not_take_the_next_calls_object():
    text = "Action: f\nAction Input: none\nAction: g\nAction Input: {\"b\": 2}"
    # The "none" input must not read `{"b": 2}`; merging twice would hide the bug, so count objects.
    assert scorers._argument_objects(text) == [{"b": 2}]


def test_think_block_is_not_scored():
    gold = [{"Action": "getX", "Action_Input": '{"a": 1}'}]
    answer = _tool_text(("getX", '{"a": 1}'))
    thinking = "<think>\nMaybe Action: getY\nAction Input: {\"a\": 2}\n</think>\n"
    assert scorers.score_tooluse(thinking + answer, gold).correct
    # Without stripping, getY and a=2 would have been read.
    assert not scorers.score_tooluse(answer + "\n" + thinking.replace("</think>", ""), gold).correct
    # Only the text after the LAST </think> counts.
    assert not scorers.score_tooluse(answer + "<think>x</think>nothing", gold).correct


def test_truncated_tool_completion_scores_zero_but_reports_prediction():
    gold = [{"Action": "getX", "Action_Input": "{}"}]
    score = scorers.score_tooluse(_tool_text(("getX", "{}")), gold, truncated=True)
    assert (score.correct, score.reason) == (False, "truncated")
    assert score.prediction == {"actions": ["getX"], "arguments": {}}
    assert score.expected == {"actions": ["getX"], "arguments": {}}


def test_no_tool_call_is_no_answer():
    score = scorers.score_tooluse("I cannot help with that.", [{"Action": "getX", "Action_Input": "{}"}])
    assert (score.correct, score.prediction, score.reason) == (False, None, "no_answer")


def test_gold_with_non_word_action_name_is_read_like_a_completion():
    gold = [{"Action": "getUser", "Action_Input": '{"id": 1}'},
            {"Action": "[Optional]updateUser", "Action_Input": '{"pic": "p"}'}]
    calls = scorers.gold_tool_calls(gold)
    assert calls.actions == ("getUser",) and calls.arguments == {"id": 1, "pic": "p"}


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"reference data not found at {DATA_DIR}")
def test_every_real_gold_answer_scores_itself():
    from sdft_jax.data import readers

    recs = readers.read_task(DATA_DIR, "tooluse", "eval").records
    for r in recs:
        text = _tool_text(*((c["Action"], c["Action_Input"]) for c in r.gold))
        assert scorers.score_record(r, text).correct, r.index
    # Item 26 has a nested argument, read whole.
    assert isinstance(scorers.gold_tool_calls(recs[26].gold).arguments["profileData"], dict)


# --- science ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion,expected", [
    ("<reasoning>B looks wrong</reasoning>\n<answer>\nC\n</answer>", "C"),
    ("<answer>A</answer> then <answer> D </answer>", "D"),  # the last tag
    ("<answer>C: the second molecule</answer>", "C: the second molecule"),  # compared exactly
    ("Thinking about A and B. The answer is B.", "B"),
    ("the answer is C. Wait, the answer is\nD", "D"),  # \s* crosses a newline; the last one
    ("The answer is Definitely C", "C"),  # a word starting with a letter is not a letter
    ("I compare the options.\nB\n", "B"),
    ("A: no.\nC\nD is close but", "C"),  # a line that is exactly one letter beats later prose
    ("A molecule like this one fits option D best", "D"),  # last standalone letter
    ("Options A and B are wrong, so C.", "C"),
    ("No idea.", None),
    ("DNA and ABC are not answers", None),  # letters inside words are not standalone
])
def test_extract_choice_rules_in_order(completion, expected):
    assert scorers.extract_choice(completion) == expected


def test_answer_inside_thinking_is_ignored():
    text = "<think>\nI think <answer>A</answer> but let me check.\n</think>\nThe answer is B."
    assert scorers.extract_choice(text) == "B"
    assert scorers.score_science(text, "B").correct
    assert not scorers.score_science(text, "A").correct
    # Letters inside the thinking are not candidates for the fallback rules either.
    assert scorers.extract_choice("<think>The answer is A</think>I am not sure.") is None


def test_science_truncated_and_no_answer():
    # An answer given before the length cut counts (only tool use zeroes cut completions).
    assert scorers.score_science("<answer>A</answer> and then", "A", truncated=True).correct
    assert scorers.score_science("Let me think about", "A", truncated=True).reason == "truncated"
    score = scorers.score_science("nothing", "A")
    assert (score.correct, score.prediction, score.expected, score.reason) == (False, None, "A", "no_answer")
    assert scorers.score_science("<answer>B</answer>", "A").as_dict() == {
        "correct": False, "prediction": "B", "expected": "A", "reason": "wrong"}


# --- offline short answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("completion,gold,prediction", [
    ("The capital of Zorbania is Velmora.", "Velmora", "Velmora"),
    ("velmora", "Velmora", "velmora"),  # case-insensitive
    ("VELMORA!", "Velmora", "VELMORA"),
    ("It is Velmoran cuisine.", "Velmora", None),  # whole words only
    ("Romeo", "Rome", None),
    ("<think>Velmora?</think>I do not know.", "Velmora", None),  # thinking does not count
    ("A dog has four legs.", "4", "four"),  # small numbers may be spelled out
    ("A dog has 4 legs.", "4", "4"),
    ("There are 14 of them.", "4", None),
    ("New\n York", "New York", "New\n York"),  # several words: any whitespace between
])
def test_short_answer(completion, gold, prediction):
    score = scorers.score_short_answer(completion, gold)
    assert score.prediction == prediction
    assert score.correct == (prediction is not None)


def test_short_answer_cut_after_the_answer_still_counts():
    score = scorers.score_short_answer("The capital is Velmora. It is", "Velmora", truncated=True)
    assert (score.correct, score.prediction, score.reason) == (True, "Velmora", "correct")
    score = scorers.score_short_answer("The capital is", "Velmora", truncated=True)
    assert (score.correct, score.reason) == (False, "truncated")


# --- dispatch -----------------------------------------------------------------------------------------


def _rec(task, gold):
    return Record(task=task, index=0, source="s", messages=({"role": "user", "content": "q"},),
                  demonstration=None, gold=gold)


def test_score_record_dispatches_on_task():
    assert scorers.score_record(_rec("science", "C"), "<answer>C</answer>").correct
    assert scorers.score_record(_rec("capitals", "Velmora"), "Velmora.").correct
    assert scorers.score_record(_rec("probe", "Paris"), "It is Paris").correct
    gold = [{"Action": "f", "Action_Input": '{"a": {"b": 1}}'}]
    text = 'Action: f\nAction Input: {"a": {"b": 2}}'
    assert not scorers.score_record(_rec("tooluse", gold), text).correct
    assert scorers.score_record(_rec("tooluse", gold), 'Action: f\nAction Input: {"a": {"b": 1}}').correct
    with pytest.raises(ValueError, match="no gold answer"):
        scorers.score_record(_rec("jsonl", None), "x")
    with pytest.raises(ValueError, match="no scorer for task 'math'"):
        scorers.score_record(_rec("math", "1"), "1")
    assert json.dumps(scorers.score_record(_rec("tooluse", gold), text).as_dict())
