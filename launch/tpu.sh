#!/usr/bin/env bash
# Cloud TPU VMs (one host or a multi-host pod slice) for sdft-jax: create, install, run, watch, delete.
#
#   launch/tpu.sh [OPTIONS] COMMAND [-- CONFIG_OVERRIDES...]
#
# Commands:
#   plan       before create / train, on this machine: does CONFIG fit the slice --type? Compiles its train
#              step and rollout with the TPU compiler for the slice's chips (python -m sdft_jax.bench plan
#              --compiler tpu; needs this checkout installed here with the tpu or test extra, a few
#              minutes, no TPU); exit status 3 when it does not fit. Overrides after -- apply as in train
#   create     create the TPU VM (with --queued: a queued resource, waiting until it is ACTIVE)
#   install    ship this checkout's git HEAD via gs:// and install it (Python 3.11 venv, [tpu,gcs] extras)
#              on every worker
#   train      start `python -m sdft_jax.train --config=CONFIG` on every worker (--worker=all),
#              detached, then stream worker 0's log (Ctrl-C stops the streaming, not the run)
#   continual  the same for `python -m sdft_jax.continual` (default config configs/continual.py)
#   logs       stream the log of one worker (--worker N, default 0)
#   stop       stop the run on every worker
#   status     describe the TPU VM / queued resource
#   delete     delete the TPU VM / queued resource
#
# Options (each also read from the environment variable in brackets):
#   --project ID [PROJECT]       --zone ZONE [ZONE]         --name NAME [TPU_NAME]
#   --type TYPE [TPU_TYPE]       accelerator type, e.g. v5p-16, v6e-32, v5litepod-16, v4-32
#   --runtime VERSION [RUNTIME_VERSION]   TPU software version (default from the TPU generation)
#   --bucket gs://B [BUCKET]     code, checkpoints (runs/RUN), logs and the JAX compilation cache
#   --config PATH [CONFIG]       config file inside the repo (default configs/qwen3_8b_tpu.py)
#   --run-name NAME [RUN_NAME]   run directory gs://B/runs/NAME; reuse a name to resume that run
#   --model-src URL [MODEL_SRC]  gs:// HF model directory staged to every worker's disk
#   --data-src URL [DATA_SRC]    gs:// data directory staged to every worker's disk
#   --queued                     use a queued resource (needed for large slices and most quota)
#   --spot                       spot capacity (cheaper, preemptible; resume with the same --run-name)
#   --worker N                   the worker whose log `logs` streams
#   --no-follow                  `train`/`continual` return after starting the run
#   --dry-run                    print every command instead of running it
# Everything after -- is passed on to the trainer, e.g. -- --config.train.steps=200 --config.mesh.fsdp=16
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
  sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

PROJECT="${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
ZONE="${ZONE:-}"
TPU_NAME="${TPU_NAME:-}"
TPU_TYPE="${TPU_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
BUCKET="${BUCKET:-}"
CONFIG="${CONFIG:-}"
RUN_NAME="${RUN_NAME:-}"
MODEL_SRC="${MODEL_SRC:-}"
DATA_SRC="${DATA_SRC:-}"
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
WORKER="${WORKER:-0}"
FOLLOW=1
# How long `create --queued` waits for capacity, and how long processes wait for each other to join.
QUEUE_WAIT_S="${QUEUE_WAIT_S:-3600}"
INIT_TIMEOUT_S="${INIT_TIMEOUT_S:-900}"

