"""Chat rendering is token-exact ChatML for SmolLM2 and for the real Qwen vocabulary."""

import pytest

from sdft_jax.testing.qwen_tokenizer import qwen_tokenizer_dir
from sdft_jax.tokenization import encode_chat, load_tokenizer, render_chat, stop_token_ids

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


def test_smollm2_chatml_is_token_exact(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    im_start, im_end = 1, 2
    assert tok.convert_ids_to_tokens([im_start, im_end]) == ["<|im_start|>", "<|im_end|>"]
    # SmolLM2's template inserts its default system turn when the messages have none.
    expected = ([im_start] + enc("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
                + [im_end] + enc("\n") + [im_start] + enc("user\nWhat is 2+2?") + [im_end] + enc("\n")
                + [im_start] + enc("assistant\n"))
    assert encode_chat(tok, MESSAGES) == expected
    with_system = [{"role": "system", "content": "Be brief."}] + MESSAGES
    ids = encode_chat(tok, with_system)
    assert ids[:1 + len(enc("system\nBe brief."))] == [im_start] + enc("system\nBe brief.")
    assert stop_token_ids(tok) == (0, 2)  # <|endoftext|>, <|im_end|> (= EOS)


def test_smollm2_digits_are_split(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert len(tok.encode("12345", add_special_tokens=False)) == 5


def test_qwen_chatml_is_token_exact():
    tok = load_tokenizer(qwen_tokenizer_dir())
    assert tok.encode("Hello world!", add_special_tokens=False) == [9707, 1879, 0]
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    expected = ([151644] + enc("user\nWhat is 2+2?") + [151645] + enc("\n") + [151644] + enc("assistant\n"))
    assert encode_chat(tok, MESSAGES) == expected
    assert enc("assistant\n") == [77091, 198]
    assert encode_chat(tok, MESSAGES, prefill="<think>\n")[-len(enc("<think>\n")):] == enc("<think>\n")
    assert stop_token_ids(tok) == (151643, 151645)


# ChatML turns, then Qwen3's generation prompt as its chat template writes it: the model opens its own
# <think> block unless `enable_thinking` is false, when the template closes an empty one.
QWEN3_THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)


def test_enable_thinking_reaches_qwen3s_template():
    tok = load_tokenizer(qwen_tokenizer_dir())
    tok.chat_template = QWEN3_THINKING_TEMPLATE
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    thinking = encode_chat(tok, MESSAGES)  # Qwen3's default: thinking on, nothing after the header
    assert thinking == encode_chat(tok, MESSAGES, enable_thinking=True)
    assert thinking[-3:] == [151644] + enc("assistant\n")
    off = encode_chat(tok, MESSAGES, enable_thinking=False)
    assert off == thinking + enc("<think>\n\n</think>\n\n")
    assert render_chat(tok, MESSAGES, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # A template without the switch ignores it.
    plain = load_tokenizer(qwen_tokenizer_dir())
    assert encode_chat(plain, MESSAGES, enable_thinking=False) == encode_chat(plain, MESSAGES) == thinking


def test_render_without_generation_prompt(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert not render_chat(tok, MESSAGES, add_generation_prompt=False).endswith("assistant\n")


def test_bad_messages_and_missing_tokenizer(smollm2_dir, tmp_path):
    tok = load_tokenizer(smollm2_dir)
    with pytest.raises(ValueError, match="message 0 needs string 'role' and 'content'"):
        encode_chat(tok, [{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="no messages"):
        encode_chat(tok, [])
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        load_tokenizer(tmp_path)


def test_pad_token_id_falls_back_to_eos_then_zero():
    from types import SimpleNamespace

    from sdft_jax.tokenization import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # 0 is a real pad id
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
