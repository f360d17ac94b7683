"""Tests of sdft_jax/eval/recipe_scorers.py: one hand-written case per difference in docs/scoring.md
(named T1..T7 for tool use, S1..S5 for science, as there), what the two modes share, and both modes
on the real eval sets."""

import pytest

from sdft_jax.data.records import Record
from sdft_jax.eval import recipe_scorers as recipe
from sdft_jax.eval import scorers as project
from tests.conftest import SHARED_DATA

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"reference data not found at {SHARED_DATA}")

GET_X = [{"Action": "getX", "Action_Input": '{"a": 1}'}]
NESTED_GOLD = [{"Action": "updateUserProfile",
                "Action_Input": '{"userId": "u1", "profileData": {"pictureUrl": "https://x/y.jpg"}}'}]


def _tool_text(*calls):
    return "\n".join(f"Thought: go\nAction: {a}\nAction Input: {i}" for a, i in calls)


def _both(completion, gold, scorer="tooluse", **kw):
    """(project verdict, recipe verdict)."""
    name = f"score_{scorer}"
    return getattr(project, name)(completion, gold, **kw).correct, getattr(recipe, name)(completion, gold, **kw).correct


# --- tool use: the differences ------------------------------------------------------------------------


def test_t1_thinking_is_scanned():
    answer = _tool_text(("getX", '{"a": 1}'))
    drafted = f"<think>\n{answer}\n</think>\n\n{answer}"  # the calls drafted in the thinking, then given
    assert recipe.parse_tool_calls(drafted).actions == ("getX", "getX")
    assert _both(drafted, GET_X) == (True, False)
    # A thinking that mentions another call: the recipe reads it too.
    other = '<think>\nAction: getY\nAction Input: {"a": 2}\n</think>\n' + answer
    assert recipe.parse_tool_calls(other).as_dict() == {"actions": ["getY", "getX"], "arguments": {"a": 1}}
    assert _both(other, GET_X) == (True, False)


def test_t2_a_length_cut_completion_is_scored():
    answer = _tool_text(("getX", '{"a": 1}'))
    assert _both(answer, GET_X, truncated=True) == (False, True)
    score = recipe.score_tooluse(answer, GET_X, truncated=True)
    assert (score.reason, score.prediction) == ("correct", {"actions": ["getX"], "arguments": {"a": 1}})


def test_t3_a_nested_argument_never_scores():
    text = _tool_text(("updateUserProfile", '{"userId": "u1", "profileData": {"pictureUrl": "https://x/y.jpg"}}'))
    # The lazy `\{.*?\}` reads `{"userId": "u1", "profileData": {"pictureUrl": "https://x/y.jpg"}`: not
    # JSON, so the prediction has no arguments, while the gold's input is parsed whole.
    assert recipe.parse_tool_calls(text).arguments == {}
    assert recipe.gold_tool_calls(NESTED_GOLD).arguments == {
        "userId": "u1", "profileData": {"pictureUrl": "https://x/y.jpg"}}
    assert _both(text, NESTED_GOLD) == (True, False)
    # Nor does a prediction that leaves the nested key out.
    assert not recipe.score_tooluse(_tool_text(("updateUserProfile", '{"userId": "u1"}')), NESTED_GOLD).correct


def test_t4_a_closing_brace_inside_a_string_cuts_the_object():
    gold = [{"Action": "search", "Action_Input": '{"q": "set {a}", "n": 2}'}]
    text = _tool_text(("search", '{"q": "set {a}", "n": 2}'))
    assert recipe.parse_tool_calls(text).arguments == {}
    assert project.parse_tool_calls(text).arguments == {"q": "set {a}", "n": 2}
    assert _both(text, gold) == (True, False)


def test_t5_gold_action_names_are_compared_raw():
    gold = [{"Action": "getUser", "Action_Input": '{"id": 1}'},
            {"Action": "[Optional]updateUser", "Action_Input": '{"pic": "p"}'}]
    assert recipe.gold_tool_calls(gold).actions == ("getUser", "[Optional]updateUser")
    written = _tool_text(("getUser", '{"id": 1}'), ("[Optional]updateUser", '{"pic": "p"}'))
    # `Action:\s*(\w+)` cannot read `[Optional]...`: no completion has that action.
    assert recipe.parse_tool_calls(written).actions == ("getUser",)
    assert _both(written, gold) == (True, False)
    assert not recipe.score_tooluse(_tool_text(("getUser", '{"id": 1}'), ("updateUser", '{"pic": "p"}')), gold).correct


