"""Tests of sdft_jax/data/sources.py through the `dataset` task: every form `datasets` reads, mapped
columns, streaming, a dataset loaded by name from a temporary cache with the hub offline."""

import json
import os
import pathlib
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdft_jax.data import readers, sources
from sdft_jax.data.readers import Columns
from sdft_jax.data.records import DataError

from tests.data.readers_test import DATA_DIR, needs_data

ROWS = [{"prompt": f"Q{i}", "response": f"D{i}", "label": "ABCD"[i % 4], "sys": f"S{i}"} for i in range(6)]
MAPPED = Columns(question="prompt", demonstration="response", system="sys", answer="label")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> pathlib.Path:
    """A fresh `datasets` cache per test (not the user's)."""
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _read(path, split="train", **options):
    return readers.read_task(path, "dataset", split, **options)


def _expected(split="train"):
    return [((("system", f"S{i}"), ("user", f"Q{i}")), f"D{i}", "ABCD"[i % 4]) for i in range(6)]


def _view(result):
    return [(tuple((m["role"], m["content"]) for m in r.messages), r.demonstration, r.gold) for r in result.records]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["parquet", "jsonl", "json"])
def test_files_with_mapped_columns(tmp_path, kind, streaming, datasets_cache):
    path = tmp_path / f"skills.{kind}"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif kind == "jsonl":
        _write_jsonl(path, ROWS)
    else:
        path.write_text(json.dumps(ROWS))
    result = _read(path, columns=MAPPED, streaming=streaming)
    assert _view(result) == _expected() and result.skipped == {}
    assert [r.index for r in result.records] == list(range(6))
    assert {(r.task, r.source) for r in result.records} == {("dataset", str(path))}
    # Streaming reads the file as it goes: no Arrow copy is written to the datasets cache.
    cached = list(datasets_cache.rglob("*.arrow")) if datasets_cache.exists() else []
    assert bool(cached) == (not streaming)


def test_default_columns_and_optional_fields(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"question": "Q", "demonstration": "D"},
                                               {"question": "Q2", "demonstration": "D2", "system": "S"}])
    r0, r1 = _read(path).records
    assert (r0.messages, r0.demonstration, r0.gold) == (({"role": "user", "content": "Q"},), "D", None)
    assert r1.system == "S"
    # The eval split needs no demonstration, but the answer where a column is named for it.
    evals = _write_jsonl(tmp_path / "e.jsonl", [{"question": "Q", "gold": "B"}])
    record = _read(evals, "eval", columns=Columns(answer="gold")).records[0]
    assert (record.demonstration, record.gold) == (None, "B")
    with pytest.raises(DataError, match=r"e.jsonl: row 0: field 'demonstration': missing"):
        _read(evals, "train", columns=Columns(answer="gold"))


def test_folder_of_split_files_and_dataset_dict(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:4]), folder / "train.parquet")
    _write_jsonl(folder / "test.jsonl", ROWS[4:])
    assert len(_read(folder, columns=MAPPED).records) == 4
    assert [r.question for r in _read(folder, "eval", columns=MAPPED).records] == ["Q4", "Q5"]
    assert [r.question for r in _read(folder, "eval", columns=MAPPED, eval_split="train").records][:1] == ["Q0"]

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:5]),
                          "validation": datasets.Dataset.from_list(ROWS[5:])}).save_to_disk(str(saved))
    train = _read(saved, columns=MAPPED)
    assert len(train.records) == 5 and train.records[0].source == str(saved / "train" / "data-00000-of-00001.arrow")
    assert _read(saved, "eval", columns=MAPPED, eval_split="validation").records[0].question == "Q5"
    # a single saved Dataset is every split
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert _view(_read(tmp_path / "one", "eval", columns=MAPPED)) == _expected()


def _cache_by_name(tmp_path: pathlib.Path, cache: pathlib.Path, name: str, rows: list[dict]) -> None:
    """Puts `rows` in `cache` as `datasets` leaves a hub dataset `name` ("owner/dataset") once loaded:
    `owner___dataset/default/0.0.0/<hash>/{dataset_info.json, dataset-train.arrow}`."""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    builder = datasets.load_dataset_builder("parquet", cache_dir=str(tmp_path / "build"),
                                            data_files={"train": str(tmp_path / "train.parquet")})
    builder.download_and_prepare()
    owner, dataset = name.split("/")
    out = cache / f"{owner}___{dataset}" / "default" / "0.0.0" / os.path.basename(builder.cache_dir)
    out.mkdir(parents=True)
    shutil.copy(os.path.join(builder.cache_dir, "dataset_info.json"), out)
    shutil.copy(os.path.join(builder.cache_dir, "parquet-train.arrow"), out / f"{dataset}-train.arrow")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataset_by_name_from_the_offline_cache(tmp_path, datasets_cache, streaming):
    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: nothing may be downloaded
    _cache_by_name(tmp_path, datasets_cache, "someone/skills", ROWS)
    result = _read("someone/skills", columns=MAPPED, streaming=streaming)
    assert _view(result) == _expected() and {r.source for r in result.records} == {"someone/skills"}
    with pytest.raises(DataError, match=r"someone/other: not a file, a folder, or a loadable dataset name"):
        _read("someone/other", columns=MAPPED)


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_rows_are_named_or_counted(tmp_path, streaming):
    rows = [ROWS[0], {**ROWS[1], "prompt": ""}, {**ROWS[2], "response": None}, ROWS[3]]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"s.parquet: row 1: field 'prompt': empty string"):
        _read(path, columns=MAPPED, streaming=streaming)
    result = _read(path, columns=MAPPED, streaming=streaming, skip_bad_rows=True)
    assert [r.index for r in result.records] == [0, 3]
    assert result.skipped == {"empty_field": 1, "missing_field": 1}


@pytest.mark.parametrize("streaming", [False, True])
def test_a_jsonl_file_datasets_refuses_is_read_line_by_line(tmp_path, streaming):
    """pyarrow refuses the whole file for one bad line; the line reader names it, or skips it."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"question": "Q", "demonstration": "D"}\n["a list"]\n{"question": "Q\\ud800", '
                     b'"demonstration": "D"}\n{"question": "Q3", "demonstration": "D3"}\n')
    with pytest.raises(DataError, match=r"s.jsonl: row 1 \(line 2\): expected an object, got list"):
        _read(path, streaming=streaming)
    result = _read(path, streaming=streaming, skip_bad_rows=True)
    assert [r.question for r in result.records] == ["Q", "Q3"]
    assert result.skipped == {"wrong_type": 1, "invalid_utf8": 1}


@needs_data
def test_the_upstream_layout_through_the_dataset_task_is_the_upstream_reader():
    """A save_to_disk split of the upstream layout read as a generic dataset: the same rows."""
    split = DATA_DIR / "science_data" / "eval_data"
    generic = _read(split, "eval", columns=Columns(question="answer", demonstration="output_text", system=""),
                    eval_split="x")
    assert len(generic.records) == 507
    upstream = readers.read_task(DATA_DIR, "science", "eval").records
    assert [r.question for r in generic.records] == [r.gold for r in upstream]


def test_open_rows_of_each_form(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    source, rows = sources.open_rows(str(path), "train", streaming=False, max_row_chars=1000)
    assert source == str(path) and [(i, label, row["prompt"]) for i, label, row in rows] == [(0, "0", "Q0"),
                                                                                               (1, "1", "Q1")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: holds no train.jsonl, train.json, train.parquet"):
        sources.open_rows(str(tmp_path / "empty"), "train", streaming=False, max_row_chars=1000)
