"""The shared value checks: what each accepts, returns, and the exact message of what it refuses."""

import dataclasses
import math
from typing import Literal

import pytest

from sdft_jax.validation import check_bool, check_choice, check_increasing, check_int, check_literals, check_number


def refused(check, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        check(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("value, bounds", [(0, {}), (-3, {"maximum": -3}), (5, {"minimum": 5}),
                                           (7, {"minimum": 1, "maximum": 7})])
def test_check_int_returns_integers_within_bounds(value, bounds):
    assert check_int("X.n", value, **bounds) == value


@pytest.mark.parametrize("value, bounds, message", [
    (0, {"minimum": 1}, "X.n must be an integer >= 1, got 0"),
    (9, {"maximum": 8}, "X.n must be an integer <= 8, got 9"),
    (0, {"minimum": 1, "maximum": 4}, "X.n must be an integer in [1, 4], got 0"),
    (True, {}, "X.n must be an integer, got True"),  # a bool is never a count
    (2.0, {}, "X.n must be an integer, got 2.0"),
    ("2", {"minimum": 0, "hint": "0 = off"}, "X.n must be an integer >= 0 (0 = off), got '2'"),
])
def test_check_int_messages(value, bounds, message):
    assert refused(check_int, "X.n", value, **bounds) == message


@pytest.mark.parametrize("value, bounds", [(0.5, {}), (3, {"low": 3}), (1.0, {"low": 0.0, "high": 1.0}),
                                           (0.999, {"low": 0.0, "high": 1.0, "high_open": True})])
def test_check_number_returns_finite_numbers_within_bounds(value, bounds):
    assert check_number("X.r", value, **bounds) == value


@pytest.mark.parametrize("value, bounds, message", [
    (0.0, {"low": 0.0, "low_open": True}, "X.r must be a finite number > 0.0, got 0.0"),
    (-1, {"low": 0}, "X.r must be a finite number >= 0, got -1"),
    (2.0, {"high": 1.0}, "X.r must be a finite number <= 1.0, got 2.0"),
    (1.0, {"high": 1.0, "high_open": True}, "X.r must be a finite number < 1.0, got 1.0"),
    (1.0, {"low": 0.0, "high": 1.0, "high_open": True}, "X.r must be a finite number in [0.0, 1.0), got 1.0"),
    (0.0, {"low": 0.0, "high": 1.0, "low_open": True}, "X.r must be a finite number in (0.0, 1.0], got 0.0"),
    (math.nan, {}, "X.r must be a finite number, got nan"),
    (math.inf, {"low": 0.0}, "X.r must be a finite number >= 0.0, got inf"),
    (True, {}, "X.r must be a finite number, got True"),
    ("0.5", {"hint": "a rate"}, "X.r must be a finite number (a rate), got '0.5'"),
])
def test_check_number_messages(value, bounds, message):
    assert refused(check_number, "X.r", value, **bounds) == message


def test_check_bool():
    assert check_bool("X.b", True) is True and check_bool("X.b", False) is False
    assert refused(check_bool, "X.b", 1) == "X.b must be true or false, got 1"
    assert refused(check_bool, "X.b", "false") == "X.b must be true or false, got 'false'"


def test_check_choice():
    assert check_choice("X.c", "b", ("a", "b")) == "b"
    assert check_choice("X.c", "k", {"k": 1, "v": 2}) == "k"  # a mapping offers its keys
    assert refused(check_choice, "X.c", "z", iter(["a", "b"])) == "X.c must be one of ['a', 'b'], got 'z'"


@dataclasses.dataclass(frozen=True)
class _Choices:
    mode: Literal["fast", "slow"] = "fast"
    level: Literal[1, 2] = 1
    name: str = "anything"  # not a Literal: not checked


def test_check_literals_checks_every_literal_field_named_after_the_class():
    check_literals(_Choices(name="not checked"))
    assert refused(check_literals, _Choices(level=3)) == "_Choices.level must be one of [1, 2], got 3"
    assert refused(check_literals, _Choices(mode="medium")) == (
        "_Choices.mode must be one of ['fast', 'slow'], got 'medium'")


def test_check_increasing():
    assert check_increasing("X.buckets", (1, 8, 64)) == (1, 8, 64)
    assert check_increasing("X.buckets", (3,)) == (3,)
    message = "X.buckets must be a non-empty tuple of increasing positive integers, got {}"
    for bad in ((), (8, 8), (8, 4), (0, 4), (1, True), [1, 2], (1, 2.0)):
        assert refused(check_increasing, "X.buckets", bad) == message.format(repr(bad))
