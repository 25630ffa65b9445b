#!/usr/bin/env bash
# One task of a SLURM job step: slurm_train.sbatch runs it once per process with srun.
set -euo pipefail
PROG=slurm_task.sh
# shellcheck source-path=SCRIPTDIR source=../tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tpu_scripts/common.sh"
# shellcheck source-path=SCRIPTDIR source=gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

usage() {
  cat <<'EOF'
Usage: bash gpu_scripts/slurm_task.sh --mode=per_node|per_gpu --coordinator_address=HOST:PORT
           --process_count=N --log_dir=DIR --log_name=NAME [--python=python3] [--no_xla_flags]
           [--dry_run] -- PYTHON ARGS (e.g. -m t5x_cpt.train --gin_file=...)

Inside a SLURM step (srun): runs `python ARGS --coordinator_address=... --process_count=N
--process_index=$SLURM_PROCID`. per_gpu: this task sees only GPU $SLURM_LOCALID
(CUDA_VISIBLE_DEVICES); per_node: all GPUs of the node. Output goes to DIR/NAME_task<PROCID>.log,
task 0's also to stdout; the exit code is python's.
EOF
}

parse_flags "mode= coordinator_address= process_count= log_dir= log_name= python= no_xla_flags" "$@"
require_flags mode coordinator_address process_count log_dir log_name
((${#EXTRA_ARGS[@]})) || die "no python arguments after --"
[[ -n ${SLURM_PROCID:-} && -n ${SLURM_LOCALID:-} ]] ||
  die "SLURM_PROCID and SLURM_LOCALID are not set: run this through srun (slurm_train.sbatch does)"
require_int process_count "$(flag process_count)" 1
process_index=$SLURM_PROCID
case $(flag mode) in
  per_node) gpu_process_env "" ;;
  per_gpu) gpu_process_env "$SLURM_LOCALID" ;;
  *) die "--mode=$(flag mode): expected per_node or per_gpu" ;;
esac
command=("${PROCESS_ENV[@]}" "$(flag python python3)" "${EXTRA_ARGS[@]}"
  --coordinator_address="$(flag coordinator_address)" --process_count="$(flag process_count)"
  --process_index="$process_index")
log_file=$(flag log_dir)/$(flag log_name)_task$process_index.log
if ((DRY_RUN)); then
  plan_comment "task $process_index logs to $log_file"
  run "${command[@]}"
  exit 0
fi
stream=0
if ((process_index == 0)); then
  stream=1
fi
run_logged "$log_file" "$stream" "$(flag log_name) task $process_index" "${command[@]}"
