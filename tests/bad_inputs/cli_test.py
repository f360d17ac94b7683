"""Bad command-line arguments and overlong prompts: each command refuses them in one line.

An argument error is argparse's one line and status 2 (`errors.USAGE`) naming the option; a model
directory that is not one is a ModelError (status 5) naming `--model`; a training run whose every prompt
is over `prompts.max_prompt_tokens` is a DataError (status 4) naming that key, before the weights load.
The commands run in-process (`main`, or `cli.run(main)` as the command line does).
"""

from __future__ import annotations

import pytest

from sdft_jax import cli, convert, errors, evaluate, generate, score
from sdft_jax.data.records import DataError

MODEL_FREE = "/nonexistent/model"  # never read: these arguments are refused first


def refused(main, argv, capsys) -> str:
    """The one line argparse prints for `argv` (status 2)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == errors.USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, line", [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--top-p", "1.5"], "--top-p must be a finite number in (0, 1], got 1.5"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0 (0 = off), got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
])
def test_generate_refuses_bad_sampling_arguments(capsys, args, line):
    assert refused(generate.main, ["--model", MODEL_FREE, "--prompt", "hi", *args], capsys).endswith(line)


@pytest.mark.parametrize("args, line", [
    (["--task", "capitals", "--model", MODEL_FREE, "--limit", "-1"], "argument --limit: must be an integer >= 1, got '-1'"),
    (["--task", "capitals", "--model", MODEL_FREE, "--limit", "0"], "argument --limit: must be an integer >= 1, got '0'"),
    (["--task", "capitals", "--model", MODEL_FREE, "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--task", "capitals", "--model", MODEL_FREE, "--max-new-tokens", "-4"], "argument --max-new-tokens: must be an "
     "integer >= 1"),
    (["--task", "capitals", "--model", MODEL_FREE, "--predictions", "p.jsonl"], "give exactly one of --model"),
    (["--task", "capitals"], "give exactly one of --model"),
    (["--task", "capitalz", "--model", MODEL_FREE], "argument --task: invalid choice: 'capitalz'"),
    (["--task", "tooluse", "--predictions", "p.jsonl"], "--task tooluse needs --data-dir"),
    (["--task", "capitals", "--model", MODEL_FREE, "--scoring", "paper"], "argument --scoring: invalid choice"),
])
def test_evaluate_refuses_bad_arguments(capsys, args, line):
    assert line in refused(evaluate.main, args, capsys)


def test_convert_refuses_an_existing_output_and_a_missing_input(capsys, tmp_path):
    (tmp_path / "in.gguf").write_bytes(b"GGUF")
    line = refused(convert.main, ["gguf", str(tmp_path / "in.gguf"), str(tmp_path)], capsys)
    assert line.endswith(f"{tmp_path} already exists; choose a new directory")
    line = refused(convert.main, ["gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")], capsys)
    assert line.endswith(f"{tmp_path / 'missing.gguf'}: no such file")
    assert "unrecognized arguments" in refused(convert.main, ["gguf", "a", "b", "c"], capsys)


@pytest.mark.parametrize("main, argv", [
    (generate.main, ["--model", MODEL_FREE, "--prompt", "hi"]),
    (score.main, ["--model", MODEL_FREE, "--text", "hello there"]),
    (evaluate.main, ["--model", MODEL_FREE, "--task", "capitals", "--limit", "1"]),
])
def test_a_missing_model_is_one_line_and_the_model_status(capsys, main, argv):
    assert cli.run(main, argv, prog="cmd") == errors.MODEL
    err = capsys.readouterr().err
    assert err.startswith("cmd: bad model: --model: ") and err.count("\n") == 1
    assert MODEL_FREE in err  # named once, by the underlying error


def test_a_model_directory_without_config_is_a_model_error(capsys, tmp_path):
    assert cli.run(score.main, ["--model", str(tmp_path), "--text", "hello there"], prog="cmd") == errors.MODEL
    err = capsys.readouterr().err
    assert err.startswith("cmd: bad model: --model: ") and str(tmp_path) in err and err.count("\n") == 1


def test_an_overlong_prompt_or_text_is_refused_naming_the_option(capsys, tiny_model_dir):
    path = tiny_model_dir("llama")  # 512 positions; its byte tokenizer gives one token a character
    line = refused(generate.main, ["--model", path, "--prompt", "x" * 600, "--max-new-tokens", "4"], capsys)
    assert line == ("python -m sdft_jax.generate: error: --prompt: prompt 0: 600 prompt tokens + --max-new-tokens 4 "
                    "= 604, more than the model's max_position_embeddings (512)")
    line = refused(generate.main, ["--model", path, "--prompt", "x" * 500, "--max-new-tokens", "40"], capsys)
    assert "--prompt: prompt 0: 500 prompt tokens + --max-new-tokens 40 = 540, more than" in line
    line = refused(score.main, ["--model", path, "--text", "x" * 600], capsys)
    assert line.endswith("--text gives 600 tokens, over the model's 512")


def test_a_run_whose_every_prompt_is_overlong_stops_before_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    from sdft_jax import trainer
    from sdft_jax.config import load_train_config
    from sdft_jax.testing.configs import tiny_config

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(trainer, "load_hf", never)
    cfg = load_train_config(tiny_config(tiny_model_dir("llama"), tmp_path / "run", **{"prompts.max_prompt_tokens": 8}))
    with pytest.raises(DataError) as info:
        trainer.Trainer(cfg)
    message = str(info.value)
    assert errors.classify(info.value).status == errors.DATA and "\n" not in message
    assert message.startswith("task 'capitals' split 'train': no training items: 8 records, dropped {")
    assert "config.prompts.max_prompt_tokens" in message
