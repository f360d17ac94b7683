"""Token ids of the two SDFT prompts of a record, and of the SFT baseline's prompt and target.

Student prompt: the record's messages (optional system turn, one user turn), then the assistant header.
Teacher prompt: the same system turn, one user turn holding the question and the golden demonstration
in the teacher template (spec section 1), then the assistant header. Both get the same thinking
prefill. Both are rendered by `sdft_jax.tokenization`, with the model's own chat template.

A prompt longer than `max_prompt_tokens` is an input problem, never a crash: the item is dropped and
counted (with one warning), or the prompt is truncated from the left where the config says so.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from transformers import PreTrainedTokenizerBase

from sdft_jax.data.records import Record
from sdft_jax.tokenization import encode_chat, render_chat, stop_token_ids
from sdft_jax.validation import check_bool, check_int, check_literals

_log = logging.getLogger(__name__)

DEFAULT_TEACHER_TEMPLATE = (
    "{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)
_PLACEHOLDER = re.compile(r"\{(question|demonstration)\}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """How prompts are built.

    Attributes:
      teacher_template: the teacher's user turn; `{question}` and `{demonstration}` are filled in, any
        other brace is literal text.
      thinking_prefill: text after the assistant header of both prompts (e.g. "<think>\\n").
      enable_thinking: passed to the chat template when not None (None: the template's default). Qwen3's
        template thinks by default; with False it ends both prompts with an empty `<think></think>` block.
      max_prompt_tokens: longest prompt (student or teacher, in tokens) kept as it is.
      overlong: "drop" an item with an overlong prompt, or "truncate_left" to its last tokens.
      max_target_tokens: longest SFT target; longer items are always dropped (a demonstration cut at
        either end teaches a wrong answer or none).
    """

    teacher_template: str = DEFAULT_TEACHER_TEMPLATE
    thinking_prefill: str = ""
    enable_thinking: bool | None = None
    max_prompt_tokens: int = 2048
    overlong: Literal["drop", "truncate_left"] = "drop"
    max_target_tokens: int = 2048

    def __post_init__(self):
        name = type(self).__name__
        found = set(_PLACEHOLDER.findall(self.teacher_template))
        if found != {"question", "demonstration"}:
            raise ValueError(f"{name}.teacher_template needs {{question}} and {{demonstration}}; has {sorted(found)}")
        check_literals(self)
        if self.enable_thinking is not None:
            check_bool(f"{name}.enable_thinking", self.enable_thinking)
        check_int(f"{name}.max_prompt_tokens", self.max_prompt_tokens, minimum=1)
        check_int(f"{name}.max_target_tokens", self.max_target_tokens, minimum=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptItem:
    """The rendered prompts of one record; `teacher_ids` is None when the record has no demonstration."""

    record: Record
    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...] | None
    truncated: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class SftItem:
    """The SFT baseline's example: the student prompt, then the demonstration and end-of-turn token."""

    record: Record
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    truncated: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class RenderResult:
    """Rendered items, and the records dropped by reason."""

    items: tuple[PromptItem, ...] | tuple[SftItem, ...]
    dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)


# Drop reasons: the keys of `RenderResult.dropped`.
STUDENT_OVERLONG = "student_overlong"
TEACHER_OVERLONG = "teacher_overlong"
TARGET_OVERLONG = "target_overlong"
NO_DEMONSTRATION = "no_demonstration"


def teacher_messages(record: Record, template: str = DEFAULT_TEACHER_TEMPLATE) -> list[dict[str, str]]:
    """The teacher's messages: the record's system turn (if any), then the filled template as user turn."""
    if record.demonstration is None:
        raise ValueError(f"{record.source}: row {record.index}: no demonstration for the teacher prompt")
    values = {"question": record.question, "demonstration": record.demonstration}
    # One pass over the template, so a question that itself contains "{demonstration}" stays literal.
    content = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    system = [m for m in record.messages if m["role"] == "system"]
    return [dict(m) for m in system] + [{"role": "user", "content": content}]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template writes right after an assistant message's content."""
    marker = "\u2063sdft-end-of-turn-probe\u2063"
    text = render_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                       add_generation_prompt=False)
    cut = text.rfind(marker)
    if cut < 0:
        raise ValueError("chat template does not render assistant content verbatim")
    stops = set(stop_token_ids(tokenizer))
    for token in tokenizer.encode(text[cut + len(marker):], add_special_tokens=False):
        if token in stops:
            return token
    if tokenizer.eos_token_id is None:
        raise ValueError("chat template writes no end-of-turn token after an assistant message, and no EOS")
    return int(tokenizer.eos_token_id)


