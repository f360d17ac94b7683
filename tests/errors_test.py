"""The error classes and their exit statuses: every name in the table is a real exception class, the
statuses are distinct, subclasses belong to their base's class, and the README's table says the same."""

import importlib
import pathlib
import re

import pytest

from sdft_jax import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]


def resolve(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("error_class", errors.ERROR_CLASSES, ids=lambda c: c.label)
def test_every_name_in_the_table_is_an_exception_class(error_class):
    for name in error_class.exceptions:
        cls = resolve(name)
        assert isinstance(cls, type) and issubclass(cls, Exception), name
        assert f"{cls.__module__}.{cls.__qualname__}" == name  # defined there, not re-exported


def test_statuses_are_distinct_and_not_python_s_own():
    statuses = [c.status for c in errors.ERROR_CLASSES] + [errors.USAGE]
    assert len(set(statuses)) == len(statuses)
    assert 0 not in statuses and 1 not in statuses  # 1: an unexpected error (traceback)


def test_classify_by_the_type_or_a_base_of_it():
    from sdft_jax.checkpointing import CheckpointError
    from sdft_jax.config import ConfigError
    from sdft_jax.data.records import DataError
    from sdft_jax.trainer import DivergedError

    class SpecificDataError(DataError):
        pass

    assert errors.classify(ConfigError("x")).status == errors.CONFIG
    assert errors.classify(SpecificDataError("f.jsonl", "bad")).status == errors.DATA
    assert errors.classify(errors.ModelError("m")).status == errors.MODEL
    assert errors.classify(CheckpointError("c")).status == errors.CHECKPOINT
    assert errors.classify(DivergedError("d", step=1, nonfinite_steps=1)).status == errors.DIVERGED
    assert errors.classify(ValueError("a plain one")) is None
    assert errors.classify(FileNotFoundError("x")) is None


def test_the_readme_table_lists_each_status():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (\d) \| ([^|]+?) \|", readme, flags=re.MULTILINE))
    expected = {str(c.status): c.label for c in errors.ERROR_CLASSES} | {str(errors.USAGE): "usage error"}
    assert {status: rows.get(status) for status in expected} == expected
