# shellcheck shell=bash disable=SC2034  # SC2034: the scripts that source this file use its variables
# Shared by every launch script (tpu_scripts/*.sh, gpu_scripts/*): flag parsing, --dry_run, shell
# quoting, gin pass-through, the train command and the TPU accelerator-type rules. Sourced, never run.
#
# Conventions of the scripts that source it:
#   * flags are --name=value, booleans are bare (--spot); --gin_file=F and --gin.NAME=VALUE go to
#     the trainer in the order given, and so does everything after `--`;
#   * under --dry_run stdout carries only the commands, one per line, shell-quoted (comments start
#     with '#'); progress and warnings go to stderr;
#   * bad input: one line "<script>: error: <cause>" on stderr and exit code 2, like the trainer.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "$(basename "$0"): error: needs bash >= 4.4 (this is $BASH_VERSION)" >&2
  exit 2
fi

T5X_COMMON_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$T5X_COMMON_DIR/.." && pwd)
PROG=${PROG:-$(basename "$0")}
DRY_RUN=0
declare -A FLAG=()
GIN_ARGS=()    # --gin_file=F and --gin.NAME=VALUE, in the order given
EXTRA_ARGS=()  # everything after --
SIMULATED=()   # answers that queries give under --dry_run, consumed in order
# stdout of the script itself: dry-run commands are printed here even from inside $(...).
exec 3>&1

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# One word as the shell reads it back: bare when safe, else in double quotes (gin strings like
# --gin.MODEL_DIR='gs://b/x' stay readable), else in single quotes.
quote_word() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# A command as one shell-quoted line.
print_command() {
  local words=() word
  for word in "$@"; do
    words+=("$(quote_word "$word")")
  done
  printf '%s\n' "${words[*]}"
}

# Runs a command, or under --dry_run prints it (to the script's stdout) and succeeds.
run() {
  if ((DRY_RUN)); then
    print_command "$@" >&3
    return 0
  fi
  note "+ $(print_command "$@")"
  "$@"
}

# query DRY_ANSWER CMD...: sets QUERY_RESULT to what the read-only CMD prints ("" when it fails).
# Under --dry_run CMD is printed and the answer is the next --simulate_* value, else DRY_ANSWER.
# (A variable, not stdout: $(query ...) would run in a subshell and never use up an answer.)
query() {
  local dry_answer=$1
  shift
  if ((DRY_RUN)); then
    print_command "$@" >&3
    if ((${#SIMULATED[@]})); then
      dry_answer=${SIMULATED[0]}
      SIMULATED=("${SIMULATED[@]:1}")
    fi
    printf '# -> %s\n' "$dry_answer" >&3
    QUERY_RESULT=$dry_answer
    return 0
  fi
  QUERY_RESULT=$("$@" 2>/dev/null || true)
}

# A comment line in the dry-run plan (nothing when running for real: there it is a note).
plan_comment() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$*" >&3
  else
    note "$*"
  fi
}

# parse_flags "SPEC" "$@": SPEC lists the accepted flags, "name=" for valued ones, "name" for
# booleans, "gin" to accept --gin_file/--gin.NAME. Values land in FLAG[name].
parse_flags() {
  local spec=" $1 dry_run help " arg name
  shift
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --)
        EXTRA_ARGS+=("$@")
        break
        ;;
      --help | -h)
        usage
        exit 0
        ;;
      --gin_file=* | --gin.*=*)
        [[ $spec == *" gin "* ]] || die "$arg: this script takes no gin flags (see --help)"
        [[ -n ${arg#*=} ]] || die "$arg has an empty value"
        GIN_ARGS+=("$arg")
        ;;
      --gin_file | --gin.*)
        die "$arg needs a value: write ${arg}=VALUE"
        ;;
      --*=*)
        name=${arg%%=*}
        name=${name#--}
        if [[ $spec == *" $name= "* ]]; then
          FLAG[$name]=${arg#*=}
        elif [[ $spec == *" $name "* ]]; then
          die "--$name takes no value (write --$name alone)"
        else
          die "unknown flag --$name (see --help)"
        fi
        ;;
      --*)
        name=${arg#--}
        if [[ $spec == *" $name "* ]]; then
          FLAG[$name]=1
        elif [[ $spec == *" $name= "* ]]; then
          die "--$name needs a value: write --$name=VALUE"
        else
          die "unknown flag --$name (see --help)"
        fi
        ;;
      *)
        die "unexpected argument '$arg' (flags are --name=value; trainer arguments go after --)"
        ;;
    esac
  done
  if [[ ${FLAG[dry_run]:-0} == 1 ]]; then
    DRY_RUN=1
  fi
}

# flag NAME [DEFAULT]: the flag's value, or DEFAULT.
flag() { printf '%s' "${FLAG[$1]:-${2:-}}"; }

require_flags() {
  local name
  for name in "$@"; do
    [[ -n ${FLAG[$name]:-} ]] || die "--$name is required (see --help)"
  done
}

# require_int NAME VALUE MIN: VALUE is an integer >= MIN.
require_int() {
  if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3)); then
    die "--$1=$2 must be an integer >= $3"
  fi
}

