"""The project's scorers (`eval.scoring = "project"`): is one completion correct for its record (spec section 7)?

Each scorer returns a `Score` holding the verdict, the value it extracted from the completion and the
gold it compared with, so per-item results can be written as JSONL and audited. `recipe_scorers.py`
reproduces the hosted recipe's scorers instead, quirks included; `docs/scoring.md` lists how they differ.

Rules shared by every scorer:
- Text up to the last `</think>` is reasoning, never an answer: it is removed before scoring.
- A completion cut by the token limit (`truncated=True`) scores 0 on every task: it never reached its
  final answer. What it would have been extracted is still reported.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdft_jax.data import offline_tasks
from sdft_jax.data.records import Record

THINK_END = "</think>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Score:
    """One completion's verdict.

    Attributes:
      correct: whether the completion counts as right.
      prediction: what was extracted from the completion (JSON-serialisable), None if nothing was.
      expected: the gold value it was compared with.
      reason: "correct", "wrong", "no_answer" (nothing extracted) or "truncated".
    """

    correct: bool
    prediction: Any
    expected: Any
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _verdict(prediction: Any, expected: Any, correct: bool, truncated: bool, *, zero_if_truncated: bool = True) -> Score:
    # The spec zeroes a length-cut completion for tool use (a cut call list is incomplete). For an
    # answer that was already given before the cut (science letter, short answer) the answer counts;
    # a cut completion with no answer is reported as "truncated".
    if truncated and (zero_if_truncated or prediction is None):
        reason, correct = "truncated", False
    elif prediction is None:
        reason = "no_answer"
    else:
        reason = "correct" if correct else "wrong"
    return Score(correct=correct, prediction=prediction, expected=expected, reason=reason)


def strip_thinking(text: str) -> str:
    """The text after the last `</think>` (all of it when there is none)."""
    cut = text.rfind(THINK_END)
    return text if cut < 0 else text[cut + len(THINK_END):]


# ---------------------------------------------------------------------------------------------------
# Tool use: exact match of actions and merged arguments

_ACTION = re.compile(r"Action:\s*(\w+)")
_ACTION_INPUT = "Action Input:"
_DECODER = json.JSONDecoder()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolCalls:
    """The tool calls read from a text: every action name, and all argument objects merged."""

    actions: tuple[str, ...]
    arguments: dict[str, Any]

    def matches(self, other: ToolCalls) -> bool:
        """Same multiset of actions and equal merged arguments."""
        return (collections.Counter(self.actions) == collections.Counter(other.actions)
                and self.arguments == other.arguments)

    def as_dict(self) -> dict[str, Any]:
        return {"actions": list(self.actions), "arguments": self.arguments}


def _argument_objects(text: str) -> list[Any]:
    """JSON objects after each `Action Input:`, read as balanced JSON from the first `{`."""
    starts = [m.end() for m in re.finditer(re.escape(_ACTION_INPUT), text)]
    objects = []
    for i, start in enumerate(starts):
        # An input's object must start before the next `Action Input:`; otherwise the next call's
        # object would be read twice.
        end = starts[i + 1] - len(_ACTION_INPUT) if i + 1 < len(starts) else len(text)
        brace = text.find("{", start, end)
        if brace < 0:
            continue
        try:
            obj, _ = _DECODER.raw_decode(text, brace)
        except json.JSONDecodeError:
            continue
        objects.append(obj)
    return objects


def parse_tool_calls(text: str) -> ToolCalls:
    """Actions (`Action:\\s*(\\w+)`) and merged `Action Input:` objects of `text`.

    Each input is read as balanced JSON from its first `{` (nested objects and braces inside strings
    included); later keys win; inputs that are not JSON objects are skipped.
    """
    merged: dict[str, Any] = {}
    for obj in _argument_objects(text):
        if isinstance(obj, dict):
            merged.update(obj)
    return ToolCalls(actions=tuple(_ACTION.findall(text)), arguments=merged)


def gold_tool_calls(golden_answer: Sequence[dict[str, str]]) -> ToolCalls:
    """The gold calls, read the same way as a completion from `Action: ...\\nAction Input: ...` text.

    Going through the same text reader means gold and prediction share every parsing quirk (e.g. an
    action name such as `[Optional]updateUserProfile` is not `\\w+` and is read from neither).
    """
    text = "\n".join(f"Action: {c['Action']}\nAction Input: {c['Action_Input']}" for c in golden_answer)
    return parse_tool_calls(text)


def score_tooluse(completion: str, golden_answer: Sequence[dict[str, str]], *, truncated: bool = False) -> Score:
    """Tool-use exact match of one completion against the record's `golden_answer`."""
    predicted = parse_tool_calls(strip_thinking(completion))
    gold = gold_tool_calls(golden_answer)
    prediction = predicted.as_dict() if predicted.actions or predicted.arguments else None
    return _verdict(prediction, gold.as_dict(), predicted.matches(gold), truncated)


