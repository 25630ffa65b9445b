# shellcheck shell=bash disable=SC2034  # SC2034: the scripts that source this file use its variables
# What launch_local.sh and slurm_task.sh set for every GPU process. Sourced after
# tpu_scripts/common.sh, never run.

# XLA flags of MaxText's GPU recipes (AI-Hypercomputer/maxtext, end_to_end/gpu/a3/
# test_convergence_1b_params.sh, XLA_ARGS): the latency-hiding scheduler with pipelined, prioritised
# async collectives overlaps FSDP's all-gathers and reduce-scatters with compute, and large combine
# thresholds batch small collectives; cuBLAS instead of Triton GEMMs. Two of theirs are left out:
# --xla_gpu_graph_level=0 no longer exists (the pinned jaxlib aborts on it as an unknown flag;
# --xla_gpu_enable_command_buffer= with an empty list, no CUDA graphs, is what replaced it) and
# --xla_disable_hlo_passes=rematerialization (MaxText rematerialises by its own policy; here an
# out-of-memory step would rather fail than be silently rematerialised: set ModelConfig.remat).
# tests/test_launch_scripts.py checks that the pinned jaxlib accepts every flag.
GPU_XLA_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_triton_gemm=false
  --xla_gpu_enable_command_buffer=
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
)

# gpu_process_env DEVICES: sets PROCESS_ENV, the `env ...` prefix of one GPU process.
# DEVICES is its CUDA_VISIBLE_DEVICES ("" = leave as it is). The caller's XLA_FLAGS come after
# GPU_XLA_FLAGS (so they win), unless --no_xla_flags.
#
# SLURM_LOCALID is removed: when it is set, jax.distributed.initialize restricts each process to
# the one local device numbered SLURM_LOCALID (jax/_src/clusters/cluster.py,
# auto_detect_unset_distributed_params), even with explicit coordinator flags. That is wrong both
# for one process per node (it would use GPU 0 only) and for one process per GPU here (each process
# already sees only its GPU, as device 0, through CUDA_VISIBLE_DEVICES).
gpu_process_env() {
  local devices=$1 xla_flags=${XLA_FLAGS:-}
  if [[ $(flag no_xla_flags) != 1 ]]; then
    xla_flags="${GPU_XLA_FLAGS[*]}${xla_flags:+ $xla_flags}"
  fi
  PROCESS_ENV=(env -u SLURM_LOCALID)
  if [[ -n $devices ]]; then
    PROCESS_ENV+=(CUDA_VISIBLE_DEVICES="$devices")
  fi
  if [[ -n $xla_flags ]]; then
    PROCESS_ENV+=(XLA_FLAGS="$xla_flags")
  fi
}

# The run's log folder: --log_dir, else gpu_logs/RUN (RUN: --run_name or the model dir's name).
gpu_log_dir() {
  local run_name
  run_name=$(flag run_name)
  if [[ -z $run_name ]]; then
    run_name=$(run_name_of "$(flag model_dir)")
  fi
  GPU_LOG_DIR=$(flag log_dir "gpu_logs/$run_name")
}
