"""The streamed pipeline: its order against the source's (hand-checked), laziness, exact resume."""

import json

import pytest

from sdft_jax.data.pipeline import BatchIterator, PipelineConfig
from sdft_jax.data.records import Skip
from sdft_jax.data.stream import StreamBatchIterator, StreamConfig


class Source:
    """A re-readable source of `n` items that counts what was read."""

    def __init__(self, n: int):
        self.n, self.opened, self.read = n, 0, 0

    def __call__(self):
        self.opened += 1
        for i in range(self.n):
            self.read += 1
            yield i


def _all(config: StreamConfig, n: int) -> list[list[int]]:
    return list(StreamBatchIterator(Source(n), config))


def test_without_shuffle_batches_follow_the_source_across_passes():
    batches = _all(StreamConfig(global_batch_size=3, num_epochs=2, shuffle_window=1), 5)
    # 0 1 2 3 4 | 0 1 2 3 4 in threes; the incomplete last batch (4) is dropped
    assert batches == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


def test_each_window_is_a_permutation_of_the_sources_window():
    n, window = 12, 4
    flat = [i for b in _all(StreamConfig(global_batch_size=2, seed=3, num_epochs=2, shuffle_window=window), n)
            for i in b]
    source = list(range(n)) * 2
    assert len(flat) == len(source)
    for w in range(0, len(source), window):
        assert sorted(flat[w:w + window]) == source[w:w + window]
    assert flat != source  # shuffled
    # the same seed gives the same order, another seed another
    again = [i for b in _all(StreamConfig(global_batch_size=2, seed=3, num_epochs=2, shuffle_window=window), n)
             for i in b]
    other = [i for b in _all(StreamConfig(global_batch_size=2, seed=4, num_epochs=2, shuffle_window=window), n)
             for i in b]
    assert again == flat and other != flat


def test_reads_no_further_than_the_window_ahead():
    source = Source(10_000)
    it = StreamBatchIterator(source, StreamConfig(global_batch_size=8, shuffle_window=32))
    next(it)
    assert source.read == 32  # one window, not the split
    for _ in range(4):
        next(it)
    assert source.read == 64  # 40 items taken: the second window


def test_epoch_counts_the_passes_read():
    it = StreamBatchIterator(Source(4), StreamConfig(global_batch_size=2, shuffle_window=1))
    assert [(next(it), it.epoch) for _ in range(3)] == [([0, 1], 0.0), ([2, 3], 0.0), ([0, 1], 1.0)]


@pytest.mark.parametrize("window", [1, 3, 5])
def test_resumes_exactly_at_every_batch(window):
    """The state after k batches, through JSON, continues with exactly the uninterrupted batches: within a
    window, at its edge, across passes."""
    config = StreamConfig(global_batch_size=2, seed=7, num_epochs=3, shuffle_window=window)
    straight = _all(config, 7)
    assert len(straight) == 10
    for k in range(len(straight) + 1):
        first = StreamBatchIterator(Source(7), config)
        taken = [next(first) for _ in range(k)]
        state = json.loads(json.dumps(first.get_state()))
        assert state["next_batch"] == k
        resumed = StreamBatchIterator(Source(7), config)
        resumed.set_state(state)
        assert taken + list(resumed) == straight, k


def _with_skips():
    """0..5 with a Skip("odd") in place of every odd number and a Skip("last") at the end."""
    for i in range(6):
        yield Skip("odd") if i % 2 else i
    yield Skip("last")


def test_skips_are_counted_not_batched_and_resume_exactly():
    config = StreamConfig(global_batch_size=2, seed=5, num_epochs=3, shuffle_window=2)
    it = StreamBatchIterator(_with_skips, config)
    straight = [(next(it), it.skipped) for _ in range(4)]
    assert sorted(i for b, _ in straight for i in b) == [0, 0, 0, 2, 2, 2, 4, 4]
    # reading ahead by one window of two items: after the first batch, 0 1 2 -> one odd skip
    assert straight[0][1] == {"odd": 1}
    # windows: [0 S 2] [S 4 S S. | 0] [S 2 S 4] [S S. | 0 S 2]: the fourth batch's window reads into the
    # third pass, through 7 odd skips and the second pass's last
    assert straight[-1][1] == {"odd": 7, "last": 2}
    for k in range(4):
        first = StreamBatchIterator(_with_skips, config)
        for _ in range(k):
            next(first)
        resumed = StreamBatchIterator(_with_skips, config)
        resumed.set_state(json.loads(json.dumps(first.get_state())))
        assert [(next(resumed), resumed.skipped) for _ in range(4 - k)] == straight[k:], k
    with pytest.raises(ValueError, match=r"yielded no items \(skipped: \{'x': 2\}\)"):
        next(StreamBatchIterator(lambda: iter([Skip("x"), Skip("x")]), config))


