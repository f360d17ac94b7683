"""`python -m sdft_jax.generate`: sample one completion of a prompt and print it.

    python -m sdft_jax.generate --model smollm2-135m --prompt "What is the capital of France?" --chat \
        --temperature 0

prints the completion text (special tokens such as `<|im_end|>` left out). `--json` prints one object
instead: `prompt_ids`, `ids` (the completion, stop token included), `text`, `stop_reason`
(`stop_token` or `length`), and per completion token `model_logprobs` (plain model, temperature 1)
and `sampling_logprobs` (the distribution the token was drawn from; 0 when greedy).
A bad argument or model directory ends with one line (`sdft_jax/errors.py`; `--debug` for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sdft_jax import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROG = "python -m sdft_jax.generate"
_OPTIONS = {f"SamplingConfig.{name}": f"--{name.replace('_', '-')}"
            for name in ("temperature", "top_p", "top_k", "max_new_tokens")}


def main(argv: list[str] | None = None) -> int:
    """The command (errors raised); `entry` is the command line's, with errors reported in one line."""
    from sdft_jax.sampling.sampler import SamplingConfig

    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], epilog=cli.DEBUG_HELP)
    parser.add_argument("--model", required=True, help="registered name (e.g. smollm2-135m) or HF directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn (chat template)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object with ids and log-probs")
    args = parser.parse_args(argv)
    try:
        cfg = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             max_new_tokens=args.max_new_tokens)
    except ValueError as e:
        parser.error(cli.option_name(str(e), _OPTIONS))

    import jax

    from sdft_jax.checkpoints.hf import load_hf
    from sdft_jax.checkpoints.registry import resolve_model
    from sdft_jax.sampling.rollout_weights import RolloutWeightsConfig
    from sdft_jax.sampling.sampler import Sampler
    from sdft_jax.tokenization import encode_chat, load_tokenizer, pad_token_id, stop_token_ids

    with cli.model_errors("--model", args.model):
        path = resolve_model(args.model)
        tokenizer = load_tokenizer(path)
    if args.chat:
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    if not prompt_ids:
        parser.error("--prompt gives no tokens")
    with cli.model_errors("--model", args.model):
        model = load_hf(path)
    # One call: the scanned layers compile much faster than per-layer copies, which only pay off over many calls.
    sampler = Sampler(stop_ids=stop_token_ids(tokenizer), pad_id=pad_token_id(tokenizer),
                      weights=RolloutWeightsConfig(layers="stacked"))
    try:
        out = sampler.generate(model, [prompt_ids], cfg, jax.random.key(args.seed))
    except ValueError as e:  # an overlong prompt, named with its length and the limit
        parser.error(f"--prompt: {cli.option_name(str(e), {'max_new_tokens': '--max-new-tokens'})}")
    n = int(out.lengths[0])
    ids = out.tokens[0, :n].tolist()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({
            "prompt_ids": prompt_ids, "ids": ids, "text": text, "stop_reason": out.stop_reasons[0],
            "model_logprobs": out.model_logprobs[0, :n].tolist(),
            "sampling_logprobs": out.sampling_logprobs[0, :n].tolist(),
        }))
    else:
        print(text)
    return 0


def entry() -> int:
    return cli.run(main, prog=PROG)


if __name__ == "__main__":
    sys.exit(entry())
