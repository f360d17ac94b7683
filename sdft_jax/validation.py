"""The value checks every config dataclass uses, so that one kind of mistake gets one kind of message.

Each check raises a `ValueError` whose message starts with the name it is given (e.g.
`LossConfig.top_k must be an integer >= 1, got 0`); `config.load_train_config` relies on that prefix to
name the config key (`config.loss.top_k`). `bool` is never accepted where a number is expected: `True`
is an `int` to Python but never what a user meant by a count or a rate.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable
from typing import Any


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def _bounds(low: Any, high: Any, low_open: bool = False, high_open: bool = False) -> str:
    """The bounds as the messages say them: ` in [low, high)`, ` >= low`, ` < high`, or nothing."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              hint: str = "") -> int:
    """`value` if it is an integer in [minimum, maximum] (either bound optional), else a ValueError."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        raise ValueError(f"{name} must be an integer{_bounds(minimum, maximum)}{_hint(hint)}, got {value!r}")
    return value


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """`value` if it is a finite real number within the bounds (closed unless `*_open`), else a ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = _bounds(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a finite number{bounds}{_hint(hint)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a bool (not 0/1, not a string), else a ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices`, else a ValueError listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_literals(obj: Any) -> None:
    """Checks every field of dataclass `obj` annotated `Literal[...]` against its allowed values."""
    cls = type(obj)
    for field, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is typing.Literal:
            check_choice(f"{cls.__name__}.{field}", getattr(obj, field), typing.get_args(hint))


def check_increasing(name: str, values: Any) -> tuple[int, ...]:
    """`values` if it is a non-empty tuple of strictly increasing positive integers (shape buckets)."""
    ok = isinstance(values, tuple) and len(values) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok or any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be a non-empty tuple of increasing positive integers, got {values!r}")
    return values
