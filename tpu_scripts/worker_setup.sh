#!/usr/bin/env bash
# Installs t5x_cpt with its pinned dependencies and jax[tpu] into .venv of this repository copy, on
# one TPU worker. setup.sh runs it on every worker at once; not run by hand.
set -euo pipefail
PROG=worker_setup.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: bash tpu_scripts/worker_setup.sh [--jax_version=V] [--python_version=3.11] [--uv_version=V] [--dry_run]

In the repository copy this script belongs to: makes .venv with Python --python_version (the TPU VM
images ship an older Python; uv fetches the right one), then installs the package with
requirements.lock as constraints plus jax[tpu] at --jax_version (default: setup.py's jax pin).
EOF
}

parse_flags "jax_version= python_version= uv_version=" "$@"
jax_version=$(flag jax_version "$(pinned_jax_version)")
python_version=$(flag python_version 3.11)
uv_version=$(flag uv_version 0.13.8)
[[ $jax_version =~ ^[0-9][0-9a-z.]*$ ]] || die "--jax_version=$jax_version is not a version"
[[ $python_version =~ ^3\.[0-9]+$ ]] || die "--python_version=$python_version: expected 3.N"
[[ $uv_version =~ ^[0-9][0-9.]*$ ]] || die "--uv_version=$uv_version is not a version"
cd "$REPO_ROOT"

uv=uv
if ! command -v uv >/dev/null 2>&1; then
  uv=$HOME/.local/bin/uv
  if ((DRY_RUN)) || [[ ! -x $uv ]]; then
    # Ubuntu images with PEP 668 refuse --user installs unless told otherwise.
    run python3 -m pip install --user --quiet "uv==$uv_version" ||
      run python3 -m pip install --user --quiet --break-system-packages "uv==$uv_version"
  fi
fi

venv_python=.venv/bin/python
current=""
if [[ -x $venv_python ]]; then
  current=$("$venv_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
fi
if [[ $current != "$python_version" ]]; then
  run rm -rf .venv
  run "$uv" venv --quiet --python "$python_version" .venv
fi
run "$uv" pip install --quiet --python "$venv_python" -c requirements.lock -e . "jax[tpu]==$jax_version"
run "$venv_python" -c 'import jax, t5x_cpt; print("t5x_cpt installed with jax", jax.__version__)'
