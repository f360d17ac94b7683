"""The generate CLI on a tiny model: JSON fields, log-probs against scoring, plain text, bad arguments."""

import json

import numpy as np
import pytest

from sdft_jax import generate
from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.score import token_logprobs
from sdft_jax.tokenization import encode_chat, load_tokenizer

ARGS = ["--prompt", "Name a colour.", "--chat", "--temperature", "0", "--max-new-tokens", "8"]


def run(argv, capsys):
    assert generate.main(argv) == 0
    return capsys.readouterr().out


def test_json_output_matches_scoring_and_plain_output(tiny_model_dir, capsys):
    path = tiny_model_dir("llama")
    out = json.loads(run(["--model", path, *ARGS, "--json"], capsys))
    tokenizer = load_tokenizer(path)
    assert out["prompt_ids"] == encode_chat(tokenizer, [{"role": "user", "content": "Name a colour."}])
    n = len(out["ids"])
    assert 1 <= n <= 8 and len(out["model_logprobs"]) == len(out["sampling_logprobs"]) == n
    assert out["stop_reason"] == ("length" if n == 8 else "stop_token")
    assert out["text"] == tokenizer.decode(out["ids"], skip_special_tokens=True)
    assert out["sampling_logprobs"] == [0.0] * n  # greedy
    # The model log-probs are what teacher-forced scoring of prompt ++ completion gives.
    scored = token_logprobs(load_hf(path), out["prompt_ids"] + out["ids"])[-n:]
    np.testing.assert_allclose(out["model_logprobs"], scored, atol=1e-4)
    # Without --json the same completion is printed as text.
    assert run(["--model", path, *ARGS], capsys) == out["text"] + "\n"


@pytest.mark.parametrize("extra, message", [
    (["--top-p", "0"], "--top-p must be"),  # named as the option, not SamplingConfig's field
    (["--temperature", "-1"], "--temperature must be"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be"),
])
def test_bad_settings_are_usage_errors(extra, message, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", tiny_model_dir("llama"), "--prompt", "hi", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_prompt_is_a_usage_error(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--model", tiny_model_dir("llama"), "--prompt", ""])
    assert "no tokens" in capsys.readouterr().err
