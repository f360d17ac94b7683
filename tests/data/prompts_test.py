"""Tests of sdft_jax/data/prompts.py: token-exact prompts on the real Qwen vocabulary and ChatML."""

import logging

import pytest

from sdft_jax.data import prompts
from sdft_jax.data.prompts import PromptConfig, render_prompts, render_sft, teacher_messages
from sdft_jax.data.records import Record
from sdft_jax.testing.qwen_tokenizer import qwen_tokenizer_dir
from sdft_jax.tokenization import load_tokenizer

IM_START, IM_END = 151644, 151645


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(qwen_tokenizer_dir())


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _record(question="Hi", demonstration="Hello there.", system=None, index=0):
    messages = (({"role": "system", "content": system},) if system else ()) + ({"role": "user", "content": question},)
    return Record(task="jsonl", index=index, source="t.jsonl", messages=messages, demonstration=demonstration)


def _contains_run(seq, run):
    return any(tuple(seq[i:i + len(run)]) == tuple(run) for i in range(len(seq) - len(run) + 1))


def test_student_prompt_token_exact(tok):
    item = render_prompts(tok, [_record()]).items[0]
    expected = ([IM_START] + _enc(tok, "user\nHi") + [IM_END] + _enc(tok, "\n")
                + [IM_START] + _enc(tok, "assistant\n"))
    assert list(item.student_ids) == expected == [IM_START, 872, 198, 13048, IM_END, 198, IM_START, 77091, 198]
    assert not item.truncated


def test_teacher_prompt_token_exact(tok):
    item = render_prompts(tok, [_record()]).items[0]
    content = ("Hi\n\nThis is an example for a response to the question:\nHello there.\n\n"
               "Now answer with a response of your own, including the thinking process.")
    expected = ([IM_START] + _enc(tok, "user\n" + content) + [IM_END] + _enc(tok, "\n")
                + [IM_START] + _enc(tok, "assistant\n"))
    assert list(item.teacher_ids) == expected
    # The demonstration's own ids appear as one contiguous run inside the teacher prompt.
    assert _contains_run(item.teacher_ids, _enc(tok, "Hello there"))
    assert not _contains_run(item.student_ids, _enc(tok, "Hello there"))


def test_system_turn_is_kept_in_both_prompts(tok):
    item = render_prompts(tok, [_record(system="Be brief.")]).items[0]
    system_ids = [IM_START] + _enc(tok, "system\nBe brief.") + [IM_END] + _enc(tok, "\n")
    assert list(item.student_ids[:len(system_ids)]) == system_ids
    assert list(item.teacher_ids[:len(system_ids)]) == system_ids
    assert teacher_messages(_record(system="S"))[0] == {"role": "system", "content": "S"}
    assert [m["role"] for m in teacher_messages(_record(system="S"))] == ["system", "user"]


def test_thinking_prefill_on_both_prompts(tok):
    item = render_prompts(tok, [_record()], PromptConfig(thinking_prefill="<think>\n")).items[0]
    plain = render_prompts(tok, [_record()]).items[0]
    tail = _enc(tok, "assistant\n<think>\n")
    assert list(item.student_ids) == list(plain.student_ids[:-2]) + tail
    assert list(item.teacher_ids[-len(tail):]) == tail


def test_enable_thinking_switches_both_prompts():
    tok = load_tokenizer(qwen_tokenizer_dir())
    # Qwen3's switch: without thinking, its template closes an empty <think> block after the header.
    tok.chat_template += "{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}" \
                         "<think>\n\n</think>\n\n{% endif %}"
    default = render_prompts(tok, [_record()]).items[0]
    off = render_prompts(tok, [_record()], PromptConfig(enable_thinking=False)).items[0]
    empty_think = _enc(tok, "<think>\n\n</think>\n\n")
    assert list(off.student_ids) == list(default.student_ids) + empty_think
    assert list(off.teacher_ids) == list(default.teacher_ids) + empty_think
    on = render_prompts(tok, [_record()], PromptConfig(enable_thinking=True)).items[0]
    assert on.student_ids == default.student_ids
    sft = render_sft(tok, [_record()], PromptConfig(enable_thinking=False)).items[0]
    assert list(sft.prompt_ids) == list(off.student_ids)
    with pytest.raises(ValueError, match="PromptConfig.enable_thinking must be true or false"):
        PromptConfig(enable_thinking="no")


