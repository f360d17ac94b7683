"""`python -m sdft_jax.convert`: checkpoint format conversion.

    python -m sdft_jax.convert gguf IN.gguf OUT_DIR      # GGUF -> HF directory (fp32 + tokenizer)

A bad argument or GGUF file ends with one line (`sdft_jax/errors.py`; `--debug` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from sdft_jax import cli  # before the modules that load transformers: it quiets their import messages
from sdft_jax.checkpoints.gguf import gguf_to_hf

PROG = "python -m sdft_jax.convert"


def main(argv: list[str] | None = None) -> int:
    """The command (errors raised); `entry` is the command line's, with errors reported in one line."""
    parser = argparse.ArgumentParser(prog=PROG, description="Checkpoint conversion.", epilog=cli.DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gguf", help="GGUF file -> HF model directory (weights in fp32, tokenizer, config)")
    g.add_argument("input", help="the .gguf file")
    g.add_argument("output", help="the HF directory to create (must not exist)")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.error(f"{args.output} already exists; choose a new directory")
    if not os.path.isfile(args.input):
        parser.error(f"{args.input}: no such file")
    with cli.model_errors("input", args.input):
        out = gguf_to_hf(args.input, args.output)
    print(f"wrote {out}")
    return 0


def entry() -> int:
    return cli.run(main, prog=PROG)


if __name__ == "__main__":
    sys.exit(entry())
