#!/usr/bin/env bash
# Keeps a training run going on a preemptible slice: create, set up, launch; on preemption recreate
# the slice and launch the same command again, which resumes from the gs:// MODEL_DIR.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/babysit.sh --name=NAME --zone=ZONE --type=TYPE --model_dir=gs://BUCKET/runs/RUN
           --gin_file=FILE [...] [--gin.NAME=VALUE ...] [--project=PROJECT] [--spot]
           [--runtime_version=V] [--queued=auto|yes|no] [--git_url=URL [--git_ref=REF]]
           [--run_name=RUN] [--remote_dir=DIR] [--max_restarts=100] [--max_failures=3]
           [--poll_s=60] [--local_log_dir=tpu_logs] [--teardown_on_success]
           [--dry_run [--simulate_states=S,...] [--simulate_exit_codes=C,...]] [-- TRAINER ARGS]

Loops until the run finishes:
  * slice missing -> create.sh, setup.sh; READY -> setup.sh (first round only);
    PREEMPTED / TERMINATED / STOPPED / ... -> teardown.sh, create.sh, setup.sh;
    CREATING / STARTING / ... -> wait;
  * launch.sh (process-count check, then the trainer on every worker), its output appended to
    LOCAL_LOG_DIR/NAME/RUN/attempt_<k>.log on this machine (the workers' disks die with them);
  * exit 0 -> done (and teardown.sh with --teardown_on_success); exit 2 (bad input) -> stop;
    exit 143 or the slice no longer READY -> preempted: go round again (at most --max_restarts);
    any other failure on a READY slice -> launch again (at most --max_failures in a row).
The trainer resumes from MODEL_DIR by itself, so every round runs the very same command. Run the
babysitter where it can stay up for days (a small VM, tmux); it only waits on gcloud.

Under --dry_run nothing is run: the plan is printed, state queries answer from --simulate_states
(default: MISSING at the start, READY after) and launches exit with --simulate_exit_codes (default 0),
so e.g. --simulate_states=MISSING,PREEMPTED --simulate_exit_codes=143,0 prints a preemption round.
EOF
}

