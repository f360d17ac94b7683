"""`python -m sdft_jax.evaluate`: scoring existing predictions on the real eval sets, and decoding."""

import json

import pytest

from sdft_jax import evaluate
from sdft_jax.data.readers import read_task
from tests.conftest import SHARED_DATA

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"reference data not found at {SHARED_DATA}")


def _gold_as_text(record):
    return "\n".join(f"Action: {c['Action']}\nAction Input: {c['Action_Input']}" for c in record.gold)


@needs_data
def test_tooluse_predictions_scored(tmp_path, capsys):
    records = read_task(SHARED_DATA, "tooluse", "eval").records
    preds = tmp_path / "preds.jsonl"
    # The gold calls written out are right; item 1 gets a wrong action; item 2 is missing.
    rows = [{"index": r.index, "completion": _gold_as_text(r)} for r in records if r.index != 2]
    rows[1]["completion"] = "Action: notATool\nAction Input: {}"
    preds.write_text("\n".join(json.dumps(r) for r in rows))
    assert evaluate.main(["--task", "tooluse", "--data-dir", str(SHARED_DATA), "--predictions", str(preds)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["total"], out["correct"], out["missing_predictions"]) == (97, 95, 1)
    assert out["accuracy"] == pytest.approx(95 / 97)


@needs_data
def test_tooluse_predictions_scored_the_recipes_way(tmp_path, capsys):
    records = read_task(SHARED_DATA, "tooluse", "eval").records
    preds = tmp_path / "preds.jsonl"
    # Gold calls as completions; item 0's is cut by the token limit, item 1's drafted in thinking first.
    rows = [{"index": r.index, "completion": _gold_as_text(r)} for r in records]
    rows[0]["truncated"] = True
    rows[1]["completion"] = f"<think>{rows[1]['completion']}</think>{rows[1]['completion']}"
    preds.write_text("\n".join(json.dumps(r) for r in rows))
    summaries = {}
    for scoring in ("project", "recipe"):
        assert evaluate.main(["--task", "tooluse", "--data-dir", str(SHARED_DATA), "--predictions", str(preds),
                              "--scoring", scoring]) == 0
        summaries[scoring] = json.loads(capsys.readouterr().out)
    # project: the cut item 0 scores 0. recipe: item 1 (calls read twice), 26 (nested argument) and
    # 33 (`[Optional]` action name) score 0; item 0 counts.
    assert {k: (s["correct"], s["total"], s["scoring"]) for k, s in summaries.items()} == {
        "project": (96, 97, "project"), "recipe": (94, 97, "recipe")}
    assert summaries["recipe"]["accuracy"] == pytest.approx(94 / 97)


@needs_data
def test_the_older_tool_use_json_set(tmp_path, capsys):
    records = read_task(SHARED_DATA, "tooluse_json", "eval").records
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(json.dumps({"index": r.index, "completion": _gold_as_text(r)}) for r in records))
    for scoring, correct in (("project", 68), ("recipe", 66)):
        assert evaluate.main(["--task", "tooluse_json", "--data-dir", str(SHARED_DATA), "--predictions", str(preds),
                              "--scoring", scoring]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["task"], out["correct"], out["total"]) == ("tooluse_json", correct, 68)


def test_scoring_must_be_a_known_mode(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--task", "capitals", "--predictions", "x.jsonl", "--scoring", "paper"])
    assert "argument --scoring: invalid choice: 'paper'" in capsys.readouterr().err


@needs_data
def test_science_predictions_scored(tmp_path, capsys):
    records = read_task(SHARED_DATA, "science", "eval").records
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(json.dumps({"index": r.index, "completion": f"The answer is {r.gold}."})
                               for r in records[:10]))
    evaluate.main(["--task", "science", "--data-dir", str(SHARED_DATA), "--predictions", str(preds), "--limit", "10"])
    out = json.loads(capsys.readouterr().out)
    assert (out["correct"], out["total"], out["accuracy"]) == (10, 10, 1.0)


@pytest.mark.parametrize("line, message", [
    ("not json", r"row 0 \(line 1\): need"),
    ('{"index": 999, "completion": "x"}', r"row 0 \(line 1\): index must be an int in \[0, 64\)"),
    ('{"index": 0, "completion": "x"}\n{"index": 0, "completion": "y"}', r"row 1 \(line 2\): index 0 appears twice"),
    ('{"index": 0, "completion": "x", "truncated": "yes"}', r"row 0 \(line 1\): truncated must be true or false"),
    ('[1, 2]', r"row 0 \(line 1\): need"),
])
def test_bad_prediction_files_fail_clearly(tmp_path, line, message):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(line)
    with pytest.raises(ValueError, match=message):
        evaluate.main(["--task", "capitals", "--predictions", str(preds)])