# Simulated answers of --dry_run queries, from a comma-separated flag value.
simulate_from() {
  local values=$1
  [[ -z $values ]] && return 0
  ((DRY_RUN)) || die "--simulate_* flags only make sense with --dry_run"
  IFS=, read -r -a SIMULATED <<<"$values"
}

# ---------------------------------------------------------------------------------------------
# The train command

# The jax version setup.py pins (jax[tpu] / jax[cuda] must match it).
pinned_jax_version() {
  local version
  version=$(sed -n 's/^[[:space:]]*"jax==\([^"]*\)".*/\1/p' "$REPO_ROOT/setup.py" | head -n 1)
  [[ -n $version ]] || die "no \"jax==VERSION\" pin found in $REPO_ROOT/setup.py"
  printf '%s' "$version"
}

# Checks that every --gin_file exists (as the trainer looks: the working directory, the repository
# root, configs/). With "repo" as $1 each is rewritten relative to the repository root, because the
# code runs from a copy of the repository on another machine; files outside it are refused.
check_gin_files() {
  local mode=$1 i arg path found
  local has_file=0
  for i in "${!GIN_ARGS[@]}"; do
    arg=${GIN_ARGS[$i]}
    [[ $arg == --gin_file=* ]] || continue
    has_file=1
    path=${arg#--gin_file=}
    found=""
    if [[ -f $REPO_ROOT/$path || -f $REPO_ROOT/configs/$path ]]; then
      found=$path
    elif [[ -f $path ]]; then
      found=$(cd "$(dirname "$path")" && pwd)/$(basename "$path")
      if [[ $mode == repo ]]; then
        [[ $found == "$REPO_ROOT"/* ]] || die "gin file $path is outside the repository $REPO_ROOT: workers only get the repository; move it into configs/"
        found=${found#"$REPO_ROOT"/}
      fi
    fi
    [[ -n $found ]] || die "gin file $path not found (looked in $(pwd), $REPO_ROOT and $REPO_ROOT/configs)"
    GIN_ARGS[i]=--gin_file=$found
  done
  ((has_file)) || die "no --gin_file given: name an experiment, e.g. --gin_file=configs/experiments/tiny_pretrain.gin"
}

# The trainer's arguments (after `python -m`): gin files and overrides, MODEL_DIR as a gin string,
# then the pass-through arguments.
train_module_args() {
  local model_dir=$1 arg
  for arg in "${GIN_ARGS[@]}"; do
    [[ $arg == --gin.MODEL_DIR=* ]] && die "give the run directory as --model_dir=..., not $arg"
  done
  [[ $model_dir != *"'"* ]] || die "--model_dir must not contain a single quote: $model_dir"
  TRAIN_MODULE_ARGS=(-m t5x_cpt.train "${GIN_ARGS[@]}" "--gin.MODEL_DIR='$model_dir'" "${EXTRA_ARGS[@]}")
}

# The run's name (log folder names): --run_name, else the last component of the model dir.
run_name_of() {
  local name=${1%/}
  name=${name##*/}
  [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "cannot name logs after model dir '$1': pass --run_name=NAME"
  printf '%s' "$name"
}

# run_logged LOG_FILE STREAM LABEL CMD...: CMD's output goes to LOG_FILE and, when STREAM is 1, to
# stdout too; a last line "[t5x_cpt] LABEL: exit code N" goes to both. Returns CMD's exit code.
run_logged() {
  local log_file=$1 stream=$2 label=$3 rc
  shift 3
  mkdir -p "$(dirname "$log_file")"
  printf '[t5x_cpt] %s started %s: %s\n' "$label" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    "$(print_command "$@")" >>"$log_file"
  set +e
  if ((stream)); then
    "$@" 2>&1 | tee -a "$log_file"
    rc=${PIPESTATUS[0]}
  else
    "$@" >>"$log_file" 2>&1
    rc=$?
  fi
  set -e
  printf '[t5x_cpt] %s: exit code %d\n' "$label" "$rc" | tee -a "$log_file"
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# TPU accelerator types
#
# How many TPU VMs (hosts, = JAX processes) a slice has. The number in the accelerator type counts
# TensorCores on v4 and v5p, which have 2 per chip (cloud.google.com/tpu/docs/v4: "Each TPU v4 chip
# contains two TensorCores"; v5p likewise), and chips on v5e (gcloud name v5litepod) and v6e, which
# have one (cloud.google.com/tpu/docs/v5e: the format is v$VERSION-$CHIP_COUNT). A multi-host slice
# has 4 chips per TPU VM; a single-VM slice holds up to 4 chips on v4/v5p and up to 8 on v5e/v6e
# (cloud.google.com/tpu/docs/v5e: "Each TPU VM in a v5e TPU slice contains 1, 4 or 8 chips", 2x4 =
# 8 chips on one host; the rule chips_per_vm = 4, vms = chips / 4 of Google's xpk,
# src/xpk/core/system_characteristics.py). So: v4-8 = 4 chips = 1 host, v4-32 = 16 chips = 4 hosts,
# v5p-32 = 16 chips = 4 hosts, v5litepod-8 = 1 host, v5litepod-16 = 4 hosts, v6e-64 = 16 hosts.
#
# Runtime versions per family: cloud.google.com/tpu/docs/runtimes (PyTorch and JAX table).

# tpu_type_info TYPE: sets TPU_CHIPS, TPU_HOSTS, TPU_DEFAULT_RUNTIME, TPU_QUEUED_DEFAULT.
tpu_type_info() {
  local type=$1 family count
  if [[ $type =~ ^v5e-([0-9]+)$ ]]; then
    die "unknown TPU type $type: gcloud calls v5e slices v5litepod-N (e.g. v5litepod-${BASH_REMATCH[1]})"
  fi
  [[ $type =~ ^(v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] ||
    die "unknown TPU type '$type': expected v4-N, v5p-N, v5litepod-N or v6e-N (e.g. v4-8, v5litepod-16, v5p-32)"
  family=${BASH_REMATCH[1]}
  count=$((10#${BASH_REMATCH[2]}))
  case $family in
    v4 | v5p)
      ((count >= 8 && count % 8 == 0)) ||
        die "unknown TPU type '$type': $family sizes count TensorCores (2 per chip) and are multiples of 8"
      TPU_CHIPS=$((count / 2))
      TPU_HOSTS=$((TPU_CHIPS / 4))
      ;;
    v5litepod | v6e)
      case $count in
        1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ;;
        *) die "unknown TPU type '$type': $family slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
      esac
      TPU_CHIPS=$count
      if ((count <= 8)); then
        TPU_HOSTS=1
      else
        TPU_HOSTS=$((count / 4))
      fi
      ;;
  esac
  case $family in
    v4) TPU_DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
    v5p) TPU_DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod) TPU_DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e) TPU_DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  esac
  # v5e, v5p and v6e capacity comes through queued resources; v4 slices are created directly.
  if [[ $family == v4 ]]; then
    TPU_QUEUED_DEFAULT=no
  else
    TPU_QUEUED_DEFAULT=yes
  fi
}

# Whether the slice is (or will be) a queued resource: --queued=auto|yes|no, auto by family.
tpu_uses_queued_resource() {
  local choice
  choice=$(flag queued auto)
  case $choice in
    auto) [[ $TPU_QUEUED_DEFAULT == yes ]] ;;
    yes) return 0 ;;
    no) return 1 ;;
    *) die "--queued=$choice: expected auto, yes or no" ;;
  esac
}

