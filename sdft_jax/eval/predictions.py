"""Predictions files: completions written elsewhere, scored by `python -m sdft_jax.evaluate --predictions`.

One JSON object per line, `{"index": i, "completion": "...", optional "truncated": bool}`, `index` into
the task's eval split. Every row is checked, and the first bad one is a `DataError` naming the file and
the row (`row 4 (line 5)`): not UTF-8, not JSON (too deeply nested included), a field missing or of the
wrong type, an index out of range or given twice. JSON's `true` is not an index (in Python a bool is an
int, and would score as item 1).
"""

from __future__ import annotations

import json
import os

from sdft_jax.data.records import (BAD_FILE, INVALID_JSON, INVALID_UTF8, INVALID_VALUE, MISSING_FIELD, WRONG_TYPE,
                                   DataError)


def read_predictions(path: str | os.PathLike, n: int) -> dict[int, tuple[str, bool]]:
    """{index: (completion, truncated)} of a predictions JSONL file, every row checked: anything else is
    a `DataError` naming the file and the row (its line). `n` is the number of items of the eval split."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(path, f"cannot read the predictions file ({e.strerror})", reason=BAD_FILE) from None
    out = {}
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"{i} (line {i + 1})"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(path, f"invalid UTF-8 at byte {e.start} of the line", row=where,
                            reason=INVALID_UTF8) from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, an over-long number, deep nesting
            detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise DataError(path, f'need {{"index": int, "completion": str}}, not JSON ({detail})', row=where,
                            reason=INVALID_JSON) from None
        if not isinstance(row, dict) or "index" not in row or "completion" not in row:
            raise DataError(path, 'need {"index": int, "completion": str}', row=where, reason=MISSING_FIELD)
        index, text, truncated = row["index"], row["completion"], row.get("truncated", False)
        # bool is an int in Python: `true` must not score as item 1.
        if type(index) is not int or not 0 <= index < n:
            raise DataError(path, f"index must be an int in [0, {n}), got {json.dumps(index)[:40]}", row=where,
                            reason=INVALID_VALUE)
        if not isinstance(text, str):
            raise DataError(path, f"completion must be a string, got {json.dumps(text)[:40]}", row=where,
                            reason=WRONG_TYPE)
        if not isinstance(truncated, bool):
            raise DataError(path, f"truncated must be true or false, got {json.dumps(truncated)[:40]}",
                            row=where, reason=WRONG_TYPE)
        if index in out:
            raise DataError(path, f"index {index} appears twice", row=where, reason=INVALID_VALUE)
        out[index] = (text, truncated)
    return out
