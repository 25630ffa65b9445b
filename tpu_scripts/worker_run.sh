#!/usr/bin/env bash
# Runs one command on this TPU worker, its output in a per-worker log file. launch.sh starts it on
# every worker at once (gcloud ... ssh --worker=all), from the repository copy; not run by hand.
set -euo pipefail
PROG=worker_run.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: bash tpu_scripts/worker_run.sh --log_dir=DIR --log_name=NAME [--detach] [--worker=W] [--dry_run] -- CMD...

Runs CMD on this worker with its output in DIR/NAME_worker<W>.log (DIR relative to $HOME unless
absolute). W is the worker number from the TPU VM's metadata (agent-worker-number, the number JAX
reads too), or $TPU_WORKER_ID, or --worker. Worker 0's output is also streamed to stdout (the ssh
session); every worker prints a last line "[t5x_cpt] NAME worker W: exit code N" and exits with
CMD's exit code.

  --detach   run in the background, immune to the ssh session ending (follow it with logs.sh)
EOF
}

worker_number() {
  local number
  if [[ -n $(flag worker) ]]; then
    printf '%s' "$(flag worker)"
    return
  fi
  if [[ -n ${TPU_WORKER_ID:-} ]]; then
    printf '%s' "$TPU_WORKER_ID"
    return
  fi
  number=$(curl -s -f -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null || true)
  if [[ $number =~ ^[0-9]+$ ]]; then
    printf '%s' "$number"
  else
    hostname
  fi
}

parse_flags "log_dir= log_name= worker= detach" "$@"
require_flags log_dir log_name
((${#EXTRA_ARGS[@]})) || die "no command given after --"
[[ $(flag log_name) =~ ^[A-Za-z0-9_.-]+$ ]] || die "--log_name=$(flag log_name): letters, digits, _ . - only"

log_dir=$(flag log_dir)
[[ $log_dir == /* ]] || log_dir=$HOME/$log_dir
worker=$(worker_number)
log_file=$log_dir/$(flag log_name)_worker$worker.log

if ((DRY_RUN)); then
  plan_comment "worker $worker logs to $log_file"
  run "${EXTRA_ARGS[@]}"
  exit 0
fi

if [[ $(flag detach) == 1 ]]; then
  mkdir -p "$log_dir"
  nohup setsid bash "${BASH_SOURCE[0]}" --log_dir="$log_dir" --log_name="$(flag log_name)" \
    --worker="$worker" -- "${EXTRA_ARGS[@]}" >/dev/null 2>&1 </dev/null &
  echo "[t5x_cpt] $(flag log_name) worker $worker: detached (pid $!), log $log_file"
  exit 0
fi

stream=0
if [[ $worker == 0 ]]; then
  stream=1
fi
run_logged "$log_file" "$stream" "$(flag log_name) worker $worker" "${EXTRA_ARGS[@]}"
