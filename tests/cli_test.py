"""What the commands share: one line and a class's exit status per known error, `--debug`, the quieted
library messages, and the `--config` commands' flag parsing and validation."""

import argparse
import dataclasses
import logging
import sys

import ml_collections
import pytest
from absl import app, flags
from ml_collections import config_flags

from sdft_jax import cli, errors
from sdft_jax.checkpointing import CheckpointError
from sdft_jax.config import ConfigError
from sdft_jax.data.records import DataError
from sdft_jax.trainer import DivergedError

PROG = "python -m sdft_jax.x"


@dataclasses.dataclass
class Flag:
    value: object


GOOD = ml_collections.ConfigDict({"name": "c"})
BAD = ml_collections.ConfigDict({"name": "bad"})


def validate(config):
    if config.name == "bad":
        raise ConfigError("config.loss.top_k: must be >= 1")
    return f"valid {config.name}"


def test_a_valid_config_is_returned_and_logging_set_for_a_run(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    for name in cli.QUIET_AT_INFO:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.INFO)
    assert cli.validated_config(["prog"], Flag(GOOD), "configs/NAME.py", validate) == "valid c"
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("absl").level == logging.WARNING  # orbax's file operations
    assert logging.getLogger("sdft_jax.sampling.sampler").level == logging.WARNING  # a line per compiled program


def test_an_invalid_config_raises_its_error():
    with pytest.raises(ConfigError, match=r"^config\.loss\.top_k: must be >= 1$"):
        cli.validated_config(["prog"], Flag(BAD), "configs/NAME.py", validate)


def test_usage_errors_have_the_usage_status():
    with pytest.raises(app.UsageError, match=r"unexpected arguments: \['extra'\]") as info:
        cli.validated_config(["prog", "extra"], Flag(GOOD), "configs/NAME.py", validate)
    assert info.value.exitcode == errors.USAGE
    with pytest.raises(app.UsageError, match="--config=configs/continual.py is required"):
        cli.validated_config(["prog"], Flag(None), "configs/continual.py", validate)


class Unloaded:
    """What ml_collections leaves as the flag's value when the file did not load."""

    def __init__(self, error):
        self.error = error

    def keys(self):
        raise OSError(f"Configuration is not available because of an earlier failure to load: {self.error}")


def test_a_config_file_that_did_not_load_is_a_config_error():
    missing = Unloaded("Failed loading config file\n  configs/nope.py\n  [Errno 2] No such file or directory: "
                       "'configs/nope.py'")
    with pytest.raises(ConfigError, match=r"^--config=configs/nope\.py: no such file$"):
        cli.validated_config(["prog"], Flag(missing), "configs/NAME.py", validate)
    with pytest.raises(ConfigError, match=r"^--config: .*boom$"):
        cli.validated_config(["prog"], Flag(Unloaded("boom")), "configs/NAME.py", validate)
    with pytest.raises(ConfigError, match=r"get_config\(\) returned int, not a ConfigDict"):
        cli.validated_config(["prog"], Flag(3), "configs/NAME.py", validate)
    given = Flag(None)
    given.present = 1  # the flag was given: the file's get_config() returned None
    with pytest.raises(ConfigError, match=r"get_config\(\) returned NoneType, not a ConfigDict"):
        cli.validated_config(["prog"], given, "configs/NAME.py", validate)


