"""Tests of sdft_jax/padding.py: bucket rounding, left and right padding."""

import numpy as np
import pytest

from sdft_jax.padding import LENGTH_BUCKETS, bucket_length, pad_rows


@pytest.mark.parametrize("length,bucket", [(1, 64), (64, 64), (65, 128), (500, 512), (1024, 1024), (1025, 2048)])
def test_bucket_length(length, bucket):
    assert bucket_length(length, LENGTH_BUCKETS) == bucket


def test_bucket_length_custom_and_too_long():
    assert bucket_length(5, (8, 4, 16)) == 8  # unsorted buckets are fine
    with pytest.raises(ValueError, match="length 17 exceeds the largest bucket 16"):
        bucket_length(17, (4, 8, 16))
    assert bucket_length(17, None) == bucket_length(17, ()) == 17  # no buckets: the length itself


def test_pad_right_and_left():
    seqs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    width = bucket_length(max(map(len, seqs)), (4, 8))
    right, right_mask = pad_rows(seqs, width, pad_value=0, side="right")
    np.testing.assert_array_equal(right, [[5, 6, 7, 0, 0, 0, 0, 0],
                                          [8, 0, 0, 0, 0, 0, 0, 0],
                                          [9, 10, 11, 12, 13, 0, 0, 0]])
    np.testing.assert_array_equal(right_mask, right != 0)
    left, left_mask = pad_rows(seqs, width, pad_value=-1, side="left")
    np.testing.assert_array_equal(left, [[-1, -1, -1, -1, -1, 5, 6, 7],
                                         [-1, -1, -1, -1, -1, -1, -1, 8],
                                         [-1, -1, -1, 9, 10, 11, 12, 13]])
    np.testing.assert_array_equal(left_mask.sum(axis=1), [3, 1, 5])
    assert left.dtype == np.int32 and left_mask.dtype == bool
    # The pad id may be a real token id (e.g. 0): the mask, not the id, marks padding.
    _, zeros_mask = pad_rows([[0, 0], [0]], 2, pad_value=0, side="right")
    np.testing.assert_array_equal(zeros_mask, [[True, True], [True, False]])
    with pytest.raises(ValueError, match="side must be"):
        pad_rows(seqs, width, pad_value=0, side="middle")


def test_empty_rows_floats_and_rows_too_wide():
    values, mask = pad_rows([[], [-1.5]], 3, pad_value=0.0, side="left", dtype=np.float32)
    np.testing.assert_array_equal(values, [[0, 0, 0], [0, 0, -1.5]])
    assert values.dtype == np.float32 and not mask[0].any()
    with pytest.raises(ValueError, match="row 1: 4 entries do not fit in width 3"):
        pad_rows([[1], [1, 2, 3, 4]], 3, pad_value=0, side="right")
