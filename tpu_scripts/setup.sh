#!/usr/bin/env bash
# Puts the code on every worker of a slice and installs it with its pinned dependencies and jax[tpu].
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/setup.sh --name=NAME --zone=ZONE [--project=PROJECT]
           [--git_url=URL [--git_ref=REF]] [--remote_dir=t5x_cpt]
           [--python_version=3.11] [--uv_version=0.13.8] [--dry_run]

On every worker at once (--worker=all): puts the code into ~/REMOTE_DIR and runs
tpu_scripts/worker_setup.sh there, which makes REMOTE_DIR/.venv (Python --python_version, via uv)
and installs the package with requirements.lock as constraints plus jax[tpu] at setup.py's jax pin.

The code is this working tree (tarred without .venv, .git and outputs, copied with scp), or with
--git_url a clone of that repository at --git_ref (default origin/HEAD; a commit, tag or
origin/BRANCH). Running it again refreshes the code and keeps the virtual environment.

Example:
  tpu_scripts/setup.sh --name=cpt-v4 --zone=us-central2-b
EOF
}

parse_flags "name= zone= project= git_url= git_ref= remote_dir= python_version= uv_version=" "$@"
tpu_location_args
name=$(flag name)
remote_dir=$(flag remote_dir "$REMOTE_DIR_DEFAULT")
[[ $remote_dir =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && $remote_dir != *..* ]] ||
  die "--remote_dir=$remote_dir: a path relative to the workers' home directory, without '..'"
setup_args=(bash tpu_scripts/worker_setup.sh --jax_version="$(pinned_jax_version)"
  --python_version="$(flag python_version 3.11)" --uv_version="$(flag uv_version 0.13.8)")

if [[ -n $(flag git_url) ]]; then
  git_url=$(flag git_url)
  git_ref=$(flag git_ref origin/HEAD)
  remote_command="if [ -d $(quote_word "$remote_dir/.git") ]; then"
  remote_command+=" $(print_command git -C "$remote_dir" fetch --quiet --tags origin);"
  remote_command+=" else $(print_command git clone --quiet "$git_url" "$remote_dir"); fi"
  remote_command+=" && $(print_command git -C "$remote_dir" checkout --quiet --detach "$git_ref")"
else
  [[ -z $(flag git_ref) ]] || die "--git_ref needs --git_url"
  archive=${TMPDIR:-/tmp}/t5x_cpt_src_$name.tar.gz
  run tar -czf "$archive" --exclude=.venv --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=./.pytest_cache --exclude=./demo_output --exclude=./runs --exclude=./tpu_logs --exclude=./gpu_logs \
    -C "$REPO_ROOT" .
  run gcloud compute tpus tpu-vm scp "$archive" "$name:t5x_cpt_src.tar.gz" "${GCLOUD_LOCATION[@]}" --worker=all
  # Replace the old copy but keep its .venv, so a refresh does not reinstall everything.
  remote_command="$(print_command mkdir -p "$remote_dir")"
  remote_command+=" && $(print_command find "$remote_dir" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf '{}' +)"
  remote_command+=" && $(print_command tar -xzf t5x_cpt_src.tar.gz -C "$remote_dir")"
  remote_command+=" && $(print_command rm -f t5x_cpt_src.tar.gz)"
fi
remote_command+=" && $(print_command cd "$remote_dir") && $(print_command "${setup_args[@]}")"
on_all_workers "$remote_command"
