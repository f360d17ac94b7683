"""The recipe's scorers, reproduced with their quirks (`eval.scoring = "recipe"`).

The hosted SDFT recipe (`tinker_cookbook/recipes/sdft/eval.py`, the revision that produced the tables of
`../shared/seed/sdft-recipe-readme.txt`: unchanged from its first commit 952757b7 to 4ce6b363) scores
tool use and science with the rules below. They are ported here so that numbers compare with the
recipe's own; `scorers.py` holds the project's corrected rules, and `docs/scoring.md` lists every
difference with an example.

Tool use (`evaluate_tooluse_correctness`):
- the whole completion is scanned, thinking included: no `</think>` stripping;
- actions are every `Action:\\s*(\\w+)`; arguments are every `Action Input:\\s*(\\{.*?\\})` (DOTALL),
  `json.loads`ed and merged (later keys win; blocks that do not parse are skipped). The lazy `\\{.*?\\}`
  ends at the first `}`: a nested object, or a `}` inside a string, cuts the block and it is skipped;
- the gold is NOT read through that parser: its actions are the raw `Action` strings (so an action
  name that is not `\\w+`, e.g. `[Optional]updateUserProfile`, can never be predicted), and its
  arguments are each `Action_Input` parsed whole (so a nested argument can never be predicted either);
- correct iff the multisets of actions and the merged argument dicts are equal;
- a completion cut by the token limit is scored like any other.

Science (`extract_xml_answer`, then exact comparison with the gold letter):
1. if `<answer>` occurs anywhere (thinking included): the text after its LAST occurrence, up to the
   next `</answer>` (or the end when unclosed), stripped; no other rule is tried;
2. otherwise, in the text after the last `</think>`: the FIRST `[Tt]he answer is\\s*([A-D])` (no word
   boundary: "The answer is Definitely" reads D);
3. else the FIRST line that is exactly one letter A-D (after stripping the line);
4. else the LAST standalone letter `\\b([A-D])\\b`;
5. else the whole completion, stripped (which never equals a single gold letter: rule 3 or 4 would
   have found it). It is reported here as no prediction.
A length-cut completion is scored like any other.

Offline tasks have no recipe counterpart: in this mode they are scored by the project's rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from sdft_jax.data.records import Record
from sdft_jax.eval import scorers
from sdft_jax.eval.scorers import Score, ToolCalls

THINK_END = "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def _verdict(prediction: Any, expected: Any, correct: bool) -> Score:
    # Truncation never changes a recipe verdict, so the reason is only about the extracted answer.
    reason = "no_answer" if prediction is None else ("correct" if correct else "wrong")
    return Score(correct=correct, prediction=prediction, expected=expected, reason=reason)


# ---------------------------------------------------------------------------------------------------
# Tool use

_ACTION = re.compile(r"Action:\s*(\w+)")
_ACTION_INPUT = re.compile(r"Action Input:\s*(\{.*?\})", re.DOTALL)


def parse_tool_calls(text: str) -> ToolCalls:
    """The recipe's `extract_actions` / `extract_action_inputs` over ALL of `text` (thinking included)."""
    merged: dict[str, Any] = {}
    for block in _ACTION_INPUT.findall(text):
        try:
            merged.update(json.loads(block))  # a JSON text that starts with `{` is an object
        except json.JSONDecodeError:
            continue
    return ToolCalls(actions=tuple(_ACTION.findall(text)), arguments=merged)


def gold_tool_calls(golden_answer: Sequence[dict[str, str]]) -> ToolCalls:
    """The recipe's gold: raw `Action` names, each `Action_Input` parsed whole and merged.

    As in the recipe, an `Action_Input` that is not JSON (or a call without one) adds no arguments.
    An input that parses to something other than an object would make the recipe's `dict.update`
    fail; the readers refuse such rows, and here it is an error naming the call.
    """
    actions = tuple(call["Action"] for call in golden_answer)
    merged: dict[str, Any] = {}
    for i, call in enumerate(golden_answer):
        try:
            value = json.loads(call["Action_Input"])
        except (json.JSONDecodeError, KeyError):
            continue
        if not isinstance(value, dict):
            raise ValueError(f"golden_answer[{i}].Action_Input: not a JSON object: {call['Action_Input'][:60]!r}")
        merged.update(value)
    return ToolCalls(actions=actions, arguments=merged)


def score_tooluse(completion: str, golden_answer: Sequence[dict[str, str]], *, truncated: bool = False) -> Score:
    """The recipe's tool-use exact match (`truncated` is accepted and, as in the recipe, ignored)."""
    del truncated
    predicted = parse_tool_calls(completion)
    gold = gold_tool_calls(golden_answer)
    prediction = predicted.as_dict() if predicted.actions or predicted.arguments else None
    return _verdict(prediction, gold.as_dict(), predicted.matches(gold))  # multisets of actions, merged dicts


# ---------------------------------------------------------------------------------------------------
# Science

_THE_ANSWER_IS = re.compile(r"[Tt]he answer is\s*([A-D])")
_STANDALONE_LETTER = re.compile(r"\b([A-D])\b")
_LETTERS = ("A", "B", "C", "D")


def extract_choice(completion: str) -> str | None:
    """The answer the recipe's `extract_xml_answer` reads by its rules 1-4; None where it falls back to
    the whole completion (rule 5)."""
    if ANSWER_OPEN in completion:
        return completion.split(ANSWER_OPEN)[-1].split(ANSWER_CLOSE)[0].strip()
    text = completion.split(THINK_END)[-1]
    match = _THE_ANSWER_IS.search(text)
    if match:
        return match.group(1)
    for line in text.strip().split("\n"):
        if line.strip() in _LETTERS:
            return line.strip()
    letters = _STANDALONE_LETTER.findall(text)
    return letters[-1] if letters else None


def recipe_answer(completion: str) -> str:
    """Exactly what `extract_xml_answer` returns, rule 5's fallback (the whole text, stripped) included."""
    choice = extract_choice(completion)
    return completion.strip() if choice is None else choice


def score_science(completion: str, gold: str, *, truncated: bool = False) -> Score:
    """The recipe's multiple-choice match: its extracted answer equals the gold letter exactly."""
    del truncated
    return _verdict(extract_choice(completion), gold, recipe_answer(completion) == gold)


# ---------------------------------------------------------------------------------------------------


def score_record(record: Record, completion: str, *, truncated: bool = False) -> Score:
    """Scores `completion` with the recipe's scorer of the record's task (offline tasks: the project's)."""
    return scorers.score_with({"tooluse": score_tooluse, "science": score_science}, record, completion,
                              truncated=truncated)
