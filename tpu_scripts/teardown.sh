#!/usr/bin/env bash
# Deletes a slice (and its queued resource).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/teardown.sh --name=NAME --zone=ZONE (--type=TYPE | --queued=yes|no) [--project=PROJECT] [--dry_run]

Deletes the slice NAME: the queued resource NAME with its node (--force) for v5e/v5p/v6e types, the
TPU VM NAME for v4 (or as --queued says). A slice that is already gone is not an error. The run
directory (gs://...) is not touched.
EOF
}

parse_flags "name= zone= project= type= queued=" "$@"
tpu_location_args
name=$(flag name)
if [[ -n $(flag type) ]]; then
  tpu_type_info "$(flag type)"
elif [[ -n $(flag queued) && $(flag queued) != auto ]]; then
  TPU_QUEUED_DEFAULT=$(flag queued)
else
  die "--type or --queued=yes|no is required, to know whether NAME is a queued resource (see --help)"
fi

if tpu_uses_queued_resource; then
  delete=(gcloud compute tpus queued-resources delete "$name" "${GCLOUD_LOCATION[@]}" --force --quiet)
  exists=(gcloud compute tpus queued-resources describe "$name" "${GCLOUD_LOCATION[@]}" --format='value(name)')
else
  delete=(gcloud compute tpus tpu-vm delete "$name" "${GCLOUD_LOCATION[@]}" --quiet)
  exists=(gcloud compute tpus tpu-vm describe "$name" "${GCLOUD_LOCATION[@]}" --format='value(name)')
fi
if ! run "${delete[@]}"; then
  if [[ -z $("${exists[@]}" 2>/dev/null || true) ]]; then
    note "slice $name does not exist: nothing to delete"
    exit 0
  fi
  die "could not delete slice $name (see gcloud's message above)"
fi