def failing(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("error, status, label", [
    (ConfigError("config.checkpoint.keep: must be >= 1"), errors.CONFIG, "invalid config"),
    (DataError("train.jsonl", "not JSON", row=3), errors.DATA, "bad data"),
    (errors.ModelError("model/config.json: missing"), errors.MODEL, "bad model"),
    (CheckpointError("runs/x/checkpoints: no checkpoint restores"), errors.CHECKPOINT, "checkpoint error"),
    (DivergedError("the run diverged at step 4", step=4, nonfinite_steps=4), errors.DIVERGED, "training diverged"),
])
def test_a_known_error_is_one_line_and_its_class_status(capsys, error, status, label):
    assert cli.run(failing(error), [], prog=PROG) == status
    captured = capsys.readouterr()
    assert captured.err == f"{PROG}: {label}: {error}\n"
    assert "Traceback" not in captured.err and captured.out == ""


def test_a_multi_line_message_is_printed_on_one_line(capsys):
    error = CheckpointError("runs/x: no checkpoint restores (step 4: tensorstore said\n   file missing\n)")
    assert cli.run(failing(error), [], prog=PROG) == errors.CHECKPOINT
    assert capsys.readouterr().err == (f"{PROG}: checkpoint error: runs/x: no checkpoint restores (step 4: "
                                       "tensorstore said file missing )\n")


def test_debug_raises_the_error_itself_and_is_taken_out_of_the_arguments():
    seen = []

    def main(argv):
        seen.append(argv)
        raise ConfigError("config.x: bad")

    with pytest.raises(ConfigError, match="config.x: bad"):
        cli.run(main, ["--a", "--debug", "b"], prog=PROG)
    assert seen == [["--a", "b"]]


def test_an_unknown_error_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run(failing(ZeroDivisionError("bug")), [], prog=PROG)
    with pytest.raises(FileNotFoundError):  # not classified: no one said what it is
        cli.run(failing(FileNotFoundError("x")), [], prog=PROG)


def test_a_usage_error_and_the_status_main_returns(capsys):
    assert cli.run(failing(app.UsageError("--config=X is required")), [], prog=PROG) == errors.USAGE
    assert capsys.readouterr().err == f"{PROG}: usage error: --config=X is required (--help lists the arguments)\n"
    assert cli.run(lambda argv: None, [], prog=PROG) == 0
    assert cli.run(lambda argv: 5, [], prog=PROG) == 5


def test_model_errors_names_the_option_and_lets_classified_errors_through():
    with pytest.raises(errors.ModelError, match=r"^--model 'tiny-model': config\.json: missing$"):
        with cli.model_errors("--model", "tiny-model"):
            raise FileNotFoundError("config.json: missing")
    with pytest.raises(errors.ModelError, match=r"^--model: /x/m/config\.json: missing$"):  # the value is named once
        with cli.model_errors("--model", "/x/m"):
            raise FileNotFoundError("/x/m/config.json: missing")
    with pytest.raises(errors.ModelError, match=r"^--model 'tiny-model': unsupported architecture"):
        with cli.model_errors("--model", "tiny-model"):
            raise ValueError("unsupported architecture")
    with pytest.raises(DataError):  # a ValueError of another class is not the model's
        with cli.model_errors("--model", "m"):
            raise DataError("x.jsonl", "bad row")
    with pytest.raises(KeyError):
        with cli.model_errors("--model", "m"):
            raise KeyError("not an input error")


@pytest.mark.parametrize("text, message", [("0", "must be an integer >= 1, got '0'"),
                                           ("-1", "must be an integer >= 1, got '-1'"),
                                           ("x", "must be an integer >= 1, got 'x'")])
def test_int_at_least_refuses_with_the_option_named(capsys, text, message):
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--limit", type=cli.int_at_least(1))
    assert parser.parse_args(["--limit", "3"]).limit == 3
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--limit", text])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"p: error: argument --limit: {message}"


def test_option_name():
    fields = {"SamplingConfig.top_p": "--top-p"}
    assert cli.option_name("SamplingConfig.top_p must be in (0, 1], got 1.5", fields) == "--top-p must be in (0, 1], got 1.5"


class Kept(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_library_messages_that_do_not_apply_are_dropped_and_nothing_else(monkeypatch):
    before = len(logging.getLogger("transformers").filters)
    cli.quiet_libraries()  # (already run at import) again: no second filter
    assert len(logging.getLogger("transformers").filters) == before
    kept = Kept()
    for name in ("jax._src.xla_bridge", "transformers"):  # transformers' logger does not propagate
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [kept])
        monkeypatch.setattr(logger, "propagate", False)
        monkeypatch.setattr(logger, "level", logging.INFO)
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu': INTERNAL: no libtpu.so")
    logging.getLogger("jax._src.xla_bridge").warning("An NVIDIA GPU may be present on this machine")
    logging.getLogger("transformers").warning("PyTorch was not found. Models won't be available")
    logging.getLogger("transformers").warning("something else")
    assert kept.messages == ["An NVIDIA GPU may be present on this machine", "something else"]


@pytest.fixture
def config_flag_values(tmp_path):
    """Fresh absl flags with a `--config` file flag, and a config file with sections `a` and `b`."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "test config", flag_values=values, lock_config=True)
    path = tmp_path / "c.py"
    path.write_text("import ml_collections\n\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'a': {'keep': 2, 'every': 5}, 'b': 'x'})\n")
    return values, str(path)


def parse(argv, values, monkeypatch):
    monkeypatch.setattr(sys, "argv", argv)  # where ml_collections looks for the overrides, as in a command
    return cli.parse_flags(argv, values)


def test_parse_flags_reads_a_config_and_its_overrides(config_flag_values, monkeypatch):
    values, path = config_flag_values
    assert parse(["p", f"--config={path}", "--config.a.keep=3"], values, monkeypatch) == ["p"]
    assert values["config"].value.a.keep == 3


@pytest.mark.parametrize("args, message", [
    (["--config.a.kep=3"], r"^unknown config key --config\.a\.kep \(valid keys of config\.a: every, keep\)$"),
    (["--config.c.keep=3"], r"^unknown config key --config\.c\.keep \(valid keys of config: a, b\)$"),
    (["--config.a.keep=abc"], r"^config\.a\.keep: flag --config\.a\.keep=abc: .*invalid literal for int"),
])
def test_parse_flags_names_the_key_of_a_bad_override(config_flag_values, monkeypatch, args, message):
    values, path = config_flag_values
    with pytest.raises(ConfigError, match=message):
        parse(["p", f"--config={path}", *args], values, monkeypatch)


def test_parse_flags_a_config_file_that_fails_and_an_unknown_flag(config_flag_values, tmp_path, monkeypatch):
    values, _ = config_flag_values
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match=r"^--config: SyntaxError: invalid syntax \(broken\.py, line 1\)$"):
        parse(["p", f"--config={broken}"], values, monkeypatch)
    raises = tmp_path / "raises.py"
    raises.write_text("def get_config():\n    raise RuntimeError('no variant x')\n")
    with pytest.raises(ConfigError, match=rf"^--config: RuntimeError: no variant x \(at {raises}:2\)$"):
        parse(["p", f"--config={raises}"], values, monkeypatch)
    wrong_type = tmp_path / "wrong_type.py"
    wrong_type.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict({'a': True})\n"
                          "    c.a = 'yes'\n    return c\n")
    with pytest.raises(ConfigError, match=rf"^--config: TypeError: Could not override field 'a' .* \(at {wrong_type}:5\)$"):
        parse(["p", f"--config={wrong_type}"], values, monkeypatch)
    with pytest.raises(app.UsageError, match=r"^Unknown command line flag 'bogus'$") as info:
        parse(["p", "--bogus"], values, monkeypatch)
    assert info.value.exitcode == errors.USAGE