# The --zone/--project arguments every gcloud call takes, in GCLOUD_LOCATION.
tpu_location_args() {
  require_flags name zone
  [[ $(flag name) =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name=$(flag name): TPU names are lower-case letters, digits and hyphens, starting with a letter"
  GCLOUD_LOCATION=(--zone="$(flag zone)")
  if [[ -n $(flag project) ]]; then
    GCLOUD_LOCATION+=(--project="$(flag project)")
  fi
}

# slice_state DRY_ANSWER: sets SLICE_STATE to the TPU VM node's state (READY, CREATING, PREEMPTED,
# ...) or MISSING.
slice_state() {
  query "$1" gcloud compute tpus tpu-vm describe "$(flag name)" "${GCLOUD_LOCATION[@]}" --format='value(state)'
  SLICE_STATE=${QUERY_RESULT:-MISSING}
}

# Runs a command on every worker of the slice at once. Never on worker 0 alone: a multi-host
# program started on one host waits forever for the others.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$(flag name)" "${GCLOUD_LOCATION[@]}" --worker=all \
    --command="$1"
}

# Where the code lives on each worker (relative to the login directory).
REMOTE_DIR_DEFAULT=t5x_cpt
# Where the per-worker logs live on each worker (relative to the login directory).
REMOTE_LOG_ROOT=t5x_cpt_logs
