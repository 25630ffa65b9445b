#!/usr/bin/env bash
# Checks the process count of a slice, then starts a gin experiment on every worker at once.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/launch.sh --name=NAME --zone=ZONE --type=TYPE --model_dir=gs://BUCKET/runs/RUN
           --gin_file=FILE [--gin_file=FILE ...] [--gin.NAME=VALUE ...] [--project=PROJECT]
           [--run_name=RUN] [--remote_dir=t5x_cpt] [--skip_check] [--detach] [--dry_run]
           [-- MORE TRAINER ARGUMENTS]

On every worker of the slice at once (--worker=all, never worker 0 alone, which would hang):
  1. python -m t5x_cpt.distributed --expect_process_count=HOSTS: every worker joins the run and
     prints "process i/n: ..."; it stops here (exit 2) unless n is the number of hosts of TYPE;
  2. python -m t5x_cpt.train --gin_file=... --gin.MODEL_DIR='MODEL_DIR' ... (JAX finds the other
     workers by itself on a TPU VM slice: no coordinator flags).
Each worker writes ~/t5x_cpt_logs/RUN/{check,train}_worker<W>.log; worker 0's output is streamed
here. The exit code is the trainer's (0 done, 2 bad input, 143 preempted after a checkpoint: the
same command resumes from MODEL_DIR). Gin files must be inside the repository (setup.sh copies it).

  --model_dir   the run directory; gs://... (required when the slice has several hosts, which must
                share it; a local path on one host is lost with the VM)
  --run_name    name of the log folder (default: the last component of --model_dir)
  --skip_check  do not run the process-count check first
  --detach      return once started; training goes on if this terminal goes away (logs.sh --follow)

Example:
  tpu_scripts/launch.sh --name=cpt-v5e --zone=us-west4-a --type=v5litepod-16 \
      --model_dir=gs://my-bucket/runs/cpt_1393m_zh \
      --gin_file=configs/models/ladder_1393m.gin --gin_file=configs/runs/cpt.gin \
      --gin.SOURCE_CHECKPOINT="'gs://my-bucket/runs/en_1393m'" --gin.TRAIN_STEPS=13290 ...
EOF
}

parse_flags "name= zone= project= type= model_dir= run_name= remote_dir= skip_check detach gin" "$@"
require_flags name zone type model_dir
tpu_location_args
tpu_type_info "$(flag type)"
model_dir=$(flag model_dir)
if [[ $model_dir != gs://* ]]; then
  if ((TPU_HOSTS > 1)); then
    die "--model_dir=$model_dir: $(flag type) has $TPU_HOSTS hosts, which must share the run directory; use gs://BUCKET/..."
  fi
  warn "--model_dir=$model_dir is on the worker's disk: it is lost with the VM (use gs://BUCKET/... to keep it)"
fi
check_gin_files repo
train_module_args "$model_dir"
run_name=$(flag run_name "$(run_name_of "$model_dir")")
remote_dir=$(flag remote_dir "$REMOTE_DIR_DEFAULT")
python=.venv/bin/python
worker_run=(bash tpu_scripts/worker_run.sh --log_dir="$REMOTE_LOG_ROOT/$run_name")

if [[ $(flag skip_check) != 1 ]]; then
  plan_comment "pre-flight: every worker joins; the run must have $TPU_HOSTS process(es) ($(flag type))"
  check=("${worker_run[@]}" --log_name=check -- "$python" -m t5x_cpt.distributed
    --expect_process_count="$TPU_HOSTS")
  if ! on_all_workers "$(print_command cd "$remote_dir") && $(print_command "${check[@]}")"; then
    die "pre-flight check failed on slice $(flag name): see the lines above and ~/$REMOTE_LOG_ROOT/$run_name/check_worker*.log on the workers (logs.sh)"
  fi
fi

train=("${worker_run[@]}" --log_name=train)
if [[ $(flag detach) == 1 ]]; then
  train+=(--detach)
fi
train+=(-- "$python" "${TRAIN_MODULE_ARGS[@]}")
plan_comment "train on all $TPU_HOSTS worker(s); logs in ~/$REMOTE_LOG_ROOT/$run_name/ on each"
rc=0
on_all_workers "$(print_command cd "$remote_dir") && $(print_command "${train[@]}")" || rc=$?
if ((rc == 143)); then
  note "the run was preempted after saving a checkpoint: the same command resumes it"
elif ((rc != 0)); then
  note "training ended with exit code $rc (logs.sh collects the workers' logs)"
fi
exit "$rc"
