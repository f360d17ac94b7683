#!/usr/bin/env bash
# The accelerator check: a Qwen3-1.7B-shaped model with random bf16 weights on one GPU (or TPU chip):
# the train step's MFU and where its time goes (its parts timed one by one), the loss's teacher top-K against
# jax.lax.top_k, the sampler's tokens/s, fused vs plain attention parity, as one JSON object (python -m sdft_jax.bench accel; its docstring says what each
# figure is). Under 8 minutes on an H100 / H200 (the check without the breakdown: 94 s on an H200).
#
#   launch/accel_check.sh [--out FILE] [--dry-run] [BENCH_OPTIONS...]
#
# --out FILE also writes the JSON to FILE (whole or not at all: a temporary file, then a rename).
# BENCH_OPTIONS go to the bench (e.g. --rollout-mode continuous, --skip rollout, --tiny). PYTHON names
# the interpreter (default python3); run from any directory. Record the figures in docs/benchmarks.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
code_dir="$(cd "$here/.." && pwd)"
python="${PYTHON:-python3}"
out=""
dry_run=0
bench_options=()
while (($#)); do
  case "$1" in
    --out) out="${2:?--out needs a file}"; shift ;;
    --out=*) out="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) bench_options+=("$1") ;;
  esac
  shift
done

# Let XLA take most of the GPU's memory (its default preallocates 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
command=("$python" -m sdft_jax.bench accel --json "${bench_options[@]}")
if ((dry_run)); then
  printf '%q ' "${command[@]}"
  printf '\n'
  exit 0
fi

cd "$code_dir"
if [[ -z "$out" ]]; then
  exec "${command[@]}"
fi
partial="$(dirname "$out")/.$(basename "$out").partial-$$"
trap 'rm -f "$partial"' EXIT
"${command[@]}" | tee "$partial"
mv "$partial" "$out"
