"""`python -m sdft_jax.continual --config=configs/continual.py[:VARIANT] --config.methods=sft,sdft_topk ...`

Evaluates the base model, runs stage 1 (task A) and stage 2 (task B, from stage 1's export) for every
method x learning rate x seed, and writes results.csv, results.md and results.png into `out_dir`.
Started again, finished stages are skipped and an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from sdft_jax import cli
from sdft_jax.continual.plan import make_plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to configs/continual.py", lock_config=True)


def _main(argv: list[str]) -> int:
    plan = cli.validated_config(argv, _CONFIG, "configs/continual.py", make_plan)
    if plan is None:
        return 2
    from sdft_jax.continual.runner import run_plan  # imported after validation: nothing compiles before

    print(f"{len(plan.runs)} stage runs; results in {plan.out_dir}", flush=True)
    report = run_plan(plan, compilation_cache=bool(_CONFIG.value.compilation_cache))
    print(f"results: {report} (results.csv, results.png beside it)")
    return 0


def main() -> None:
    app.run(_main)


if __name__ == "__main__":
    main()
