"""`python -m sdft_jax.train --config=configs/NAME.py[:VARIANT] --config.KEY=VALUE ... [--debug]`

Trains (or resumes) the run the config describes; see `configs/` for the files and every key. An
invalid config, bad data, an unusable model directory, checkpoints that do not restore and a diverged
run each end with one line and their own exit status (`sdft_jax/errors.py`); `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import json
import sys

from ml_collections import config_flags

from sdft_jax import cli
from sdft_jax.config import load_train_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file under configs/", lock_config=True)
PROG = "python -m sdft_jax.train"


def _main(argv: list[str]) -> int:
    cfg = cli.validated_config(argv, _CONFIG, "configs/NAME.py", load_train_config)
    from sdft_jax.trainer import train  # imported after validation: nothing compiles before the config is valid

    summary = train(cfg)
    print(json.dumps(summary))
    print(f"results: {cfg.run_dir} (summary.json, metrics.jsonl, eval/, export/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run_absl(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
