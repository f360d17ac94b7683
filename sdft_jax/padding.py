"""Rows of token ids padded into fixed-width arrays, and widths rounded up to shape buckets.

Every batch a jitted program sees is padded to one of a few widths (buckets), so a run compiles a
handful of programs instead of one per length. Prompts are padded on the left, so that every row's
last token sits in the last column (decoding continues from there, and the completion after it starts
at the same column in every row); completions on the right, so that every row starts at column 0.
A mask marks each row's own entries: the pad id may be a real token id.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

import numpy as np

from sdft_jax.validation import check_choice

LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)  # the usual prompt and completion widths


def bucket_length(length: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket >= `length` (`buckets` in any order), or `length` itself when there are no
    buckets (None or empty); a ValueError if `length` exceeds the largest bucket."""
    if not buckets:
        return length
    ordered = sorted(buckets)
    i = bisect.bisect_left(ordered, length)
    if i == len(ordered):
        raise ValueError(f"length {length} exceeds the largest bucket {ordered[-1]}")
    return ordered[i]


def pad_rows(rows: Sequence[Sequence[int | float]], width: int, *, pad_value: int | float,
             side: Literal["left", "right"], dtype: type = np.int32) -> tuple[np.ndarray, np.ndarray]:
    """`rows` (of any lengths up to `width`, empty ones too) as a `[len(rows), width]` array of `dtype`
    filled with `pad_value`, each row at its `side` end, and the mask `[len(rows), width]` (bool, True on
    the rows' own entries). A ValueError names the first row longer than `width`."""
    check_choice("side", side, ("left", "right"))
    values = np.full((len(rows), width), pad_value, dtype)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        n = len(row)
        if n > width:
            raise ValueError(f"row {i}: {n} entries do not fit in width {width}")
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        values[i, cols] = row
        mask[i, cols] = True
    return values, mask
