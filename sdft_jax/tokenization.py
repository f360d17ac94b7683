"""Tokenizers and chat rendering: the one place that turns messages into token ids.

Both SDFT roles (student and teacher) and evaluation render prompts here, with the model's own chat
template, so the two prompts of one item can only differ in their messages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

Message = Mapping[str, str]

# End-of-turn / end-of-text tokens of the chat formats we support; any that the vocabulary has stops
# generation besides the tokenizer's own EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Loads the fast tokenizer (and its chat template) of a local HF model directory."""
    path = os.fspath(path)
    missing = [f for f in _TOKENIZER_FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path}: no tokenizer here (missing {', '.join(missing)})")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: tokenizer_config.json has no chat_template")
    return tokenizer


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    prefill: str = "",
    enable_thinking: bool | None = None,
) -> str:
    """Chat-templated text of `messages`, ending in the assistant header (plus `prefill`, e.g. `<think>\\n`).

    `enable_thinking` is passed to the template when not None (Qwen3's template thinks unless it is
    False, and then writes an empty `<think>` block after the header); templates without the switch
    ignore it.
    """
    if not messages:
        raise ValueError("render_chat: no messages")
    for i, m in enumerate(messages):
        if not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise ValueError(f"render_chat: message {i} needs string 'role' and 'content', got {dict(m)!r:.200}")
    switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, **switch
    )
    return text + prefill


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    prefill: str = "",
    enable_thinking: bool | None = None,
) -> list[int]:
    """Token ids of the chat-templated `messages` (the template supplies any BOS; none is added here)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, prefill=prefill,
                       enable_thinking=enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padded (masked) slots: the pad token, else end-of-sequence, else 0."""
    return int(next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """Ids that end a completion: EOS and every end-of-turn token the vocabulary has."""
    ids = set(int(i) for i in extra)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(ids))
