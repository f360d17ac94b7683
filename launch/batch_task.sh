#!/usr/bin/env bash
# One task of a Cloud Batch job (one GPU VM): works out this VM's process id and the coordinator from
# Batch's hosts file, installs the code's Python environment, and runs the command via worker.sh.
#
#   launch/batch_task.sh [--dry-run] [--port PORT] [--venv DIR] [WORKER_OPTIONS...] -- COMMAND [ARGS...]
#
# Batch sets BATCH_TASK_INDEX, BATCH_TASK_COUNT and (with requireHostsFile) BATCH_HOSTS_FILE, one VM
# per line. Process 0 is the VM on the first line and hosts the coordinator on PORT (default 8482);
# every VM finds its own line, so the process ids follow the hosts file even if task indices do not.
# WORKER_OPTIONS (--stage, --log, --upload-log, ...) are passed on to launch/worker.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
code_dir="$(cd "$here/.." && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

port=8482
venv="/opt/sdft-venv"
worker_options=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --port) port="${2:?}"; shift ;;
    --port=*) port="${1#*=}" ;;
    --venv) venv="${2:?}"; shift ;;
    --venv=*) venv="${1#*=}" ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) break ;;
    *) worker_options+=("$1") ;;
  esac
  shift
done
[[ "${1:-}" == -- ]] || die "no command to run (give it after --)"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

count="${BATCH_TASK_COUNT:-1}"
index="${BATCH_TASK_INDEX:-0}"
[[ "$count" =~ ^[0-9]+$ && "$index" =~ ^[0-9]+$ ]] || die "BATCH_TASK_COUNT/BATCH_TASK_INDEX are not numbers ('$count', '$index')"

if ((count > 1)); then
  hosts_file="${BATCH_HOSTS_FILE:-}"
  [[ -n "$hosts_file" && -f "$hosts_file" ]] || die "a job of $count tasks needs requireHostsFile (BATCH_HOSTS_FILE is '${hosts_file}')"
  mapfile -t hosts < <(grep -v '^[[:space:]]*$' "$hosts_file" | awk '{print $1}')
  ((${#hosts[@]} == count)) || die "$hosts_file lists ${#hosts[@]} hosts for $count tasks; run one task per VM (taskCountPerNode 1)"
  # This VM's names and addresses, to find its line in the hosts file.
  read -r -a mine <<<"$(hostname) $(hostname -f 2>/dev/null || true) $(hostname -s 2>/dev/null || true) $(hostname -I 2>/dev/null || true)"
  process_id=""
  for i in "${!hosts[@]}"; do
    for name in "${mine[@]}"; do
      if [[ "${hosts[$i]}" == "$name" || "${hosts[$i]%%.*}" == "$name" ]]; then
        process_id="$i"
        break 2
      fi
    done
  done
  if [[ -z "$process_id" ]]; then
    note "warning: $(hostname) is not in $hosts_file; using BATCH_TASK_INDEX $index as its process id"
    process_id="$index"
  fi
  export SDFT_COORDINATOR="${hosts[0]}:$port"
  export SDFT_NUM_PROCESSES="$count"
  export SDFT_PROCESS_ID="$process_id"
  # The explicit values are the truth; JAX must not look for another kind of cluster.
  export SDFT_CLUSTER_DETECTION=never
fi

# Python 3.11 and the [cuda,gcs] extras in a venv; uv fetches the interpreter if the image lacks it.
uv_dir=/opt/uv
if [[ "$DRY_RUN" == 1 || ! -x "$uv_dir/uv" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR=$uv_dir UV_NO_MODIFY_PATH=1 sh"
  else
    curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR="$uv_dir" UV_NO_MODIFY_PATH=1 sh
  fi
fi
run "$uv_dir/uv" venv --allow-existing --python 3.11 "$venv"
run "$uv_dir/uv" pip install --python "$venv/bin/python" -e "${code_dir}[cuda,gcs]"

dry=()
[[ "$DRY_RUN" == 1 ]] && dry=(--dry-run)
cd "$code_dir"
exec bash "$here/worker.sh" ${dry[@]+"${dry[@]}"} --venv "$venv" ${worker_options[@]+"${worker_options[@]}"} "$@"