@pytest.mark.parametrize("written", [
    '```json\n{"a": 1}\n```',  # in a code fence
    'the arguments are {"a": 1}',  # prose before the object
    '[{"a": 1}]',  # inside a list
])
def test_t6_the_object_must_follow_action_input_directly(written):
    text = f"Action: getX\nAction Input: {written}"
    assert recipe.parse_tool_calls(text).arguments == {}
    assert project.parse_tool_calls(text).arguments == {"a": 1}
    assert _both(text, GET_X) == (True, False)
    # Whitespace, newlines included, may come between: a flat object over several lines is read.
    assert recipe.score_tooluse('Action: getX\nAction Input:\n{\n  "a": 1\n}', GET_X).correct


def test_t7_an_unclosed_object_swallows_the_next_calls_arguments():
    gold = [{"Action": "f", "Action_Input": "{}"}, {"Action": "g", "Action_Input": '{"b": 2}'}]
    text = 'Action: f\nAction Input: {\nAction: g\nAction Input: {"b": 2}'
    # The lazy match runs from the first `{` to the next `}`, across the second call: one block, not JSON.
    assert recipe.parse_tool_calls(text).arguments == {}
    assert project.parse_tool_calls(text).arguments == {"b": 2}
    assert _both(text, gold) == (True, False)


# --- tool use: the same in both modes -----------------------------------------------------------------


def test_tool_use_rules_both_modes_share():
    two = [{"Action": "s", "Action_Input": '{"c": "w", "size": "small"}'},
           {"Action": "s", "Action_Input": '{"c": "w", "size": "large"}'}]
    cases = [
        (_tool_text(("s", '{"c": "w", "size": "small"}'), ("s", '{"c": "w", "size": "large"}')), True),
        (_tool_text(("s", '{"c": "w", "size": "medium"}'), ("s", '{"c": "w", "size": "large"}')), True),  # merged
        (_tool_text(("s", '{"c": "w", "size": "large"}'), ("s", '{"c": "w", "size": "small"}')), False),  # order
        (_tool_text(("s", '{"c": "w", "size": "large"}')), False),  # actions are a multiset
        (_tool_text(("s", "{'c': 'w'}"), ("s", '{"c": "w", "size": "large"}')), True),  # bad JSON skipped
        ("Action: s\nAction Input: none\nAction: s\nAction Input: {\"c\": \"w\", \"size\": \"large\"}", True),
        ("I cannot help with that.", False),
    ]
    for text, correct in cases:
        assert _both(text, two) == (correct, correct), text
    score = recipe.score_tooluse("I cannot help with that.", two)
    assert (score.prediction, score.reason) == (None, "no_answer")
    assert score.expected == {"actions": ["s", "s"], "arguments": {"c": "w", "size": "large"}}


def test_gold_input_that_is_not_json_adds_no_arguments_and_a_non_object_is_refused():
    assert recipe.gold_tool_calls([{"Action": "f", "Action_Input": "none"}]).arguments == {}
    assert recipe.gold_tool_calls([{"Action": "f"}]).arguments == {}
    with pytest.raises(ValueError, match=r"golden_answer\[0\]\.Action_Input: not a JSON object"):
        recipe.gold_tool_calls([{"Action": "f", "Action_Input": "[1, 2]"}])


# --- science: the differences -------------------------------------------------------------------------


def test_s1_answer_inside_thinking_counts_and_wins():
    text = "<think>\nI think <answer>A</answer> but let me check.\n</think>\nThe answer is B."
    assert recipe.extract_choice(text) == "A"
    assert project.extract_choice(text) == "B"
    assert _both(text, "B", "science") == (True, False)


def test_s2_an_unclosed_answer_tag_reads_to_the_end_and_stops_there():
    # The completion was cut just after opening the tag: the recipe reads "" and tries nothing else.
    text = "The answer is C.\n<answer>"
    assert recipe.extract_choice(text) == ""
    assert _both(text, "C", "science", truncated=True) == (True, False)
    assert recipe.extract_choice("<answer> B \n") == "B"
    # Decoded with special tokens kept (recipe mode), a completion that stops there is wrong.
    assert recipe.extract_choice("<answer>B<|im_end|>") == "B<|im_end|>"
    # The last opening tag counts, closed or not.
    assert recipe.extract_choice("<answer>A</answer> then <answer>D") == "D"
    assert project.extract_choice("<answer>A</answer> then <answer>D") == "A"


def test_s3_the_first_the_answer_is_counts():
    text = "the answer is C. Wait, the answer is\nD"
    assert (recipe.extract_choice(text), project.extract_choice(text)) == ("C", "D")
    assert _both(text, "D", "science") == (True, False)


def test_s4_no_word_boundary_after_the_letter():
    text = "The answer is Definitely C"
    assert (recipe.extract_choice(text), project.extract_choice(text)) == ("D", "C")
    assert _both(text, "C", "science") == (True, False)
    assert _both("The answer is Almost B", "A", "science") == (False, True)


