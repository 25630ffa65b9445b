#!/usr/bin/env bash
# Trains a gin experiment on the GPUs of one machine: one process for all of them, or one per GPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tpu_scripts/common.sh"
# shellcheck source-path=SCRIPTDIR source=gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

usage() {
  cat <<'EOF'
Usage: gpu_scripts/launch_local.sh --model_dir=DIR --gin_file=FILE [...] [--gin.NAME=VALUE ...]
           [--mode=node|per_gpu] [--num_gpus=N] [--port=12355] [--python=python3]
           [--run_name=RUN] [--log_dir=gpu_logs/RUN] [--skip_check] [--check_only]
           [--no_xla_flags] [--failure_grace_s=60] [--dry_run] [-- MORE TRAINER ARGUMENTS]

Modes:
  node     (default) one process drives every GPU of the machine (or the first --num_gpus): no
           coordinator, the simplest and usually the fastest on one node.
  per_gpu  --num_gpus processes (default: all GPUs nvidia-smi lists), process i sees only GPU i
           (CUDA_VISIBLE_DEVICES=i) and joins the others with --coordinator_address=localhost:PORT
           --process_count=N --process_index=i: the multi-host code path, on one machine.
First a pre-flight, python -m t5x_cpt.distributed --expect_process_count=N (1 in node mode) with
the same layout, then python -m t5x_cpt.train --gin_file=... --gin.MODEL_DIR='DIR' ....
Logs: LOG_DIR/{check,train}_process<i>.log; process 0's output is streamed here. The exit code is
the first failing process's (0 done, 2 bad input, 143 preempted after a checkpoint: run the same
command again to resume); once one process fails the others get --failure_grace_s seconds to
stop by themselves, then SIGTERM. SIGTERM/SIGINT to this script are passed on to every process.
XLA_FLAGS: MaxText's GPU flags (gpu_scripts/gpu_common.sh) + yours, unless --no_xla_flags.

Example:
  gpu_scripts/launch_local.sh --model_dir=/data/runs/cpt_125m_zh \
      --gin_file=configs/models/ladder_125m.gin --gin_file=configs/runs/cpt.gin \
      --gin.ModelConfig.dtype="'bfloat16'" --gin.ModelConfig.attention_impl="'cudnn'" ...
EOF
}

parse_flags "model_dir= mode= num_gpus= port= python= run_name= log_dir= skip_check check_only \
no_xla_flags failure_grace_s= gin" "$@"
require_flags model_dir
mode=$(flag mode node)
port=$(flag port 12355)
python=$(flag python python3)
grace_s=$(flag failure_grace_s 60)
require_int port "$port" 1
require_int failure_grace_s "$grace_s" 0
((port < 65536)) || die "--port=$port is not a TCP port"
check_gin_files local
train_module_args "$(flag model_dir)"
gpu_log_dir
log_dir=$GPU_LOG_DIR

num_gpus=$(flag num_gpus)
if [[ -n $num_gpus ]]; then
  require_int num_gpus "$num_gpus" 1
elif [[ $mode == per_gpu ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: pass --num_gpus=N"
  num_gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | grep -c .) ||
    die "nvidia-smi lists no GPU: pass --num_gpus=N"
fi

case $mode in
  node)
    process_count=1
    devices=""
    if [[ -n $num_gpus ]]; then
      devices=$(seq -s, 0 $((num_gpus - 1)))
    fi
    ;;
  per_gpu) process_count=$num_gpus ;;
  *) die "--mode=$mode: expected node or per_gpu" ;;
esac

pids=()
forward_signal() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}

# run_processes NAME ARGS...: runs `python ARGS` as the mode's processes and waits for all;
# returns the exit code of the first one to fail (0 when all succeed).
run_processes() {
  local name=$1 i rc first_rc=0 first_failed_at="" tail_pid=""
  shift
  local -a command codes=()
  pids=()
  for ((i = 0; i < process_count; i++)); do
    command=("$python" "$@")
    if [[ $mode == per_gpu ]]; then
      gpu_process_env "$i"
      command+=(--coordinator_address="localhost:$port" --process_count="$process_count" --process_index="$i")
    else
      gpu_process_env "$devices"
    fi
    if ((DRY_RUN)); then
      printf '%s > %s 2>&1 &\n' "$(print_command "${PROCESS_ENV[@]}" "${command[@]}")" \
        "$(quote_word "$log_dir/${name}_process$i.log")" >&3
      continue
    fi
    mkdir -p "$log_dir"
    "${PROCESS_ENV[@]}" "${command[@]}" >"$log_dir/${name}_process$i.log" 2>&1 &
    pids+=($!)
  done
  if ((DRY_RUN)); then
    printf 'wait\n' >&3
    return 0
  fi
  trap forward_signal TERM INT
  tail -n +1 -F "$log_dir/${name}_process0.log" --pid="${pids[0]}" &
  tail_pid=$!
  while true; do
    for i in "${!pids[@]}"; do
      [[ -z ${codes[i]:-} ]] || continue
      kill -0 "${pids[i]}" 2>/dev/null && continue
      rc=0
      wait "${pids[i]}" || rc=$?
      codes[i]=$rc
      if ((rc != 0 && first_rc == 0)); then
        first_rc=$rc
        first_failed_at=$SECONDS
        note "$name process $i exited with code $rc; the others get ${grace_s}s to stop"
      fi
    done
    ((${#codes[@]} < process_count)) || break
    if [[ -n $first_failed_at ]] && ((SECONDS - first_failed_at > grace_s)); then
      note "stopping the $name processes still running ${grace_s}s after the first failure"
      forward_signal
      first_failed_at=""
    fi
    sleep 1
  done
  trap - TERM INT
  wait "$tail_pid" 2>/dev/null || true
  for i in "${!codes[@]}"; do
    note "$name process $i: exit code ${codes[i]} (log $log_dir/${name}_process$i.log)"
  done
  return "$first_rc"
}

plan_comment "$mode mode: $process_count process(es); logs in $log_dir/"
if [[ $(flag skip_check) != 1 ]]; then
  run_processes check -m t5x_cpt.distributed --expect_process_count="$process_count" ||
    die "pre-flight check failed: the processes did not join as $process_count (see $log_dir/check_process*.log)"
fi
if [[ $(flag check_only) == 1 ]]; then
  exit 0
fi
rc=0
run_processes train "${TRAIN_MODULE_ARGS[@]}" || rc=$?
exit "$rc"
