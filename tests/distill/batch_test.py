"""StepBatch layout: completion token t at column P + t, predicted by column P - 1 + t."""

import numpy as np
import pytest

from sdft_jax.distill.batch import make_step_batch, split_rows


def test_layout_and_alignment():
    b = make_step_batch([[5, 6], [7, 8, 9]], [[1, 2, 3, 4], [1]], [[10, 11, 12], [13]], pad_id=0,
                        sampler_logprobs=[[-1.0, -2.0, -3.0], [-4.0]])
    assert b.student_prompt_len == 3 and b.teacher_prompt_len == 4 and b.completion_len == 3
    np.testing.assert_array_equal(b.student_tokens, [[0, 5, 6, 10, 11, 12], [7, 8, 9, 13, 0, 0]])
    np.testing.assert_array_equal(b.student_mask, [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b.teacher_tokens, [[1, 2, 3, 4, 10, 11, 12], [0, 0, 0, 1, 13, 0, 0]])
    np.testing.assert_array_equal(b.completion_mask, [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(b.completion_tokens, [[10, 11, 12], [13, 0, 0]])
    np.testing.assert_array_equal(b.sampler_logprobs, [[-1, -2, -3], [-4, 0, 0]])
    # Row 0's real student prompt is [5, 6]: its last token (column P-1 = 2) predicts completion token 0.
    assert b.student_tokens[0, b.student_prompt_len - 1] == 6


def test_buckets_and_context_cut():
    b = make_step_batch([[5] * 3], [[1] * 5], [[9] * 6], pad_id=0, prompt_buckets=(4, 8), completion_buckets=(8,))
    assert (b.student_prompt_len, b.teacher_prompt_len, b.completion_len) == (4, 8, 8)
    cut = make_step_batch([[5] * 3], [[1] * 5], [[9] * 6], pad_id=0, max_seq_len=9)
    assert cut.completion_len == 4 and cut.teacher_tokens.shape[1] == 9  # 2 completion tokens cut for the teacher
    assert cut.completion_mask.sum() == 4


def test_sft_reuses_the_student_sequence():
    b = make_step_batch([[5, 6]], None, [[7, 8]], pad_id=0)
    assert b.teacher_tokens is b.student_tokens


@pytest.mark.parametrize("args, message", [
    (([[]], [[1]], [[2]]), "row 0: empty prompt"),
    (([[1]], [[1]], [[2]]), None),
    (([[1], [2]], [[1]], [[2], [3]]), "differ in number of rows"),
])
def test_errors(args, message):
    if message is None:
        make_step_batch(*args, pad_id=0)
        return
    with pytest.raises(ValueError, match=message):
        make_step_batch(*args, pad_id=0)


def test_mismatched_logprobs():
    with pytest.raises(ValueError, match="row 0: 1 sampler log-probs for 2 tokens"):
        make_step_batch([[1]], [[1]], [[2, 3]], pad_id=0, sampler_logprobs=[[-1.0]])


def test_split_rows_takes_every_nth_row():
    """Micro-batch i holds rows i, i + n, ...: with rows split over 2 devices in blocks ([0..3], [4..7]),
    each of the 2 micro-batches holds 2 rows of each device's block."""
    rows = range(8)
    b = make_step_batch([[r + 1] for r in rows], [[r + 1, 0] for r in rows], [[r + 10] * (r + 1) for r in rows],
                        pad_id=0)
    parts = split_rows(b, 2)
    assert parts.student_tokens.shape == (2, 4, b.student_tokens.shape[1])
    assert parts.completion_mask.shape == (2, 4, 8) and parts.teacher_tokens.shape == (2, 4, 10)
    np.testing.assert_array_equal(parts.student_tokens[1], b.student_tokens[[1, 3, 5, 7]])
    np.testing.assert_array_equal(parts.completion_mask[0], b.completion_mask[[0, 2, 4, 6]])
    np.testing.assert_array_equal(split_rows(b, 1).sampler_logprobs[0], b.sampler_logprobs)
    with pytest.raises(ValueError, match="8 rows do not split into 3 micro-batches"):
        split_rows(b, 3)
