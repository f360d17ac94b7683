"""Fixtures of the bad-input files."""

from __future__ import annotations

import pathlib
import shutil

import pytest


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> pathlib.Path:
    """A fresh copy of the tiny Llama directory, to damage."""
    return pathlib.Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "model"))

