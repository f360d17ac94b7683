"""Bad predictions files (`eval.predictions.read_predictions`), read directly and through
`evaluate`: a DataError (exit status `errors.DATA`) whose one-line message names the file, the row and
its line, and what is wrong.
"""

from __future__ import annotations

import pytest

from sdft_jax import errors, evaluate
from sdft_jax.data.records import DataError
from sdft_jax.eval.predictions import read_predictions

from tests.bad_inputs.refusals import Case, check_command_refused, check_refused


# --- predictions files -------------------------------------------------------------------------------------

# (id, file contents, words besides the file: the row and what is wrong)
BAD_PREDICTIONS = [
    ("index_true", b'{"index": true, "completion": "x"}', "row 0 (line 1): index must be an int in [0, 4), got true"),
    ("index_false_on_line_2", b'{"index": 1, "completion": "x"}\n{"index": false, "completion": "y"}',
     "row 1 (line 2): index must be an int in [0, 4), got false"),
    ("index_a_float", b'{"index": 1.0, "completion": "x"}', "row 0 (line 1): index must be an int"),
    ("index_a_string", b'{"index": "1", "completion": "x"}', "row 0 (line 1): index must be an int"),
    ("index_out_of_range", b'{"index": 4, "completion": "x"}', "row 0 (line 1): index must be an int in [0, 4)"),
    ("index_negative", b'{"index": -1, "completion": "x"}', "row 0 (line 1): index must be an int in [0, 4)"),
    ("index_twice", b'{"index": 2, "completion": "x"}\n\n{"index": 2, "completion": "y"}',
     "row 2 (line 3): index 2 appears twice"),
    ("not_utf8", b'{"index": 0, "completion": "x"}\n{"index": 1, "completion": "caf\xe9"}',
     "row 1 (line 2): invalid UTF-8 at byte 31"),
    ("nested_past_the_parser", b'{"index": 0, "completion": ' + b"[" * 100_000, "row 0 (line 1): need"),
    ("not_json", b"index 0: x", "row 0 (line 1): need"),
    ("a_list", b"[0, \"x\"]", "row 0 (line 1): need"),
    ("no_completion", b'{"index": 0}', "row 0 (line 1): need"),
    ("completion_a_list", b'{"index": 0, "completion": ["x"]}', "row 0 (line 1): completion must be a string"),
    ("truncated_a_string", b'{"index": 0, "completion": "x", "truncated": "no"}',
     "row 0 (line 1): truncated must be true or false"),
]


@pytest.mark.parametrize("content, words", [c[1:] for c in BAD_PREDICTIONS], ids=[c[0] for c in BAD_PREDICTIONS])
def test_bad_predictions_file_is_refused(content, words, tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(content)
    check_refused(Case("", lambda p: ((lambda: read_predictions(path, 4)), [f"{path}: {words}"]), DataError),
                  tmp_path)


def test_missing_predictions_file(tmp_path):
    check_refused(Case("", lambda p: ((lambda: read_predictions(p / "none.jsonl", 4)),
                                      [str(p / "none.jsonl"), "cannot read"]), DataError), tmp_path)


def test_good_predictions_are_read(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b'{"index": 3, "completion": "caf\xc3\xa9"}\n\n{"index": 0, "completion": "", "truncated": true}\n')
    assert read_predictions(path, 4) == {3: ("caf\u00e9", False), 0: ("", True)}


# --- through the command -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, row", [
    (b'{"index": 0, "completion": "x"}\n{"index": true, "completion": "y"}\n', "row 1 (line 2)"),
    (b'{"index": 0, "completion": "\xff"}\n', "row 0 (line 1)"),
], ids=["predictions_index_true", "predictions_not_utf8"])
def test_evaluate_reports_one_line_and_the_data_status(content, row, tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(content)
    check_command_refused(evaluate.main, ["--task", "capitals", "--predictions", str(path)], errors.DATA,
                          "bad data", [str(path), row], capsys)
