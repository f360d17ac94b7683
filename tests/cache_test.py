"""Directories appear whole or not at all."""

import os

import pytest

from sdft_jax.cache import atomic_directory


def test_complete_block_renames_into_place(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("x")
        assert not os.path.exists(tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert os.listdir(tmp_path) == ["out"]


def test_crash_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("x")
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []


def test_a_finished_concurrent_copy_wins(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "first.txt").write_text("1")
        open(os.path.join(tmp, "second.txt"), "w").write("2")
    assert os.listdir(tmp_path / "out") == ["first.txt"]
    assert os.listdir(tmp_path) == ["out"]