def test_template_fill_is_one_pass_and_keeps_other_braces():
    record = _record(question="Q {demonstration} {x}", demonstration="D {question}")
    content = teacher_messages(record, "[{question}] {json: 1} [{demonstration}]")[0]["content"]
    assert content == "[Q {demonstration} {x}] {json: 1} [D {question}]"
    with pytest.raises(ValueError, match="needs {question} and {demonstration}"):
        PromptConfig(teacher_template="{question} only")
    with pytest.raises(ValueError, match="no demonstration"):
        teacher_messages(_record(demonstration=None))


def test_overlong_prompts_are_dropped_and_counted(tok, caplog):
    short, long_q = _record(index=0), _record(question="word " * 50, index=1)
    long_demo = _record(demonstration="word " * 50, index=2)
    config = PromptConfig(max_prompt_tokens=40)
    with caplog.at_level(logging.WARNING):
        result = render_prompts(tok, [short, long_q, long_demo, _record(demonstration=None, index=3)], config)
    assert [i.record.index for i in result.items] == [0]
    assert result.dropped == {"student_overlong": 1, "teacher_overlong": 1, "no_demonstration": 1}
    assert "dropped 3 of 4 records" in caplog.text


def test_overlong_prompts_truncate_left(tok):
    record = _record(question="word " * 50)
    full = render_prompts(tok, [record]).items[0]
    assert len(full.student_ids) == 59 and len(full.teacher_ids) > 59  # 50 words, 9 template tokens
    cut = render_prompts(tok, [record], PromptConfig(max_prompt_tokens=20, overlong="truncate_left")).items[0]
    assert cut.student_ids == full.student_ids[-20:] and cut.teacher_ids == full.teacher_ids[-20:]
    assert cut.truncated
    assert cut.student_ids[-3:] == (IM_START, 77091, 198)  # the assistant header survives


def test_eval_records_get_only_a_student_prompt(tok):
    result = render_prompts(tok, [_record(demonstration=None)], require_teacher=False)
    assert result.dropped == {} and result.items[0].teacher_ids is None
    assert len(result.items[0].student_ids) == 9


def test_sft_prompt_and_target(tok):
    item = render_sft(tok, [_record()]).items[0]
    assert item.prompt_ids == render_prompts(tok, [_record()]).items[0].student_ids
    assert list(item.target_ids) == _enc(tok, "Hello there.") + [IM_END]
    assert prompts.end_of_turn_id(tok) == IM_END


def test_sft_prefill_is_not_written_twice(tok):
    record = _record(demonstration="<think>\nR\n</think>\n\nThe answer is B.")
    item = render_sft(tok, [record], PromptConfig(thinking_prefill="<think>\n")).items[0]
    assert list(item.prompt_ids[-len(_enc(tok, "assistant\n<think>\n")):]) == _enc(tok, "assistant\n<think>\n")
    assert list(item.target_ids) == _enc(tok, "R\n</think>\n\nThe answer is B.") + [IM_END]


def test_sft_drops_and_counts(tok):
    records = [_record(index=0), _record(demonstration=None, index=1), _record(demonstration="w " * 30, index=2),
               _record(question="w " * 60, index=3)]
    result = render_sft(tok, records, PromptConfig(max_prompt_tokens=40, max_target_tokens=10))
    assert [i.record.index for i in result.items] == [0]
    assert result.dropped == {"no_demonstration": 1, "target_overlong": 1, "student_overlong": 1}


@pytest.fixture(scope="module")
def smollm2_tok():
    try:
        from sdft_jax.checkpoints.registry import resolve_model

        path = resolve_model("smollm2-135m")  # built into the cache on first use
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2-135M-Instruct not available: {e}")
    return load_tokenizer(path)


@pytest.mark.slow
def test_smollm2_prompts_token_exact(smollm2_tok):
    tok = smollm2_tok
    start, end = 1, 2  # SmolLM2's <|im_start|>, <|im_end|>
    # SmolLM2's template inserts its default system turn when the messages have none: in both prompts.
    system = [start] + _enc(tok, "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
    system += [end] + _enc(tok, "\n")
    header = [start] + _enc(tok, "assistant\n")
    item = render_prompts(tok, [_record()]).items[0]
    assert list(item.student_ids) == system + [start] + _enc(tok, "user\nHi") + [end] + _enc(tok, "\n") + header
    content = ("Hi\n\nThis is an example for a response to the question:\nHello there.\n\n"
               "Now answer with a response of your own, including the thinking process.")
    assert list(item.teacher_ids) == system + [start] + _enc(tok, "user\n" + content) + [end] + _enc(tok, "\n") + header
    sft = render_sft(tok, [_record()]).items[0]
    assert list(sft.target_ids) == _enc(tok, "Hello there.") + [end]
