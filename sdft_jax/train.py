"""`python -m sdft_jax.train --config=configs/NAME.py[:VARIANT] --config.KEY=VALUE ...`

Trains (or resumes) the run the config describes; see `configs/` for the files and every key.
"""

from __future__ import annotations

import json

from absl import app
from ml_collections import config_flags

from sdft_jax import cli
from sdft_jax.config import load_train_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file under configs/", lock_config=True)


def _main(argv: list[str]) -> int:
    cfg = cli.validated_config(argv, _CONFIG, "configs/NAME.py", load_train_config)
    if cfg is None:
        return 2
    from sdft_jax.trainer import train  # imported after validation: nothing compiles before the config is valid

    summary = train(cfg)
    print(json.dumps(summary))
    print(f"results: {cfg.run_dir} (summary.json, metrics.jsonl, eval/, export/)")
    return 0


def main() -> None:
    app.run(_main)


if __name__ == "__main__":
    main()
