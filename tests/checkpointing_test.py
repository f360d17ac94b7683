"""Orbax checkpoints of a run: round trip with the run's counters, no diverged state saved, a half-written
save ignored and cleaned up, a damaged newest checkpoint set aside for the newest intact one."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.checkpointing import (CheckpointError, Checkpointer, NonFiniteStateError, from_tree,
                                    nonfinite_leaves, to_tree)


def _state(step: int) -> dict:
    return {"params": {"w": jnp.arange(1000, dtype=jnp.float32) + step, "b": jnp.full((4, 4), step, jnp.bfloat16)},
            "step": jnp.int32(step)}


def _save(run_dir, steps, *, keep=3):
    checkpointer = Checkpointer(str(run_dir), keep=keep, async_save=False)
    for step in steps:
        checkpointer.save(step, _state(step), {"position": step}, {"nonfinite_steps": 10 * step})
    checkpointer.close()


def _largest_array_file(step_dir) -> str:
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state")) for f in names]
    return max(files, key=os.path.getsize)


def _assert_state(state, step):
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(step))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_tree_round_trip():
    state = _state(1)
    assert jax.tree.structure(from_tree(to_tree(state), state)) == jax.tree.structure(state)


def test_round_trip_with_the_run_counters(tmp_path):
    _save(tmp_path, [1, 2])
    checkpointer = Checkpointer(str(tmp_path), keep=3)
    restored = checkpointer.restore_latest(_state(0))
    assert (restored.step, restored.data, restored.run) == (2, {"position": 2}, {"nonfinite_steps": 20})
    _assert_state(restored.state, 2)
    state, data = checkpointer.restore(1, _state(0))  # one step, as multi-host tests use it
    _assert_state(state, 1)
    assert data == {"position": 1}
    checkpointer.close()
    assert Checkpointer(str(tmp_path / "empty")).restore_latest(_state(0)) is None


def test_a_state_with_a_nonfinite_value_is_never_saved(tmp_path):
    bad = _state(2)
    bad["params"]["w"] = bad["params"]["w"].at[7].set(jnp.inf)
    assert nonfinite_leaves(bad) == ["params/w"] and nonfinite_leaves(_state(2)) == []
    _save(tmp_path, [1])
    checkpointer = Checkpointer(str(tmp_path), keep=3, async_save=False)
    with pytest.raises(NonFiniteStateError, match=r"step 2: not saved: non-finite values in params/w"):
        checkpointer.save(2, bad, {"position": 2})
    assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
    checkpointer.close()


def test_a_save_killed_midway_is_ignored_and_removed(tmp_path):
    """What a kill during a save leaves (Orbax's temporary directory) is not a checkpoint, and the next
    Checkpointer removes it."""
    _save(tmp_path, [1])
    tmp = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "half").write_bytes(b"\0" * 10)
    checkpointer = Checkpointer(str(tmp_path), keep=3)
    assert checkpointer.restore_latest(_state(0)).step == 1
    checkpointer.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


@pytest.mark.parametrize("damage", ["corrupted", "removed"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact(tmp_path, caplog, damage):
    _save(tmp_path, [1, 2, 3])
    path = _largest_array_file(tmp_path / "checkpoints" / "3")
    if damage == "removed":
        os.remove(path)
    else:  # bytes flipped inside the array data: Orbax reads them back without error, the checksums differ
        data = bytearray(open(path, "rb").read())
        data[len(data) // 4: len(data) // 2] = bytes(b ^ 0x5A for b in data[len(data) // 4: len(data) // 2])
        open(path, "wb").write(bytes(data))
    checkpointer = Checkpointer(str(tmp_path), keep=3, async_save=False)
    with caplog.at_level(logging.WARNING, logger="sdft_jax.checkpointing"):
        restored = checkpointer.restore_latest(_state(0))
    assert restored.step == 2 and restored.run == {"nonfinite_steps": 20}
    _assert_state(restored.state, 2)
    warning = caplog.text
    assert f"checkpoint {tmp_path / 'checkpoints' / '3'} does not restore" in warning
    assert "resuming from step 2" in warning and "damaged_checkpoints" in warning
    assert [d.split("-")[0] for d in os.listdir(tmp_path / "damaged_checkpoints")] == ["3"]
    # The run saves step 3 again, over nothing.
    assert checkpointer.all_steps() == [1, 2]
    checkpointer.save(3, _state(3), {"position": 3})
    checkpointer.wait()
    assert checkpointer.restore_latest(_state(0)).step == 3
    checkpointer.close()


def test_no_intact_checkpoint_is_a_clear_error_that_touches_nothing(tmp_path):
    _save(tmp_path, [1, 2])
    for step in (1, 2):
        os.remove(_largest_array_file(tmp_path / "checkpoints" / str(step)))
    checkpointer = Checkpointer(str(tmp_path), keep=3)
    with pytest.raises(CheckpointError, match=r"checkpoints: no checkpoint restores \(step 2: .*; step 1: "):
        checkpointer.restore_latest(_state(0))
    assert checkpointer.all_steps() == [1, 2] and not (tmp_path / "damaged_checkpoints").exists()
    checkpointer.close()