def test_upstream_task_needs_a_data_dir(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--task", "science", "--predictions", "x.jsonl"])
    assert "--task science needs --data-dir" in capsys.readouterr().err


def test_decoding_writes_items_and_summary(tiny_model_dir, tmp_path, capsys):
    path = tiny_model_dir("llama")
    assert evaluate.main(["--model", path, "--task", "capitals", "--limit", "3", "--max-new-tokens", "4",
                          "--out", str(tmp_path), "--scoring", "recipe"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == 3 and summary["prompt"] == "student" and summary["scoring"] == "recipe"
    items = [json.loads(line) for line in (tmp_path / "capitals.student.jsonl").read_text().splitlines()]
    assert [i["index"] for i in items] == [0, 1, 2]
    assert all({"completion", "correct", "prediction", "expected", "reason"} <= set(i) for i in items)
    assert json.loads((tmp_path / "capitals.student.summary.json").read_text()) == summary


def _logits(model):
    import jax.numpy as jnp
    import numpy as np

    from sdft_jax.models.transformer import positions_from_mask

    tokens = jnp.asarray([[5, 17, 3, 40, 9, 22, 31, 8]])
    mask = jnp.ones(tokens.shape, bool)
    return np.asarray(model.logits(model.forward(tokens, positions_from_mask(mask), mask).hidden))


def test_a_runs_teacher_from_its_checkpoint_export_or_base_with_its_prompts(tiny_model_dir, tmp_path, capsys):
    """`--run` of a LoRA run: the adapters of its last checkpoint on the base (= its merged export), or the base
    model, with the run's own teacher template; completions equal hand-rendered prompts decoded by hand."""
    import numpy as np

    from sdft_jax import trainer
    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.config import load_train_config
    from sdft_jax.testing.configs import tiny_config
    from sdft_jax.tokenization import load_tokenizer
    from tests.continual.teacher_eval_test import TEMPLATE, hand_completions

    model_dir = tiny_model_dir("llama")
    run_dir = tmp_path / "run"
    cfg = load_train_config(tiny_config(model_dir, run_dir, **{
        "model.lora.rank": 4, "optim.learning_rate": 5e-2, "train.steps": 2, "prompts.teacher_template": TEMPLATE}))
    trainer.train(cfg)
    completions, summaries = {}, {}
    for weights in ("checkpoint", "export", "base"):
        assert evaluate.main(["--run", str(run_dir), "--weights", weights, "--task", "elements", "--prompt", "teacher",
                              "--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path / weights)]) == 0
        summaries[weights] = json.loads(capsys.readouterr().out)
        rows = (tmp_path / weights / "elements.teacher.jsonl").read_text().splitlines()
        completions[weights] = [json.loads(r)["completion"] for r in rows]
    assert {w: (s["prompt"], s["total"], s["step"]) for w, s in summaries.items()} == {
        "checkpoint": ("teacher", 3, 2), "export": ("teacher", 3, None), "base": ("teacher", 3, None)}
    records = trainer.load_records(cfg, "elements", "eval")[:3]
    export = load_hf(str(run_dir / "export"))
    tokenizer = load_tokenizer(model_dir)
    assert completions["checkpoint"] == completions["export"] == hand_completions(export, tokenizer, records, 4)
    assert completions["base"] == hand_completions(load_hf(model_dir), tokenizer, records, 4)
    # The checkpoint's student is the trained one: the merged export's function, not the base model's.
    loaded = trainer.load_run_model(str(run_dir), "checkpoint")
    np.testing.assert_allclose(_logits(loaded.model), _logits(export), rtol=0, atol=1e-5)
    assert np.abs(_logits(export) - _logits(load_hf(model_dir))).max() > 1e-3


def test_run_mode_errors(tmp_path, capsys):
    from sdft_jax.checkpointing import CheckpointError

    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(tmp_path), "--model", "x", "--task", "capitals"])
    assert "give exactly one of --model or --run (decode) or --predictions (score)" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not a run directory"):
        evaluate.main(["--run", str(tmp_path), "--task", "capitals"])