def test_repeats_forever_without_num_epochs():
    it = StreamBatchIterator(Source(3), StreamConfig(global_batch_size=2, shuffle_window=1))
    assert [next(it) for _ in range(4)] == [[0, 1], [2, 0], [1, 2], [0, 1]]


def test_a_state_from_another_pipeline_is_refused():
    config = StreamConfig(global_batch_size=2, seed=1, shuffle_window=4)
    it = StreamBatchIterator(Source(9), config)
    next(it)
    state = it.get_state()
    for other in (StreamConfig(global_batch_size=2, seed=2, shuffle_window=4),
                  StreamConfig(global_batch_size=4, seed=1, shuffle_window=4),
                  StreamConfig(global_batch_size=2, seed=1, shuffle_window=8)):
        with pytest.raises(ValueError, match="different pipeline"):
            StreamBatchIterator(Source(9), other).set_state(state)
    held = BatchIterator(range(9), PipelineConfig(global_batch_size=2, seed=1), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="different pipeline"):
        StreamBatchIterator(Source(9), config).set_state(held.get_state())
    with pytest.raises(ValueError, match="different pipeline"):
        held.set_state(state)
    with pytest.raises(ValueError, match="invalid streamed iterator state"):
        StreamBatchIterator(Source(9), config).set_state({**state, "next_batch": -1})


def test_a_state_past_a_shorter_source_is_refused():
    config = StreamConfig(global_batch_size=2, shuffle_window=1)
    it = StreamBatchIterator(Source(9), config)
    for _ in range(3):
        next(it)
    with pytest.raises(ValueError, match="past the end of the streamed split"):
        StreamBatchIterator(Source(4), config).set_state(it.get_state())


def test_an_empty_source_fails_instead_of_spinning():
    with pytest.raises(ValueError, match="yielded no items"):
        next(StreamBatchIterator(Source(0), StreamConfig(global_batch_size=2, shuffle_window=1)))


@pytest.mark.parametrize("field, value", [("global_batch_size", 0), ("shuffle_window", 0), ("num_epochs", 0)])
def test_config_is_checked(field, value):
    with pytest.raises(ValueError, match=f"StreamConfig.{field}"):
        StreamConfig(**{"global_batch_size": 2, field: value})


def test_resumes_exactly_over_a_streamed_datasets_source(tmp_path):
    """The records of a JSON Lines file through `datasets.load_dataset(..., streaming=True)` (task
    `dataset`), a bad row skipped: resumed at every batch, the batches and counts of an unbroken read."""
    from sdft_jax.data import readers

    path = tmp_path / "train.jsonl"
    rows = [{"question": f"Q{i}", "demonstration": f"D{i}"} for i in range(7)]
    rows[3] = {"question": "", "demonstration": "D3"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = readers.stream_task(path, "dataset", "train", streaming=True, skip_bad_rows=True)

    def questions():
        for r in records.open():
            yield r if isinstance(r, Skip) else r.question

    config = StreamConfig(global_batch_size=2, seed=2, num_epochs=2, shuffle_window=3)
    unbroken = StreamBatchIterator(questions, config)
    straight = [(b, unbroken.skipped) for b in unbroken]
    assert sorted(q for b, _ in straight for q in b) == sorted([f"Q{i}" for i in range(7) if i != 3] * 2)
    assert straight[-1][1] == {"empty_field": 2}
    for k in range(len(straight)):
        first = StreamBatchIterator(questions, config)
        for _ in range(k):
            next(first)
        resumed = StreamBatchIterator(questions, config)
        resumed.set_state(json.loads(json.dumps(first.get_state())))
        assert [(b, resumed.skipped) for b in resumed] == straight[k:], k