parse_flags "name= zone= project= type= runtime_version= spot queued= git_url= git_ref= model_dir= \
run_name= remote_dir= max_restarts= max_failures= poll_s= local_log_dir= teardown_on_success \
simulate_states= simulate_exit_codes= gin" "$@"
require_flags name zone type model_dir
tpu_location_args
tpu_type_info "$(flag type)"
tpu_uses_queued_resource || true # validates --queued
model_dir=$(flag model_dir)
[[ $model_dir == gs://* ]] ||
  die "--model_dir=$model_dir: the babysitter resumes runs on new VMs, so the run directory must be gs://BUCKET/..."
check_gin_files repo
train_module_args "$model_dir"
run_name=$(flag run_name "$(run_name_of "$model_dir")")
max_restarts=$(flag max_restarts 100)
max_failures=$(flag max_failures 3)
poll_s=$(flag poll_s 60)
require_int max_restarts "$max_restarts" 0
require_int max_failures "$max_failures" 0
require_int poll_s "$poll_s" 1
simulate_from "$(flag simulate_states)"
simulated_exit_codes=()
if [[ -n $(flag simulate_exit_codes) ]]; then
  ((DRY_RUN)) || die "--simulate_* flags only make sense with --dry_run"
  IFS=, read -r -a simulated_exit_codes <<<"$(flag simulate_exit_codes)"
fi
local_log_dir=$(flag local_log_dir tpu_logs)/$(flag name)/$run_name

# The same flags for every step script.
location=(--name="$(flag name)" --zone="$(flag zone)")
[[ -z $(flag project) ]] || location+=(--project="$(flag project)")
slice=(--type="$(flag type)")
[[ -z $(flag queued) ]] || slice+=(--queued="$(flag queued)")
create=("${location[@]}" "${slice[@]}" --poll_s="$poll_s")
[[ -z $(flag runtime_version) ]] || create+=(--runtime_version="$(flag runtime_version)")
[[ $(flag spot) != 1 ]] || create+=(--spot)
setup=("${location[@]}")
for opt in git_url git_ref remote_dir; do
  [[ -z $(flag "$opt") ]] || setup+=("--$opt=$(flag "$opt")")
done
launch=("${location[@]}" --type="$(flag type)" --model_dir="$model_dir" --run_name="$run_name")
[[ -z $(flag remote_dir) ]] || launch+=(--remote_dir="$(flag remote_dir)")
launch+=("${GIN_ARGS[@]}" -- "${EXTRA_ARGS[@]}")
dry=()
((DRY_RUN == 0)) || dry=(--dry_run)

step() {
  local script=$1
  shift
  # --dry_run first: after "--" it would be a trainer argument.
  bash "$T5X_COMMON_DIR/$script" "${dry[@]}" "$@"
}

# Runs launch.sh, its output teed to this attempt's local log; returns its exit code.
launch_attempt() {
  local log=$local_log_dir/attempt_$1.log rc
  if ((DRY_RUN)); then
    plan_comment "attempt $1: launch output appended to $log"
    step launch.sh "${launch[@]}"
    rc=0
    if ((${#simulated_exit_codes[@]})); then
      rc=${simulated_exit_codes[0]}
      simulated_exit_codes=("${simulated_exit_codes[@]:1}")
    fi
    plan_comment "launch exits with $rc"
    return "$rc"
  fi
  mkdir -p "$local_log_dir"
  set +e
  step launch.sh "${launch[@]}" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

attempt=0
restarts=0
failures=0
set_up=0
known_state="" # the state seen after a failed launch, so it is not asked twice
while true; do
  if [[ -n $known_state ]]; then
    state=$known_state
    known_state=""
  else
    slice_state MISSING
    state=$SLICE_STATE
  fi
  case $state in
    READY)
      if ((!set_up)); then
        step setup.sh "${setup[@]}"
        set_up=1
      fi
      ;;
    MISSING)
      plan_comment "slice $(flag name) does not exist: creating it"
      step create.sh "${create[@]}"
      step setup.sh "${setup[@]}"
      set_up=1
      ;;
    CREATING | STARTING | RESTARTING | REPAIRING | PROVISIONING | UNHIDING)
      plan_comment "slice $(flag name) is $state: waiting"
      ((DRY_RUN)) || sleep "$poll_s"
      continue
      ;;
    *)
      plan_comment "slice $(flag name) is $state: deleting and recreating it"
      step teardown.sh "${location[@]}" "${slice[@]}"
      step create.sh "${create[@]}"
      step setup.sh "${setup[@]}"
      set_up=1
      ;;
  esac

  attempt=$((attempt + 1))
  rc=0
  launch_attempt "$attempt" || rc=$?
  if ((rc == 0)); then
    plan_comment "run finished (attempt $attempt, $restarts restart(s) after preemption)"
    if [[ $(flag teardown_on_success) == 1 ]]; then
      step teardown.sh "${location[@]}" "${slice[@]}"
    fi
    exit 0
  fi
  if ((rc == 2)); then
    die "the run stopped on bad input (exit code 2): fix the command, it is not retried (log: $local_log_dir/attempt_$attempt.log)"
  fi
  slice_state READY
  known_state=$SLICE_STATE
  if ((rc == 143)) || [[ $known_state != READY ]]; then
    restarts=$((restarts + 1))
    failures=0
    ((restarts <= max_restarts)) ||
      die "preempted $restarts times, more than --max_restarts=$max_restarts: giving up (MODEL_DIR keeps the last checkpoint)"
    plan_comment "preempted (exit code $rc, slice $known_state): restart $restarts"
  else
    failures=$((failures + 1))
    if ((failures > max_failures)); then
      note "the run failed $failures times in a row on a READY slice (last exit code $rc): giving up"
      exit "$rc"
    fi
    plan_comment "launch failed with exit code $rc on a READY slice: relaunching ($failures of at most $max_failures)"
  fi
done
