"""The `--config` commands' shared start: usage errors, an invalid config reported as exit status 2."""

import dataclasses
import logging

import pytest
from absl import app

from sdft_jax import cli
from sdft_jax.config import ConfigError


@dataclasses.dataclass
class Flag:
    value: object


def validate(config):
    if config == "bad":
        raise ConfigError("config.loss.top_k: must be >= 1")
    return f"valid {config}"


def test_a_valid_config_is_returned_and_logging_set_for_a_run(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    monkeypatch.setattr(logging.getLogger("absl"), "level", logging.INFO)
    assert cli.validated_config(["prog"], Flag("c"), "configs/NAME.py", validate) == "valid c"
    assert logging.getLogger().level == logging.INFO and logging.getLogger("absl").level == logging.WARNING


def test_an_invalid_config_is_printed_and_gives_none(capsys):
    assert cli.validated_config(["prog"], Flag("bad"), "configs/NAME.py", validate) is None
    assert capsys.readouterr().err == "invalid config: config.loss.top_k: must be >= 1\n"


def test_usage_errors():
    with pytest.raises(app.UsageError, match=r"unexpected arguments: \['extra'\]"):
        cli.validated_config(["prog", "extra"], Flag("c"), "configs/NAME.py", validate)
    with pytest.raises(app.UsageError, match="--config=configs/continual.py is required"):
        cli.validated_config(["prog"], Flag(None), "configs/continual.py", validate)