class _Counter:
    def __init__(self):
        self.dropped: collections.Counter[str] = collections.Counter()

    def warn(self, what: str, total: int) -> None:
        if self.dropped:
            _log.warning("dropped %d of %d %s: %s", sum(self.dropped.values()), total, what, dict(self.dropped))


def _fit(ids: list[int], config: PromptConfig) -> tuple[list[int], bool] | None:
    """`ids` within `max_prompt_tokens`: as is, cut from the left, or None (drop)."""
    if len(ids) <= config.max_prompt_tokens:
        return ids, False
    if config.overlong == "drop":
        return None
    return ids[-config.max_prompt_tokens:], True


def prompt_item(tokenizer: PreTrainedTokenizerBase, record: Record, config: PromptConfig = PromptConfig(), *,
                require_teacher: bool = True) -> PromptItem | str:
    """The student and teacher prompt ids of one record, or the reason it is dropped (`STUDENT_OVERLONG`,
    `TEACHER_OVERLONG`, `NO_DEMONSTRATION`; see `render_prompts`)."""
    student = _fit(encode_chat(tokenizer, record.messages, prefill=config.thinking_prefill,
                               enable_thinking=config.enable_thinking), config)
    if student is None:
        return STUDENT_OVERLONG
    teacher_ids, truncated = None, student[1]
    if record.demonstration is not None:
        teacher = _fit(encode_chat(tokenizer, teacher_messages(record, config.teacher_template),
                                   prefill=config.thinking_prefill, enable_thinking=config.enable_thinking), config)
        if teacher is None:
            return TEACHER_OVERLONG
        teacher_ids, truncated = tuple(teacher[0]), truncated or teacher[1]
    elif require_teacher:
        return NO_DEMONSTRATION
    return PromptItem(record=record, student_ids=tuple(student[0]), teacher_ids=teacher_ids, truncated=truncated)


def sft_item(tokenizer: PreTrainedTokenizerBase, record: Record, config: PromptConfig = PromptConfig(), *,
             end_of_turn: int) -> SftItem | str:
    """The SFT example of one record, or the reason it is dropped (`NO_DEMONSTRATION`, `STUDENT_OVERLONG`,
    `TARGET_OVERLONG`; see `render_sft`). `end_of_turn` is `end_of_turn_id(tokenizer)`."""
    if record.demonstration is None:
        return NO_DEMONSTRATION
    prefill = config.thinking_prefill
    prompt = _fit(encode_chat(tokenizer, record.messages, prefill=prefill, enable_thinking=config.enable_thinking),
                  config)
    if prompt is None:
        return STUDENT_OVERLONG
    target_text = record.demonstration
    if prefill and target_text.startswith(prefill):
        target_text = target_text[len(prefill):]
    target = tokenizer.encode(target_text, add_special_tokens=False) + [end_of_turn]
    if len(target) > config.max_target_tokens:
        return TARGET_OVERLONG
    return SftItem(record=record, prompt_ids=tuple(prompt[0]), target_ids=tuple(target), truncated=prompt[1])


def _render(render_one: Callable[[Record], PromptItem | SftItem | str], records: Iterable[Record],
            what: str) -> RenderResult:
    counter, items, total = _Counter(), [], 0
    for record in records:
        total += 1
        item = render_one(record)
        if isinstance(item, str):
            counter.dropped[item] += 1
        else:
            items.append(item)
    counter.warn(what, total)
    return RenderResult(items=tuple(items), dropped=dict(counter.dropped))


def render_prompts(tokenizer: PreTrainedTokenizerBase, records: Iterable[Record],
                   config: PromptConfig = PromptConfig(), *, require_teacher: bool = True) -> RenderResult:
    """Student and teacher prompt ids of every record (see the module docstring).

    With `require_teacher` (training) a record without a demonstration is dropped and counted; without
    it (evaluation) such records get only the student prompt.
    """
    return _render(lambda r: prompt_item(tokenizer, r, config, require_teacher=require_teacher), records,
                   "records while rendering prompts")


def render_sft(tokenizer: PreTrainedTokenizerBase, records: Iterable[Record],
               config: PromptConfig = PromptConfig()) -> RenderResult:
    """The SFT baseline's (prompt, target) ids of every record with a demonstration.

    The prompt is the student prompt (with the thinking prefill); the target is the demonstration's
    ids and the end-of-turn token. A demonstration that already starts with the prefill (e.g. the
    thinking-format "<think>\\n...") has it removed, so it is not written twice.
    """
    eot = end_of_turn_id(tokenizer)
    return _render(lambda r: sft_item(tokenizer, r, config, end_of_turn=eot), records,
                   "records while rendering SFT examples")
