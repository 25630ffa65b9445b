#!/usr/bin/env bash
# Collects (or follows) the per-worker logs of a run on a slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/logs.sh --name=NAME --zone=ZONE (--run_name=RUN | --model_dir=DIR) [--project=PROJECT]
           [--out_dir=tpu_logs/NAME] [--follow [--log_name=train]] [--dry_run]

Without --follow: copies ~/t5x_cpt_logs/RUN/ from every worker (--worker=all) into OUT_DIR/RUN/
(check_worker<W>.log, train_worker<W>.log, ...; the files of different workers have different names).
With --follow: streams the last lines and new output of LOG_NAME_worker<W>.log of every worker,
each line prefixed with the worker's host name (Ctrl-C stops following, not the run).
EOF
}

parse_flags "name= zone= project= run_name= model_dir= out_dir= follow log_name=" "$@"
tpu_location_args
name=$(flag name)
run_name=$(flag run_name)
if [[ -z $run_name ]]; then
  [[ -n $(flag model_dir) ]] || die "--run_name or --model_dir is required (see --help)"
  run_name=$(run_name_of "$(flag model_dir)")
fi
remote_logs=$REMOTE_LOG_ROOT/$run_name

if [[ $(flag follow) == 1 ]]; then
  log_name=$(flag log_name train)
  [[ $log_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--log_name=$log_name: letters, digits, _ . - only"
  # The glob and $(hostname) are left for the worker's shell to expand.
  on_all_workers "tail -n 20 -F $(quote_word "$remote_logs")/${log_name}_worker*.log | sed -u \"s/^/\$(hostname): /\""
  exit 0
fi

[[ -z $(flag log_name) ]] || die "--log_name only applies with --follow"
out_dir=$(flag out_dir "tpu_logs/$name")
run mkdir -p "$out_dir"
run gcloud compute tpus tpu-vm scp --recurse "$name:$remote_logs" "$out_dir" "${GCLOUD_LOCATION[@]}" --worker=all
plan_comment "logs of every worker in $out_dir/$run_name/"
