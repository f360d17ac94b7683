"""`python -m sdft_jax.evaluate`: greedy evaluation on tool use, science, or an offline task.

    python -m sdft_jax.evaluate --model MODEL --task tooluse|science --data-dir DIR [--limit N] [--out DIR]
    python -m sdft_jax.evaluate --task tooluse|science --data-dir DIR --predictions FILE [--scoring recipe]
    python -m sdft_jax.evaluate --model smollm2-135m --task capitals [--prompt teacher]
    python -m sdft_jax.evaluate --run RUN_DIR [--weights checkpoint|export|base] --task elements --prompt teacher

The first decodes with the sampler and writes per-item JSONL plus a summary; the second scores
existing completions (JSONL of {"index": i, "completion": "...", optional "truncated": bool}, index into
the eval split). `--run` evaluates a training run's model: its student at the latest checkpoint (LoRA
or full fine-tuning), its export, or the base model it started from, with the run's own prompt
template, data settings and dtypes (its `config.json`). `--prompt teacher` shows the demonstration in
context: the teacher's accuracy, whose gap to the student's is what SDFT learns from. All print one JSON
summary line with `accuracy`, `correct`, `total` and `scoring`.
`--scoring project` (default) uses the project's scorers, `--scoring recipe` the hosted recipe's,
quirks included (docs/scoring.md). `--task tooluse_json` is the older 68-item tool-use test set.
A bad argument, data or model directory ends with one line (`sdft_jax/errors.py`; `--debug` for the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from sdft_jax import cli
from sdft_jax.data import offline_tasks
from sdft_jax.data.tasks import load_records
from sdft_jax.eval.predictions import read_predictions
from sdft_jax.eval.runner import DEFAULT_MAX_NEW_TOKENS, SCORING_MODES, score_completions, summarize

UPSTREAM_TASKS = ("tooluse", "science", "tooluse_json")
PROG = "python -m sdft_jax.evaluate"
RUN_WEIGHTS = ("checkpoint", "export", "base")  # trainer.RunWeights; the trainer loads only for --run


def main(argv: list[str] | None = None) -> int:
    """The command (errors raised); `entry` is the command line's, with errors reported in one line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], epilog=cli.DEBUG_HELP)
    parser.add_argument("--task", required=True, choices=[*UPSTREAM_TASKS, *offline_tasks.TASK_NAMES])
    parser.add_argument("--data-dir", help="folder with tooluse_data/ and science_data/ (upstream layout)")
    parser.add_argument("--model", help="registered name or HF directory (decode mode)")
    parser.add_argument("--run", help="a training run's directory (decode mode, the run's prompts and data settings)")
    parser.add_argument("--weights", choices=RUN_WEIGHTS, default="checkpoint",
                        help="with --run: the student at its latest checkpoint, its export, or its base model")
    parser.add_argument("--predictions", help="JSONL of {index, completion[, truncated]} to score (scoring mode)")
    parser.add_argument("--limit", type=cli.int_at_least(1),
                        help="evaluate the first N items only (with --run: default the run's eval.limit)")
    parser.add_argument("--max-new-tokens", type=cli.int_at_least(1))
    parser.add_argument("--batch-size", type=cli.int_at_least(1), default=16)
    parser.add_argument("--prompt", choices=["student", "teacher"], default="student",
                        help="teacher: show the demonstration in context (offline tasks / train splits)")
    parser.add_argument("--scoring", choices=SCORING_MODES,
                        help="project (default; with --run: the run's eval.scoring): the project's scorers; "
                             "recipe: the hosted recipe's, quirks included")
    parser.add_argument("--out", help="directory for per-item JSONL and the summary (decode mode)")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.model, args.run, args.predictions)) != 1:
        parser.error("give exactly one of --model or --run (decode) or --predictions (score)")
    if args.run is not None:
        return _evaluate_run(args)
    args.scoring = args.scoring or "project"

    if args.task not in offline_tasks.TASK_NAMES and not args.data_dir:
        folder = args.task.removesuffix("_json")
        parser.error(f"--task {args.task} needs --data-dir (the folder holding {folder}_data/)")
    records = load_records(args.task, "eval", data_dir=args.data_dir)
    if args.limit is not None:
        records = records[: args.limit]

    if args.predictions:
        preds = read_predictions(args.predictions, len(records))
        scored = [r for r in records if r.index in preds]
        missing = len(records) - len(scored)
        rows = score_completions(scored, [preds[r.index][0] for r in scored], [preds[r.index][1] for r in scored],
                                 scoring=args.scoring)
        summary = summarize(args.task, rows, scoring=args.scoring)
        summary["missing_predictions"] = missing
        summary["total"] = len(records)  # a missing prediction counts as wrong
        summary["accuracy"] = summary["correct"] / len(records) if records else 0.0
        print(json.dumps(summary))
        return 0

    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.checkpoints.registry import resolve_model
    from sdft_jax.eval.runner import evaluate
    from sdft_jax.sampling.sampler import Sampler
    from sdft_jax.tokenization import load_tokenizer, pad_token_id, stop_token_ids

    with cli.model_errors("--model", args.model):
        path = resolve_model(args.model)
        tokenizer = load_tokenizer(path)
        model = load_hf(path)
    sampler = Sampler(stop_ids=stop_token_ids(tokenizer), pad_id=pad_token_id(tokenizer))
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(args.task.removesuffix("_json"), 32)
    result = evaluate(model, tokenizer, sampler, records, max_new_tokens=max_new, batch_size=args.batch_size,
                      prompt=args.prompt, scoring=args.scoring)
    if args.out:
        result.write(args.out, f"{args.task}.{args.prompt}")
    print(json.dumps(result.summary))
    return 0


def _evaluate_run(args: argparse.Namespace) -> int:
    """`--run`: the run's model (`--weights`) with the run's prompts, data settings, scoring and dtypes."""
    from sdft_jax.eval.runner import evaluate
    from sdft_jax.sampling.sampler import Sampler
    from sdft_jax.tokenization import load_tokenizer, pad_token_id, stop_token_ids
    from sdft_jax.trainer import load_records as run_records
    from sdft_jax.trainer import load_run_model

    loaded = load_run_model(args.run, args.weights)
    cfg = loaded.config
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=args.data_dir))
    records = run_records(cfg, args.task, "eval")
    limit = args.limit if args.limit is not None else cfg.eval.limit  # default: as the run's evaluations (0 = all)
    records = records[:limit] if limit else records
    tokenizer = load_tokenizer(loaded.path)
    sampler = Sampler(stop_ids=stop_token_ids(tokenizer), pad_id=pad_token_id(tokenizer), mesh=loaded.mesh,
                      weights=cfg.rollout.weights())
    max_new = args.max_new_tokens or cfg.eval.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(
        args.task.removesuffix("_json"), 32)
    result = evaluate(loaded.model, tokenizer, sampler, records, max_new_tokens=max_new, batch_size=args.batch_size,
                      prompt_config=cfg.prompts, prompt=args.prompt, scoring=args.scoring or cfg.eval.scoring)
    result.summary.update(run=args.run, weights=args.weights, step=loaded.step)
    if args.out:
        result.write(args.out, f"{args.task}.{args.prompt}")
    print(json.dumps(result.summary))
    return 0


def entry() -> int:
    return cli.run(main, prog=PROG)


if __name__ == "__main__":
    sys.exit(entry())