command=""
overrides=()
while (($#)); do
  case "$1" in
    --project) PROJECT="${2:?}"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone) ZONE="${2:?}"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --name) TPU_NAME="${2:?}"; shift ;;
    --name=*) TPU_NAME="${1#*=}" ;;
    --type) TPU_TYPE="${2:?}"; shift ;;
    --type=*) TPU_TYPE="${1#*=}" ;;
    --runtime) RUNTIME_VERSION="${2:?}"; shift ;;
    --runtime=*) RUNTIME_VERSION="${1#*=}" ;;
    --bucket) BUCKET="${2:?}"; shift ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --config) CONFIG="${2:?}"; shift ;;
    --config=*) CONFIG="${1#*=}" ;;
    --run-name) RUN_NAME="${2:?}"; shift ;;
    --run-name=*) RUN_NAME="${1#*=}" ;;
    --model-src) MODEL_SRC="${2:?}"; shift ;;
    --model-src=*) MODEL_SRC="${1#*=}" ;;
    --data-src) DATA_SRC="${2:?}"; shift ;;
    --data-src=*) DATA_SRC="${1#*=}" ;;
    --worker) WORKER="${2:?}"; shift ;;
    --worker=*) WORKER="${1#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --no-follow) FOLLOW=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    -*) die "unknown option '$1'; see --help" ;;
    *) [[ -z "$command" ]] || die "one command at a time (got '$command' and '$1')"; command="$1" ;;
  esac
  shift
done
[[ -n "$command" ]] || { usage >&2; exit 2; }

# Values that end up inside the command line run on the workers: keep them to safe characters.
check_word() {
  local flag="$1" value="$2" pattern="$3"
  [[ -z "$value" || "$value" =~ $pattern ]] || die "$flag '$value' has characters that are not allowed"
}
check_word --name "$TPU_NAME" '^[a-z]([-a-z0-9]*[a-z0-9])?$'
check_word --run-name "$RUN_NAME" '^[A-Za-z0-9._-]+$'
check_word --config "$CONFIG" '^[A-Za-z0-9._/:-]+$'
check_word --model-src "$MODEL_SRC" '^gs://[A-Za-z0-9._/-]+$'
check_word --data-src "$DATA_SRC" '^gs://[A-Za-z0-9._/-]+$'
check_word --worker "$WORKER" '^[0-9]+$'

location=(--project="$PROJECT" --zone="$ZONE")

default_runtime() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    *) die "unknown TPU type '$1' (e.g. v5p-16, v6e-32, v5litepod-16, v4-32); give --runtime explicitly" ;;
  esac
}

# Runs a shell command line on TPU workers (all by default) over gcloud's ssh.
on_workers() {
  local worker="$1" remote="$2"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" --worker="$worker" --command="$remote"
}

# The plan of CONFIG on the chips of the slice TPU_TYPE (an accelerator type names v5p's TensorCores,
# two per chip, and v6e's chips), compiled here with the TPU compiler.
cmd_plan() {
  require TPU_TYPE:--type
  local config="${CONFIG:-configs/qwen3_8b_tpu.py}" chip devices
  [[ -f "$repo/${config%%:*}" ]] || die "config ${config%%:*} not found in $repo"
  case "$TPU_TYPE" in
    v5p-[0-9]*) chip=v5p; devices=$(( ${TPU_TYPE#v5p-} / 2 )) ;;
    v6e-[0-9]*) chip=v6e; devices="${TPU_TYPE#v6e-}" ;;
    *) die "plan knows v5p and v6e slices, not '$TPU_TYPE'; for another chip run python -m sdft_jax.bench plan --hbm-gib GIB" ;;
  esac
  [[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--type '$TPU_TYPE': not a slice size"
  local sets=() override
  for override in ${overrides[@]+"${overrides[@]}"}; do
    case "$override" in
      --config.*=*) sets+=(--set "${override#--config.}") ;;
      *) die "plan takes the trainer's overrides --config.KEY=VALUE, not '$override'" ;;
    esac
  done
  run "${PYTHON:-python3}" -m sdft_jax.bench plan --config="$repo/$config" --devices "$devices" --chip "$chip" \
    --compiler tpu ${sets[@]+"${sets[@]}"}
}