# ---------------------------------------------------------------------------------------------------
# Science: one multiple-choice letter

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# The spec's `[Tt]he answer is\s*([A-D])`, plus a word boundary so "The answer is Definitely C" does not
# read as D.
_THE_ANSWER_IS = re.compile(r"[Tt]he answer is\s*([A-D])\b")
_LETTER_LINE = re.compile(r"^\s*([A-D])\s*$", re.MULTILINE)
_STANDALONE_LETTER = re.compile(r"\b([A-D])\b")


def extract_choice(completion: str) -> str | None:
    """The answer of a multiple-choice completion, in the spec's order of rules.

    1. the text inside the last `<answer>...</answer>` (stripped); 2. the letter of the last "the answer
    is X"; 3. the last line that is exactly one letter A-D; 4. the last standalone letter A-D. All after
    the last `</think>`.
    """
    text = strip_thinking(completion)
    for rule in (_ANSWER_TAG, _THE_ANSWER_IS, _LETTER_LINE, _STANDALONE_LETTER):
        found = rule.findall(text)
        if found:
            return found[-1].strip()
    return None


def score_science(completion: str, gold: str, *, truncated: bool = False) -> Score:
    """Multiple-choice accuracy: the extracted answer equals the gold letter exactly."""
    prediction = extract_choice(completion)
    return _verdict(prediction, gold, prediction == gold, truncated, zero_if_truncated=False)


# ---------------------------------------------------------------------------------------------------
# Offline invented-fact and probe tasks: a short answer

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                 "fifteen sixteen seventeen eighteen nineteen twenty").split()


def _answer_pattern(answer: str) -> re.Pattern[str]:
    words = answer.split()
    # Whole words only (so "Rome" is not found in "Romeo"), any whitespace between the words of a name.
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", re.IGNORECASE)


def score_short_answer(completion: str, gold: str, *, truncated: bool = False) -> Score:
    """Correct iff the gold answer appears as a whole word (case-insensitive) after think stripping.

    A number from 0 to 20 also counts when spelled as a word ("4" or "four"). The prediction reported
    is the matched text. This does not penalise a completion for naming other candidates as well: the
    offline tasks ask for one short fact and the model is greedy-decoded, so listing is rare; count it
    through the per-item predictions if a run looks suspicious.
    """
    text = strip_thinking(completion)
    answers = [gold]
    if gold.isdigit() and int(gold) < len(_NUMBER_WORDS):
        answers.append(_NUMBER_WORDS[int(gold)])
    for answer in answers:
        m = _answer_pattern(answer).search(text)
        if m:
            return _verdict(m.group(0), gold, True, truncated, zero_if_truncated=False)
    return _verdict(None, gold, False, truncated, zero_if_truncated=False)


# ---------------------------------------------------------------------------------------------------


ScoreFn = Callable[..., "Score"]  # (completion, gold, *, truncated) -> Score


def score_with(task_scorers: Mapping[str, ScoreFn], record: Record, completion: str, *,
               truncated: bool = False) -> Score:
    """Scores `completion` with `task_scorers[record.task]` (the offline tasks: `score_short_answer`)."""
    if record.gold is None:
        raise ValueError(f"{record.source}: row {record.index}: task {record.task!r} item has no gold answer")
    if record.task in task_scorers:
        return task_scorers[record.task](completion, record.gold, truncated=truncated)
    if record.task in offline_tasks.TASK_NAMES:
        return score_short_answer(completion, record.gold, truncated=truncated)
    raise ValueError(f"no scorer for task {record.task!r}")


def score_record(record: Record, completion: str, *, truncated: bool = False) -> Score:
    """Scores `completion` with the project's scorer of the record's task."""
    return score_with({"tooluse": score_tooluse, "science": score_science}, record, completion, truncated=truncated)
