"""Files and directories appear whole or not at all; what interrupted writes left is removed."""

import os

import pytest

from sdft_jax.cache import atomic_directory, atomic_file, remove_partials


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


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
    with atomic_file(target) as tmp:
        open(tmp, "w").write("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.json"]


def test_remove_partials_of_one_target_or_all(tmp_path):
    for name in (".export.partial-1", ".export.partial-2", ".other.partial-3", "sub/.x.json.partial-4"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "export").mkdir()
    (tmp_path / ".hidden").write_text("kept")
    assert sorted(remove_partials(tmp_path, name="export")) == [
        str(tmp_path / ".export.partial-1"), str(tmp_path / ".export.partial-2")]
    assert sorted(os.listdir(tmp_path)) == [".hidden", ".other.partial-3", "export", "sub"]
    assert remove_partials(tmp_path) == [str(tmp_path / ".other.partial-3")]  # not recursive by default
    assert remove_partials(tmp_path, recursive=True) == [str(tmp_path / "sub" / ".x.json.partial-4")]
    assert remove_partials(tmp_path / "missing") == []
