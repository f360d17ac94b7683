"""`python -m sdft_jax.evaluate`: greedy evaluation on tool use, science, or an offline task.

    python -m sdft_jax.evaluate --model MODEL --task tooluse|science --data-dir DIR [--limit N] [--out DIR]
    python -m sdft_jax.evaluate --task tooluse|science --data-dir DIR --predictions FILE
    python -m sdft_jax.evaluate --model smollm2-135m --task capitals [--prompt teacher]

The first decodes with the sampler and writes per-item JSONL plus a summary; the second scores
existing completions (JSONL of {"index": i, "completion": "..."}, index into the eval split). Both
print one JSON summary line with `accuracy`, `correct`, `total`.
"""

from __future__ import annotations

import argparse
import json
import sys

from sdft_jax.data import offline_tasks
from sdft_jax.data.tasks import load_records
from sdft_jax.eval.runner import DEFAULT_MAX_NEW_TOKENS, score_completions, summarize


def _read_predictions(path: str, n: int) -> dict[int, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                index, text = row["index"], row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {line_no}: need {{\"index\": int, \"completion\": str}} ({e})") from e
            if not isinstance(index, int) or not 0 <= index < n or not isinstance(text, str):
                raise ValueError(f"{path}: line {line_no}: index must be an int in [0, {n}) and completion a string")
            if index in out:
                raise ValueError(f"{path}: line {line_no}: index {index} appears twice")
            out[index] = text
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdft_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=["tooluse", "science", *offline_tasks.TASK_NAMES])
    parser.add_argument("--data-dir", help="folder with tooluse_data/ and science_data/ (upstream layout)")
    parser.add_argument("--model", help="registered name or HF directory (decode mode)")
    parser.add_argument("--predictions", help="JSONL of {index, completion} to score (scoring mode)")
    parser.add_argument("--limit", type=int, help="evaluate the first N items only")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt", choices=["student", "teacher"], default="student",
                        help="teacher: show the demonstration in context (offline tasks / train splits)")
    parser.add_argument("--reference-compatible", action="store_true",
                        help="tool use: the published evaluation's regex parser")
    parser.add_argument("--out", help="directory for per-item JSONL and the summary (decode mode)")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.predictions is None):
        parser.error("give exactly one of --model (decode) or --predictions (score)")

    if args.task not in offline_tasks.TASK_NAMES and not args.data_dir:
        parser.error(f"--task {args.task} needs --data-dir (the folder holding {args.task}_data/)")
    records = load_records(args.task, "eval", data_dir=args.data_dir)
    if args.limit is not None:
        records = records[: args.limit]

    if args.predictions:
        preds = _read_predictions(args.predictions, len(records))
        scored = [r for r in records if r.index in preds]
        missing = len(records) - len(scored)
        rows = score_completions(scored, [preds[r.index] for r in scored], [False] * len(scored),
                                 reference_compatible=args.reference_compatible)
        summary = summarize(args.task, rows)
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

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_hf(path)
    sampler = Sampler(stop_ids=stop_token_ids(tokenizer), pad_id=pad_token_id(tokenizer))
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(args.task, 32)
    result = evaluate(model, tokenizer, sampler, records, max_new_tokens=max_new, batch_size=args.batch_size,
                      prompt=args.prompt, reference_compatible=args.reference_compatible)
    if args.out:
        result.write(args.out, f"{args.task}.{args.prompt}")
    print(json.dumps(result.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
