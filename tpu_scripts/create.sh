#!/usr/bin/env bash
# Creates a TPU VM slice and waits until it is READY.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/create.sh --name=NAME --zone=ZONE --type=TYPE [--project=PROJECT]
           [--runtime_version=VERSION] [--spot] [--queued=auto|yes|no]
           [--wait_timeout_s=SECONDS] [--poll_s=SECONDS] [--dry_run]

Creates the slice NAME (accelerator TYPE: v4-8, v4-32, v5litepod-16, v5p-32, v6e-16, ...) and waits
until its state is READY. v5e (v5litepod), v5p and v6e slices are requested as a queued resource
named NAME whose node is NAME (--queued=auto); v4 slices are created directly.

  --runtime_version  default by family: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p),
                     v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e)
  --spot             a Spot slice: cheaper, can be preempted at any time (see babysit.sh)
  --wait_timeout_s   give up waiting after this long (default 0: wait as long as it takes)
  --poll_s           seconds between state checks (default 30)
  --dry_run          print the gcloud commands instead of running them

Example:
  tpu_scripts/create.sh --name=cpt-v4 --zone=us-central2-b --type=v4-8
EOF
}

parse_flags "name= zone= project= type= runtime_version= spot queued= wait_timeout_s= poll_s=" "$@"
require_flags name zone type
tpu_location_args
tpu_type_info "$(flag type)"
wait_timeout_s=$(flag wait_timeout_s 0)
poll_s=$(flag poll_s 30)
require_int wait_timeout_s "$wait_timeout_s" 0
require_int poll_s "$poll_s" 1
runtime_version=$(flag runtime_version "$TPU_DEFAULT_RUNTIME")
name=$(flag name)

plan_comment "$(flag type): $TPU_CHIPS chips on $TPU_HOSTS host(s), runtime $runtime_version"
spot_args=()
if [[ $(flag spot) == 1 ]]; then
  spot_args=(--spot)
fi
queued=0
if tpu_uses_queued_resource; then
  queued=1
  run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${GCLOUD_LOCATION[@]}" \
    --accelerator-type="$(flag type)" --runtime-version="$runtime_version" "${spot_args[@]}"
else
  run gcloud compute tpus tpu-vm create "$name" "${GCLOUD_LOCATION[@]}" \
    --accelerator-type="$(flag type)" --version="$runtime_version" "${spot_args[@]}"
fi

started=$SECONDS
while true; do
  slice_state READY
  state=$SLICE_STATE
  [[ $state == READY ]] && break
  case $state in
    PREEMPTED | TERMINATED | STOPPED | STOPPING | DELETING)
      die "slice $name is $state instead of READY: delete it (teardown.sh) and create it again"
      ;;
  esac
  if ((queued)); then
    query ACTIVE gcloud compute tpus queued-resources describe "$name" "${GCLOUD_LOCATION[@]}" \
      --format='value(state.state)'
    qr_state=$QUERY_RESULT
    case $qr_state in
      FAILED | SUSPENDED | SUSPENDING)
        die "queued resource $name is $qr_state: see 'gcloud compute tpus queued-resources describe $name', delete it (teardown.sh) and retry"
        ;;
    esac
    note "waiting for slice $name: queued resource ${qr_state:-unknown}, node $state"
  else
    note "waiting for slice $name: node $state"
  fi
  if ((wait_timeout_s > 0 && SECONDS - started > wait_timeout_s)); then
    die "slice $name not READY after ${wait_timeout_s}s (state $state); it was left as it is"
  fi
  sleep "$poll_s"
done
note "slice $name is READY ($TPU_HOSTS host(s))"
