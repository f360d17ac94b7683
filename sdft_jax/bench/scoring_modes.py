"""Where the two scoring modes disagree on the real eval sets, for generated predictions.

`python -m sdft_jax.bench scoring --data-dir ../shared/data/self-distillation [--json]`

No model runs: the predictions are written from each item's gold answer, as given and with one
deterministic perturbation each (an answer drafted inside the thinking, two answer lines, a length
cut, ...; `TOOLUSE_PREDICTIONS` / `SCIENCE_PREDICTIONS` say which). Every prediction set is scored with
`eval.scoring = "project"` and `"recipe"`; a row gives the items each mode counts correct and the
items where the two verdicts differ. `docs/scoring.md` quotes the table this prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from sdft_jax.data.readers import read_task
from sdft_jax.data.records import Record
from sdft_jax.eval.runner import score_completions

Prediction = tuple[str, bool]  # (completion, truncated)


def react_calls(golden_answer: Sequence[dict[str, str]], *, fenced: bool = False) -> str:
    """The gold calls written as a ReAct answer; `fenced`: each input pretty-printed in a ```json fence."""
    lines = []
    for call in golden_answer:
        args = call["Action_Input"]
        if fenced:
            args = "```json\n" + json.dumps(json.loads(args), indent=2) + "\n```"
        lines.append(f"Thought: I call {call['Action']}.\nAction: {call['Action']}\nAction Input: {args}")
    return "\n".join(lines)


def _wrong_letter(gold: str) -> str:
    return "ABCD"[("ABCD".index(gold) + 1) % 4]


TOOLUSE_PREDICTIONS: dict[str, Callable[[Record], Prediction]] = {
    "gold calls": lambda r: (react_calls(r.gold), False),
    "gold calls, drafted in thinking first": lambda r: (
        f"<think>\nDraft:\n{react_calls(r.gold)}\n</think>\n\n{react_calls(r.gold)}", False),
    "gold calls, cut by the token limit": lambda r: (react_calls(r.gold), True),
    "gold calls, inputs in json code fences": lambda r: (react_calls(r.gold, fenced=True), False),
}

SCIENCE_PREDICTIONS: dict[str, Callable[[Record], Prediction]] = {
    "<answer>gold</answer>": lambda r: (f"<reasoning>...</reasoning>\n<answer>{r.gold}</answer>", False),
    "The answer is gold.": lambda r: (f"Let me think.\nThe answer is {r.gold}.", False),
    "wrong <answer> in thinking, then The answer is gold": lambda r: (
        f"<think>\nFirst guess: <answer>{_wrong_letter(r.gold)}</answer>\n</think>\nThe answer is {r.gold}.", False),
    "two answer lines, wrong then gold": lambda r: (
        f"The answer is {_wrong_letter(r.gold)}.\nWait, let me check again. The answer is {r.gold}.", False),
    "two letter lines, wrong then gold": lambda r: (f"{_wrong_letter(r.gold)}\nOn second thought:\n{r.gold}", False),
    "The answer is Definitely gold": lambda r: (f"The answer is Definitely {r.gold}.", False),
    "The answer is gold, then cut in an opening <answer>": lambda r: (f"The answer is {r.gold}.\n<answer>", True),
    "The answer is gold, cut by the token limit": lambda r: (f"The answer is {r.gold}", True),
}

# (label, task read from disk, predictions)
EVAL_SETS = (
    ("tool use (97)", "tooluse", TOOLUSE_PREDICTIONS),
    ("tool use JSON (68)", "tooluse_json", TOOLUSE_PREDICTIONS),
    ("science (507)", "science", SCIENCE_PREDICTIONS),
)


def compare(records: Sequence[Record], predictions: Sequence[Prediction]) -> dict[str, int]:
    """Items, correct under each mode, and items where the two verdicts differ."""
    texts, cuts = [p[0] for p in predictions], [p[1] for p in predictions]
    project = score_completions(records, texts, cuts, scoring="project")
    recipe = score_completions(records, texts, cuts, scoring="recipe")
    return {"items": len(records),
            "project_correct": sum(r["correct"] for r in project),
            "recipe_correct": sum(r["correct"] for r in recipe),
            "disagree": sum(p["correct"] != r["correct"] for p, r in zip(project, recipe))}


def mixed(records: Sequence[Record], predictions: dict[str, Callable[[Record], Prediction]]) -> list[Prediction]:
    """Item i gets the (i mod N)-th of the N prediction kinds: one set with every kind in it."""
    makers = list(predictions.values())
    return [makers[i % len(makers)](r) for i, r in enumerate(records)]


def rows(data_dir: str) -> list[dict[str, object]]:
    """One row per (eval set, prediction set), then the set that mixes them."""
    out = []
    for label, task, predictions in EVAL_SETS:
        records = read_task(data_dir, task, "eval").records
        for name, make in predictions.items():
            out.append({"eval_set": label, "predictions": name, **compare(records, [make(r) for r in records])})
        out.append({"eval_set": label, "predictions": "mixed: item i gets kind i mod N",
                    **compare(records, mixed(records, predictions))})
    return out


def markdown(table: list[dict[str, object]]) -> str:
    lines = ["| eval set | predictions | items | project correct | recipe correct | disagree |",
             "|---|---|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['eval_set']} | {r['predictions']} | {r['items']} | {r['project_correct']} "
                     f"| {r['recipe_correct']} | {r['disagree']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench scoring", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder with tooluse_data/ and science_data/ (upstream layout)")
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of a Markdown table")
    args = p.parse_args(argv)
    table = rows(args.data_dir)
    print("\n".join(json.dumps(r) for r in table) if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
