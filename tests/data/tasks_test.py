"""load_records: generated offline tasks and tasks read from disk, through one function."""

import json

import pytest

from sdft_jax.data import offline_tasks
from sdft_jax.data.records import Skip
from sdft_jax.data.tasks import load_records


def test_offline_task_follows_its_config():
    cfg = offline_tasks.OfflineTaskConfig(seed=3, num_train=5)
    records = load_records("capitals", "train", offline=cfg)
    assert records == list(offline_tasks.make_task("capitals", "train", cfg)) and len(records) == 5


def test_jsonl_read_with_options_and_counted_skips(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "Q?", "demonstration": "A."}) + "\n" + json.dumps({"question": ""}) + "\n")
    with pytest.raises(ValueError, match="row 1"):
        load_records("jsonl", "train", data_dir=path)
    records = load_records("jsonl", "train", data_dir=path, skip_bad_rows=True)
    assert [r.demonstration for r in records] == ["A."]
    assert "skipped 1 bad rows" in caplog.text


def test_upstream_task_needs_a_data_dir():
    with pytest.raises(ValueError, match="task 'science' needs a data directory"):
        load_records("science", "eval")


def test_open_task_reads_as_load_records_does(tmp_path):
    from sdft_jax.data.tasks import open_task

    cfg = offline_tasks.OfflineTaskConfig(seed=3, num_train=5)
    generated = open_task("capitals", "train", offline=cfg)
    assert list(generated.open()) == load_records("capitals", "train", offline=cfg)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "Q?", "demonstration": "A."}) + "\n" + json.dumps({"question": ""}) + "\n")
    stream = open_task("jsonl", "train", data_dir=path, skip_bad_rows=True)
    assert list(stream.open()) == [*load_records("jsonl", "train", data_dir=path, skip_bad_rows=True),
                                   Skip("empty_field")]
    with pytest.raises(ValueError, match="task 'science' needs a data directory"):
        open_task("science", "train")
