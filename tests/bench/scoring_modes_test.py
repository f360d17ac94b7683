"""`python -m sdft_jax.bench scoring`: the table docs/scoring.md quotes, on the real eval sets."""

import json

import pytest

from sdft_jax.bench import __main__ as bench
from sdft_jax.bench import scoring_modes
from tests.conftest import SHARED_DATA

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"reference data not found at {SHARED_DATA}")


@needs_data
def test_rows_on_the_real_eval_sets(capsys):
    assert bench.main(["scoring", "--data-dir", str(SHARED_DATA), "--json"]) == 0
    rows = {(r["eval_set"], r["predictions"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert len(rows) == 2 * (len(scoring_modes.TOOLUSE_PREDICTIONS) + 1) + len(scoring_modes.SCIENCE_PREDICTIONS) + 1

    def counts(eval_set, predictions):
        r = rows[(eval_set, predictions)]
        return r["items"], r["project_correct"], r["recipe_correct"], r["disagree"]

    # Gold calls written out: the recipe misses the nested argument and the `[Optional]` action.
    assert counts("tool use (97)", "gold calls") == (97, 97, 95, 2)
    assert counts("tool use JSON (68)", "gold calls") == (68, 68, 66, 2)
    assert counts("tool use (97)", "gold calls, cut by the token limit") == (97, 0, 95, 95)
    assert counts("tool use (97)", "gold calls, drafted in thinking first") == (97, 97, 0, 97)
    assert counts("science (507)", "The answer is gold.") == (507, 507, 507, 0)
    assert counts("science (507)", "two answer lines, wrong then gold") == (507, 507, 0, 507)
    # "Definitely" reads as D in the recipe: right exactly where the gold is D (130 items).
    assert counts("science (507)", "The answer is Definitely gold") == (507, 507, 130, 377)


def test_markdown_table():
    table = scoring_modes.markdown([{"eval_set": "s", "predictions": "p", "items": 3, "project_correct": 2,
                                     "recipe_correct": 1, "disagree": 1}])
    assert table.splitlines()[-1] == "| s | p | 3 | 2 | 1 | 1 |"