cmd_create() {
  require PROJECT:--project ZONE:--zone TPU_NAME:--name TPU_TYPE:--type
  local runtime="$RUNTIME_VERSION"
  # A separate assignment, so a failure of default_runtime stops the script (set -e).
  [[ -n "$runtime" ]] || runtime="$(default_runtime "$TPU_TYPE")"
  local capacity=()
  [[ "$SPOT" == 1 ]] && capacity=(--spot)
  if [[ "$QUEUED" != 1 ]]; then
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${location[@]}" --accelerator-type="$TPU_TYPE" \
      --version="$runtime" ${capacity[@]+"${capacity[@]}"}
    return
  fi
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${location[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$TPU_TYPE" --runtime-version="$runtime" ${capacity[@]+"${capacity[@]}"}
  local describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${location[@]}" --format='value(state.state)')
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"
    note "(then poll that every 30 s until ACTIVE, for at most ${QUEUE_WAIT_S} s)"
    return
  fi
  local deadline=$((SECONDS + QUEUE_WAIT_S)) state=""
  while ((SECONDS < deadline)); do
    state="$("${describe[@]}")"
    case "$state" in
      ACTIVE) note "queued resource $TPU_NAME is ACTIVE"; return ;;
      FAILED|SUSPENDED) die "queued resource $TPU_NAME is $state; see: ${describe[*]:0:6}" ;;
    esac
    note "queued resource $TPU_NAME: ${state:-unknown}; waiting"
    sleep 30
  done
  die "queued resource $TPU_NAME not ACTIVE after ${QUEUE_WAIT_S} s (last state ${state:-unknown}); it stays queued: delete it or wait with 'status'"
}

cmd_install() {
  require PROJECT:--project ZONE:--zone TPU_NAME:--name BUCKET:--bucket
  local bucket rev
  bucket="$(normalize_bucket "$BUCKET")"
  rev="$(code_revision "$repo")"
  stage_code "$repo" "$rev" "$bucket"
  # Replaces ~/sdft-jax with exactly that commit on every worker, and installs it with Python 3.11
  # (TPU VM images ship an older Python) into ~/sdft-venv.
  local remote
  remote="set -euo pipefail; rm -rf \"\$HOME/sdft-jax.new\"; mkdir -p \"\$HOME/sdft-jax.new\";"
  remote+=" gcloud storage cp $bucket/code/sdft-jax-$rev.tar.gz - | tar -xzf - -C \"\$HOME/sdft-jax.new\";"
  remote+=" echo $rev > \"\$HOME/sdft-jax.new/REVISION\"; rm -rf \"\$HOME/sdft-jax\"; mv \"\$HOME/sdft-jax.new\" \"\$HOME/sdft-jax\";"
  remote+=" python3 -m pip install --user --quiet --upgrade uv;"
  remote+=" \"\$HOME/.local/bin/uv\" venv --allow-existing --python 3.11 \"\$HOME/sdft-venv\";"
  remote+=" \"\$HOME/.local/bin/uv\" pip install --python \"\$HOME/sdft-venv/bin/python\" -e \"\$HOME/sdft-jax[tpu,gcs]\""
  on_workers all "bash -c $(shell_quote "$remote")"
  note "installed revision $rev on every worker of $TPU_NAME"
}