def test_s5_the_first_letter_line_counts():
    text = "A: no.\nC\nOn second thought:\nB\n"
    assert (recipe.extract_choice(text), project.extract_choice(text)) == ("C", "B")
    assert _both(text, "B", "science") == (True, False)


# --- science: the same in both modes ------------------------------------------------------------------


@pytest.mark.parametrize("completion,expected", [
    ("<reasoning>B looks wrong</reasoning>\n<answer>\nC\n</answer>", "C"),
    ("<answer>A</answer> then <answer> D </answer>", "D"),  # the last tag
    ("<answer>C: the second molecule</answer>", "C: the second molecule"),  # compared exactly
    ("Thinking about A and B. The answer is B.", "B"),
    ("I compare the options.\nB\n", "B"),
    ("A molecule like this one fits option D best", "D"),  # last standalone letter
    ("Options A and B are wrong, so C.", "C"),
    ("<think>The answer is A</think>I am not sure.", None),  # rules 2-4 read after the last </think>
    ("<think>A</think>x</think>Maybe B", "B"),
    ("No idea.", None),
    ("DNA and ABC are not answers", None),
])
def test_science_rules_both_modes_share(completion, expected):
    assert recipe.extract_choice(completion) == project.extract_choice(completion) == expected


def test_science_fallback_and_truncation():
    # Rule 5: the recipe compares the whole completion; it is never one letter, so never correct.
    assert recipe.recipe_answer("No idea.") == "No idea."
    assert recipe.recipe_answer("  B  ") == "B"  # a lone letter is rule 3's already
    score = recipe.score_science("No idea.", "A")
    assert (score.correct, score.prediction, score.reason) == (False, None, "no_answer")
    # A length cut changes no science verdict in either mode.
    assert _both("The answer is A", "A", "science", truncated=True) == (True, True)
    assert _both("Let me think about", "A", "science", truncated=True) == (False, False)
    assert recipe.score_science("<answer>B</answer>", "A").as_dict() == {
        "correct": False, "prediction": "B", "expected": "A", "reason": "wrong"}


# --- dispatch and the real eval sets ------------------------------------------------------------------


def _rec(task, gold):
    return Record(task=task, index=0, source="s", messages=({"role": "user", "content": "q"},),
                  demonstration=None, gold=gold)


def test_score_record_dispatches_on_task():
    assert recipe.score_record(_rec("science", "C"), "<think><answer>C</answer></think>").correct
    assert recipe.score_record(_rec("tooluse", GET_X), _tool_text(("getX", '{"a": 1}')), truncated=True).correct
    assert recipe.score_record(_rec("capitals", "Velmora"), "Velmora.").correct  # offline: the project's rule
    with pytest.raises(ValueError, match="no gold answer"):
        recipe.score_record(_rec("jsonl", None), "x")
    with pytest.raises(ValueError, match="no scorer for task 'math'"):
        recipe.score_record(_rec("math", "1"), "1")


@needs_data
@pytest.mark.parametrize("task,total", [("tooluse", 97), ("tooluse_json", 68)])
def test_gold_calls_as_completions_on_the_real_tool_use_sets(task, total):
    from sdft_jax.data.readers import read_task

    records = read_task(SHARED_DATA, task, "eval").records
    assert len(records) == total
    texts = [_tool_text(*((c["Action"], c["Action_Input"]) for c in r.gold)) for r in records]
    assert all(project.score_record(r, t).correct for r, t in zip(records, texts))
    wrong = [r.index for r, t in zip(records, texts) if not recipe.score_record(r, t).correct]
    # Item 26: a nested argument (T3); item 33: the action `[Optional]updateUserProfile` (T5).
    assert wrong == [26, 33]
    assert [c["Action"] for c in records[33].gold] == ["getUserProfile", "[Optional]updateUserProfile"]
    assert isinstance(recipe.gold_tool_calls(records[26].gold).arguments["profileData"], dict)


@needs_data
def test_both_modes_on_the_real_science_set():
    from sdft_jax.data.readers import read_task

    records = read_task(SHARED_DATA, "science", "eval").records
    assert len(records) == 507
    for r in records:
        wrong = "ABCD"[("ABCD".index(r.gold) + 1) % 4]
        for text in (f"<answer>{r.gold}</answer>", f"Reasoning.\nThe answer is {r.gold}.", f"{r.gold}\n"):
            assert project.score_record(r, text).correct and recipe.score_record(r, text).correct
        two = f"The answer is {wrong}.\nNo: the answer is {r.gold}."
        assert project.score_record(r, two).correct and not recipe.score_record(r, two).correct
