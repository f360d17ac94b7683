"""What every bad-input file of this folder shares: a `Case` (one bad input and the error it must
raise), `check_refused` (the error's class, exit status and one-line message naming the file and the row
or tensor) and `check_command_refused` (the same input through a command: one line on stderr, no
traceback, the class's exit status).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import pytest

from sdft_jax import cli, errors
from sdft_jax.data.records import DataError
from sdft_jax.errors import ModelError


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: `make(tmp_path)` writes it and returns the call that must fail and the words its
    message must contain (the file, and the row or tensor)."""

    id: str
    make: Callable[[pathlib.Path], tuple[Callable[[], Any], list[str]]]
    error: type[Exception]


def check_refused(case: Case, tmp_path: pathlib.Path) -> str:
    call, words = case.make(tmp_path)
    with pytest.raises(case.error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    expected_status = {DataError: errors.DATA, ModelError: errors.MODEL}[case.error]
    assert errors.classify(info.value).status == expected_status
    assert "\n" not in message  # one line
    return message


def check_command_refused(main: Callable, argv: list[str], status: int, label: str, words: list[str],
                          capsys: pytest.CaptureFixture) -> None:
    """`main(argv)` run as the command line runs it (`cli.run`) exits with `status`, printing one line
    `cmd: {label}: ...` that contains `words`, and no traceback."""
    assert cli.run(main, argv, prog="cmd") == status
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cmd: {label}: ") and "\n" not in err and "Traceback" not in err
    for word in words:
        assert word in err
