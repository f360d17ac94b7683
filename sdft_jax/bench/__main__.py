"""`python -m sdft_jax.bench SUBCOMMAND [ARGS]`: dispatches to one benchmark module."""

from __future__ import annotations

import importlib
import sys

# Subcommand -> module exposing `main(argv) -> int | None`. Imported only when chosen, so one
# benchmark's imports (or breakage) never slow down or break another.
SUBCOMMANDS: dict[str, str] = {
    "loss": "sdft_jax.bench.loss",
    "generate": "sdft_jax.bench.generate",
    "step": "sdft_jax.bench.step",
    "moe": "sdft_jax.bench.moe",
    "compile": "sdft_jax.bench.compile",
    "deltanet": "sdft_jax.bench.deltanet",
    "scoring": "sdft_jax.bench.scoring_modes",
    "plan": "sdft_jax.bench.plan",
    "chaos": "sdft_jax.bench.chaos",
    "accel": "sdft_jax.bench.accel",
    "rollout": "sdft_jax.bench.rollout",
    "top_k": "sdft_jax.bench.top_k",
}


def main(argv: list[str] | None = None) -> int:
    """Runs the subcommand named by `argv[0]` with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: python -m sdft_jax.bench {{{','.join(sorted(SUBCOMMANDS))}}} [ARGS] (ARGS: SUBCOMMAND --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"unknown subcommand {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    try:
        from sdft_jax import cli  # a known error (a bad model directory, data, config) in one line; --debug: traceback
    except ImportError:  # a host without the trainer's config libraries (ml_collections, absl): e.g. `accel` on a
        sys.exit(main())  # bare GPU machine; errors then end in a traceback
    sys.exit(cli.run(main, prog="python -m sdft_jax.bench"))
