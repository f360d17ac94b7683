"""`python -m sdft_jax.continual --config=configs/continual.py[:VARIANT] --config.methods=sft,sdft_topk ... [--debug]`

Evaluates the base model, runs stage 1 (task A) and stage 2 (task B, continuing stage 1) for every
method x learning rate x seed, and writes results.csv, results.md, results.png and the frontier's
files (frontier.png, frontier.csv, frontier_seeds.csv) into `out_dir`. Before each stage it prints one
line: the stage, its method, LR and seed, and the time left estimated from the stages trained so far.
Started again, finished stages are skipped and an interrupted one resumes from its checkpoint. Every
stage's config is checked against the base model (its config.json) and the devices before the base
model loads. Errors end as in `python -m sdft_jax.train` (one line, the status of their class).
"""

from __future__ import annotations

import sys

from ml_collections import config_flags

from sdft_jax import cli
from sdft_jax.continual.plan import make_plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to configs/continual.py", lock_config=True)
PROG = "python -m sdft_jax.continual"


def _main(argv: list[str]) -> int:
    plan = cli.validated_config(argv, _CONFIG, "configs/continual.py", make_plan)
    # imported after validation: nothing compiles before the config is valid
    from sdft_jax.continual.runner import run_plan
    from sdft_jax.trainer import check_plan_fits

    check_plan_fits(plan.base_config, [run.config for run in plan.runs])
    print(f"{len(plan.runs)} stage runs; results in {plan.out_dir}", flush=True)
    report = run_plan(plan, compilation_cache=bool(_CONFIG.value.compilation_cache))
    print(f"results: {report} (results.csv, results.png, frontier.png, frontier.csv beside it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_absl(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
