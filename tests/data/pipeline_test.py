"""Tests of sdft_jax/data/pipeline.py: order, resumption, host shards."""

import json

import datasets
import pytest

from sdft_jax.data.pipeline import BatchIterator, PipelineConfig

ITEMS = [f"item{i}" for i in range(10)]


def _all(it):
    return [list(b) for b in it]


def _iterator(config, items=ITEMS, process_index=0, process_count=1):
    return BatchIterator(items, config, process_index=process_index, process_count=process_count)


def test_same_seed_same_order_and_every_epoch_is_a_permutation():
    config = PipelineConfig(global_batch_size=5, seed=3, num_epochs=3)
    a, b = _all(_iterator(config)), _all(_iterator(config))
    assert a == b and len(a) == 6
    flat = [x for batch in a for x in batch]
    epochs = [flat[0:10], flat[10:20], flat[20:30]]
    assert all(sorted(e) == sorted(ITEMS) for e in epochs)
    assert epochs[0] != ITEMS  # shuffled
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch


def test_different_seed_different_order():
    a = _all(_iterator(PipelineConfig(global_batch_size=10, seed=0)))
    b = _all(_iterator(PipelineConfig(global_batch_size=10, seed=1)))
    assert sorted(a[0]) == sorted(b[0]) and a != b


def test_no_shuffle_repeats_the_input_order_and_drops_the_incomplete_last_batch():
    it = _iterator(PipelineConfig(global_batch_size=4, num_epochs=2, shuffle=False))
    assert it.num_batches == 5  # 20 items -> 5 full batches
    batches = _all(it)
    assert batches[0] == ITEMS[:4] and batches[2] == ["item8", "item9", "item0", "item1"]  # spans epochs
    it = _iterator(PipelineConfig(global_batch_size=4, num_epochs=1, shuffle=False))
    assert _all(it) == [ITEMS[:4], ITEMS[4:8]]  # item8, item9 do not fill a batch


@pytest.mark.parametrize("num_epochs", [2, None])
def test_resume_mid_epoch_continues_exactly(num_epochs):
    config = PipelineConfig(global_batch_size=4, seed=11, num_epochs=num_epochs)
    reference = _iterator(config)
    expected = [next(reference) for _ in range(5)]
    run = _iterator(config)
    first = [next(run), next(run)]  # stop after 8 of 10 items: mid-epoch
    state = json.loads(json.dumps(run.get_state()))  # survives JSON
    assert state["next_batch"] == 2 and run.epoch == pytest.approx(0.8)
    resumed = _iterator(config)
    resumed.set_state(state)
    assert first + [next(resumed) for _ in range(3)] == expected


def test_resume_at_the_end_and_bad_states():
    config = PipelineConfig(global_batch_size=5, num_epochs=1)
    it = _iterator(config)
    _all(it)
    done = _iterator(config)
    done.set_state(it.get_state())
    assert _all(done) == []
    other = _iterator(PipelineConfig(global_batch_size=5, num_epochs=1, seed=1))
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(it.get_state())
    with pytest.raises(ValueError, match="invalid next_batch 3"):
        _iterator(config).set_state({**it.get_state(), "next_batch": 3})


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_host_shards_are_disjoint_and_cover_each_global_batch(process_count):
    items = list(range(24))
    config = PipelineConfig(global_batch_size=8, seed=5, num_epochs=2)
    global_batches = _all(_iterator(config, items))
    shards = [_all(_iterator(config, items, p, process_count)) for p in range(process_count)]
    for step, global_batch in enumerate(global_batches):
        parts = [shards[p][step] for p in range(process_count)]
        assert all(len(part) == 8 // process_count for part in parts)
        assert [x for part in parts for x in part] == global_batch  # in host order, nothing shared


def test_state_moves_between_host_counts():
    items = list(range(24))
    config = PipelineConfig(global_batch_size=8, seed=5, num_epochs=2)
    one_host = _iterator(config, items)
    next(one_host)
    expected_next = list(_iterator(config, items))[1]
    halves = []
    for p in range(2):
        it = _iterator(config, items, p, 2)
        it.set_state(one_host.get_state())
        halves += next(it)
    assert halves == expected_next


def test_bad_pipeline_arguments():
    with pytest.raises(ValueError, match="not a multiple of 3 hosts"):
        _iterator(PipelineConfig(global_batch_size=8), process_count=3)
    with pytest.raises(ValueError, match="process_index 2 not in"):
        _iterator(PipelineConfig(global_batch_size=8), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        _iterator(PipelineConfig(global_batch_size=32, num_epochs=2))
    with pytest.raises(ValueError, match="no items"):
        _iterator(PipelineConfig(global_batch_size=2), items=[])
    with pytest.raises(ValueError, match="global_batch_size must be positive"):
        PipelineConfig(global_batch_size=0)


def test_defaults_to_this_process():
    it = BatchIterator(ITEMS, PipelineConfig(global_batch_size=2))
    assert (it.process_index, it.process_count, it.per_host) == (0, 1, 2)


@pytest.mark.parametrize("num_epochs", [2, None])
def test_resume_over_a_datasets_source_gives_the_same_batches(tmp_path, num_epochs):
    """A `datasets.Dataset` (memory-mapped from disk, as `load_from_disk` gives it) is the source: a
    resumed iterator, on a freshly loaded copy, continues with exactly the batches of an unbroken one."""
    datasets.Dataset.from_list([{"question": f"Q{i}", "n": i} for i in range(10)]).save_to_disk(str(tmp_path / "d"))
    config = PipelineConfig(global_batch_size=4, seed=7, num_epochs=num_epochs)
    unbroken = _iterator(config, datasets.load_from_disk(str(tmp_path / "d")))
    expected = [next(unbroken) for _ in range(5)]
    assert sorted(row["n"] for batch in expected[:2] for row in batch) != list(range(8))  # shuffled
    run = _iterator(config, datasets.load_from_disk(str(tmp_path / "d")))
    first = [next(run), next(run)]
    state = json.loads(json.dumps(run.get_state()))
    resumed = _iterator(config, datasets.load_from_disk(str(tmp_path / "d")))
    resumed.set_state(state)
    assert first + [next(resumed) for _ in range(3)] == expected
    # the same order as over the rows held in a list
    over_a_list = _iterator(config, [{"question": f"Q{i}", "n": i} for i in range(10)])
    assert [[row["n"] for row in b] for b in expected] == [[row["n"] for row in next(over_a_list)] for _ in range(5)]