cmd_run() {
  local module="$1" default_config="$2"
  require PROJECT:--project ZONE:--zone TPU_NAME:--name BUCKET:--bucket
  local bucket rev config="${CONFIG:-$default_config}"
  bucket="$(normalize_bucket "$BUCKET")"
  rev="$(code_revision "$repo")"
  [[ -f "$repo/${config%%:*}" ]] || die "config ${config%%:*} not found in $repo"
  git -C "$repo" cat-file -e "HEAD:${config%%:*}" 2>/dev/null || note "warning: ${config%%:*} is not committed; the workers will not have it"
  RUN_NAME="${RUN_NAME:-$module-$(date -u +%Y%m%d-%H%M%S)}"
  local run_dir="$bucket/runs/$RUN_NAME"
  local log="\"\$HOME/sdft-logs/$RUN_NAME.log\""

  # Every worker runs the same command. JAX finds the other workers itself on a TPU VM
  # (SDFT_CLUSTER_DETECTION=always); a worker that never joins fails the others after
  # SDFT_INIT_TIMEOUT_S instead of leaving them hanging.
  local env_words=(
    SDFT_CLUSTER_DETECTION=always
    SDFT_INIT_TIMEOUT_S="$INIT_TIMEOUT_S"
    HF_HUB_OFFLINE=1
    JAX_COMPILATION_CACHE_DIR="$bucket/jax-cache"
  )
  # shellcheck disable=SC2016  # "$HOME" is for the worker's shell to expand, not ours
  local worker_args=(--venv '"$HOME/sdft-venv"' --expect-revision "$rev" --log "$log" --upload-log "$run_dir/logs")
  local args=(python -m "sdft_jax.$module" --config="$config" "--config.$RUN_DIR_KEY=$run_dir")
  if [[ -n "$MODEL_SRC" ]]; then
    worker_args+=(--stage "$MODEL_SRC=\"\$HOME/sdft-stage/model\"")
    args+=("--config.$MODEL_KEY=\"\$HOME/sdft-stage/model\"")
  fi
  if [[ -n "$DATA_SRC" ]]; then
    worker_args+=(--stage "$DATA_SRC=\"\$HOME/sdft-stage/data\"")
    args+=("--config.$DATA_DIR_KEY=\"\$HOME/sdft-stage/data\"")
  fi
  local quoted_overrides=""
  ((${#overrides[@]})) && quoted_overrides=" $(shell_join "${overrides[@]}")"
  # Words holding "$HOME" stay unquoted here so the worker's shell expands them.
  local remote="mkdir -p \"\$HOME/sdft-logs\" && cd \"\$HOME/sdft-jax\" && "
  remote+="{ setsid nohup env ${env_words[*]} bash launch/worker.sh ${worker_args[*]} -- ${args[*]}${quoted_overrides}"
  remote+=" >/dev/null 2>&1 </dev/null & echo \$! > \"\$HOME/sdft-logs/$RUN_NAME.pid\"; }"
  on_workers all "$remote"
  note "run $RUN_NAME started on every worker of $TPU_NAME; checkpoints and logs under $run_dir"
  note "follow it: $0 logs --name $TPU_NAME --run-name $RUN_NAME; stop it: $0 stop --name $TPU_NAME --run-name $RUN_NAME"
  if [[ "$FOLLOW" == 1 ]]; then
    cmd_logs
  fi
}

cmd_logs() {
  require PROJECT:--project ZONE:--zone TPU_NAME:--name RUN_NAME:--run-name
  on_workers "$WORKER" "tail -n +1 -F \"\$HOME/sdft-logs/$RUN_NAME.log\""
}

cmd_stop() {
  require PROJECT:--project ZONE:--zone TPU_NAME:--name RUN_NAME:--run-name
  # The run was started with setsid, so its pid is also its process group: stop the whole group.
  on_workers all "pid=\$(cat \"\$HOME/sdft-logs/$RUN_NAME.pid\" 2>/dev/null) && kill -TERM -- -\"\$pid\" || true"
}

cmd_status() {
  require PROJECT:--project ZONE:--zone TPU_NAME:--name
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$TPU_NAME" "${location[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${location[@]}"
  fi
}

cmd_delete() {
  require PROJECT:--project ZONE:--zone TPU_NAME:--name
  if [[ "$QUEUED" == 1 ]]; then
    # --force also deletes the TPU VM the queued resource holds.
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${location[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${location[@]}" --quiet
  fi
}

case "$command" in
  plan) cmd_plan ;;
  create) cmd_create ;;
  install) cmd_install ;;
  train) cmd_run train configs/qwen3_8b_tpu.py ;;
  continual) cmd_run continual configs/continual.py ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  delete) cmd_delete ;;
  *) die "unknown command '$command'; see --help" ;;
esac
