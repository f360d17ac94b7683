"""`python -m sdft_jax.score`: per-token log-probs of a text under a model (fp32), for parity checks.

    python -m sdft_jax.score --model smollm2-135m --text "The capital of France is Paris" --json

prints `{"tokens": [ids...], "logprobs": [log p(token_i | tokens_<i) for i >= 1]}`. With `--chat` the
text is wrapped as one user turn in the model's chat template. A bad argument or model directory ends
with one line (`sdft_jax/errors.py`; `--debug` for the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sdft_jax import cli  # before the modules that load transformers: it quiets their import messages
from sdft_jax.checkpoints.hf import load_hf
from sdft_jax.checkpoints.registry import resolve_model
from sdft_jax.models.transformer import Transformer, positions_from_mask
from sdft_jax.tokenization import encode_chat, load_tokenizer

PROG = "python -m sdft_jax.score"


def token_logprobs(model: Transformer, tokens: list[int]) -> np.ndarray:
    """log p(tokens[i] | tokens[:i]) for i >= 1, in fp32."""
    x = jnp.asarray([tokens], jnp.int32)
    mask = jnp.ones_like(x, bool)
    hidden, _ = model(x, positions_from_mask(mask), mask)
    logp = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)
    return np.asarray(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[0, :, 0])


def main(argv: list[str] | None = None) -> int:
    """The command (errors raised); `entry` is the command line's, with errors reported in one line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], epilog=cli.DEBUG_HELP)
    parser.add_argument("--model", required=True, help="registered name (e.g. smollm2-135m) or HF directory")
    parser.add_argument("--text", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the text as one user turn (chat template)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    with cli.model_errors("--model", args.model):
        path = resolve_model(args.model)
        tokenizer = load_tokenizer(path)
    if args.chat:
        tokens = encode_chat(tokenizer, [{"role": "user", "content": args.text}], add_generation_prompt=False)
    else:
        tokens = tokenizer.encode(args.text, add_special_tokens=False)
    if len(tokens) < 2:
        parser.error(f"--text gives {len(tokens)} token(s); scoring needs at least 2")
    with cli.model_errors("--model", args.model):
        model = load_hf(path)
    if len(tokens) > model.cfg.max_position_embeddings:
        parser.error(f"--text gives {len(tokens)} tokens, over the model's {model.cfg.max_position_embeddings}")
    logprobs = token_logprobs(model, tokens)
    if args.json:
        print(json.dumps({"tokens": tokens, "logprobs": [float(v) for v in logprobs]}))
    else:
        for tok, lp in zip(tokens[1:], logprobs):
            print(f"{lp:10.4f}  {tokenizer.decode([tok])!r}")
        print(f"total {float(logprobs.sum()):.4f} over {len(logprobs)} tokens")
    return 0


def entry() -> int:
    return cli.run(main, prog=PROG)


if __name__ == "__main__":
    sys.exit(entry())
