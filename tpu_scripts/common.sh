# shellcheck shell=bash
# common.sh: helpers shared by every tpu_scripts/*.sh. Sourced, never run.
#
# Provides: settings loading (qt_init), the dry-run aware runner (qt_run), the retry helper for
# ssh/scp (qt_retry, qt_ssh, qt_scp), resource state queries (qt_state, qt_wait_ready) and
# shell quoting for exact, copy-pasteable command lines (qt_quote).
#
# Conventions every script follows:
#   --settings FILE  settings file (default: $QT_SETTINGS or tpu_scripts/settings.env)
#   --dry-run        print every gcloud/ssh/local command as "[dry-run] CMD" on stdout, run none;
#                    state queries are printed too and answer the state the happy path expects
#   --help           print the script header and exit 0 (no settings needed)
# Log lines go to stderr as "[script] message"; errors as "ERROR [script]: message" and exit 1.
#
# Environment knobs (for tests and impatient people): QT_RETRY_SLEEP_S (first retry delay,
# doubled each attempt, default 10), QT_POLL_S (state polling interval, default 30),
# QT_STAGE_DIR (local folder for the code tarball and fetched logs, default
# runs/tpu/TPU_NAME in the repo).

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 3))); then
  echo "ERROR: tpu_scripts need bash >= 4.3, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 1
fi

QT_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
QT_REPO_ROOT=$(cd "$QT_SCRIPTS_DIR/.." && pwd)
QT_SCRIPT_NAME=$(basename "${BASH_SOURCE[1]:-$0}" .sh)
QT_DRY_RUN=0
QT_SETTINGS_FILE=${QT_SETTINGS:-$QT_SCRIPTS_DIR/settings.env}
QT_RETRY_SLEEP_S=${QT_RETRY_SLEEP_S:-10}
QT_POLL_S=${QT_POLL_S:-30}
QT_REST=()

# Dry-run lines go to fd 3 (the script's stdout) so they show even inside $(...) captures.
exec 3>&1

# Ctrl-C stops the script, never just the current gcloud call (which qt_retry would retry).
trap 'echo "[$QT_SCRIPT_NAME] interrupted" >&2; exit 130' INT

# Settings keys: required ones have no default.
QT_REQUIRED_KEYS=(PROJECT ZONE ACCELERATOR_TYPE RUNTIME_VERSION TPU_NAME GCS_BUCKET)
declare -A QT_DEFAULTS=(
  [PROVISIONING]=on-demand  # on-demand | spot | preemptible | reserved
  [QUEUED]=false            # true: create through a queued resource (waits for capacity)
  [PYTHON_VERSION]=3.11     # python on the workers (installed by uv); jax needs >= 3.11
  [JAX_VERSION]=0.10.2      # jax[tpu]==JAX_VERSION, same as pyproject.toml's jax pin
  [REMOTE_DIR]=qtarget-jax  # code folder on every worker, relative to the ssh user's home
  [RUN_NAME]=""             # checkpoints in gs://GCS_BUCKET/runs/RUN_NAME/; empty: TPU_NAME
  [SSH_RETRIES]=5           # attempts for every ssh/scp before giving up
)

qt_log() { echo "[$QT_SCRIPT_NAME] $*" >&2; }

qt_die() {
  echo "ERROR [$QT_SCRIPT_NAME]: $*" >&2
  exit 1
}

# qt_usage: prints the header comment of the calling script (lines 2.. up to the first blank).
qt_usage() {
  local script=${BASH_SOURCE[-1]}
  sed -n '2,/^$/s/^# \{0,1\}//p' "$script"
}

# qt_quote ARG...: prints ARGs as one shell line, quoting an argument only when it needs it.
qt_quote() {
  local out="" arg safe='^[A-Za-z0-9_./=:,@%+-]+$'
  for arg in "$@"; do
    if [[ $arg =~ $safe ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# qt_run CMD...: runs CMD, or in dry-run prints it. Every command with side effects goes here.
qt_run() {
  if ((QT_DRY_RUN)); then
    echo "[dry-run] $(qt_quote "$@")" >&3
    return 0
  fi
  qt_log "+ $(qt_quote "$@")"
  "$@"
}

# qt_retry CMD...: qt_run with SSH_RETRIES attempts and exponential backoff (ssh/scp are flaky
# right after a VM comes up and on large pods). Returns the last exit status.
qt_retry() {
  if ((QT_DRY_RUN)); then
    qt_run "$@"
    return 0
  fi
  local attempt=1 delay=$QT_RETRY_SLEEP_S rc
  while true; do
    qt_log "+ $(qt_quote "$@")"
    "$@" && return 0
    rc=$?
    if ((attempt >= SSH_RETRIES)); then
      qt_log "giving up after $attempt attempts (exit $rc): $(qt_quote "$@")"
      return "$rc"
    fi
    qt_log "attempt $attempt/$SSH_RETRIES failed (exit $rc); retrying in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
  done
}

# qt_load_settings FILE: reads KEY=VALUE lines (comments with #, optional quotes) into shell
# variables of the same name, rejecting unknown keys, duplicates and missing required keys.
qt_load_settings() {
  local file=$1 line key value n=0 missing=() known
  local kv='^([A-Z][A-Z0-9_]*)=(.*)$'
  [[ -f $file ]] || qt_die "settings file not found: $file" \
    "(copy tpu_scripts/settings.example.env to tpu_scripts/settings.env and edit it," \
    "or pass --settings FILE / set QT_SETTINGS)"
  known=" ${QT_REQUIRED_KEYS[*]} ${!QT_DEFAULTS[*]} "
  declare -A seen=()
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line#"${line%%[![:space:]]*}"}     # leading blanks
    [[ -z $line || $line == \#* ]] && continue
    line=${line%%[[:space:]]#*}                # trailing " # comment"
    line=${line%"${line##*[![:space:]]}"}      # trailing blanks
    [[ $line =~ $kv ]] || qt_die "$file:$n: expected KEY=VALUE, got: $line"
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
      value=${BASH_REMATCH[1]}
    fi
    [[ $known == *" $key "* ]] || qt_die "$file:$n: unknown key '$key' (known:$known)"
    [[ -z ${seen[$key]:-} ]] || qt_die "$file:$n: key '$key' already set on line ${seen[$key]}"
    seen[$key]=$n
    printf -v "$key" '%s' "$value"
  done <"$file"
  for key in "${QT_REQUIRED_KEYS[@]}"; do
    [[ -n ${seen[$key]:-} && -n ${!key} ]] || missing+=("$key")
  done
  ((${#missing[@]} == 0)) || qt_die "$file: missing required setting(s): ${missing[*]}" \
    "(see tpu_scripts/settings.example.env)"
  for key in "${!QT_DEFAULTS[@]}"; do
    [[ -n ${seen[$key]:-} ]] || printf -v "$key" '%s' "${QT_DEFAULTS[$key]}"
  done
  [[ -n $RUN_NAME ]] || RUN_NAME=$TPU_NAME
  QT_STAGE_DIR=${QT_STAGE_DIR:-$QT_REPO_ROOT/runs/tpu/$TPU_NAME}
  qt_check_settings "$file"
}

# qt_check_settings FILE: value checks with the offending key and value in the message.
qt_check_settings() {
  local file=$1
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    qt_die "$file: TPU_NAME='$TPU_NAME': use lowercase letters, digits and '-'," \
      "start with a letter"
  [[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    qt_die "$file: ACCELERATOR_TYPE='$ACCELERATOR_TYPE': expected e.g. v4-8, v5litepod-8," \
      "v5p-64, v6e-8"
  [[ $GCS_BUCKET != gs://* && $GCS_BUCKET != */* ]] ||
    qt_die "$file: GCS_BUCKET='$GCS_BUCKET': give the bucket name only (no gs://, no path)"
  case $PROVISIONING in
    on-demand | spot | preemptible | reserved) ;;
    *) qt_die "$file: PROVISIONING='$PROVISIONING': must be one of on-demand, spot," \
      "preemptible, reserved" ;;
  esac
  case $QUEUED in
    true | false) ;;
    *) qt_die "$file: QUEUED='$QUEUED': must be true or false" ;;
  esac
  if [[ $QUEUED == true && $PROVISIONING == preemptible ]]; then
    qt_die "$file: PROVISIONING=preemptible is not available for queued resources" \
      "(QUEUED=true); use spot"
  fi
  [[ $SSH_RETRIES =~ ^[1-9][0-9]*$ ]] ||
    qt_die "$file: SSH_RETRIES='$SSH_RETRIES': must be a positive integer"
  [[ $REMOTE_DIR =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ ]] ||
    qt_die "$file: REMOTE_DIR='$REMOTE_DIR': use a relative path of letters, digits," \
      "'_', '.', '-', '/'"
  [[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] ||
    qt_die "$file: RUN_NAME='$RUN_NAME': use letters, digits, '_', '.', '-'"
}

# qt_init "$@": parses the common flags (anywhere on the line), loads the settings and
# leaves the other arguments, in order, in QT_REST. --help exits before loading settings.
qt_init() {
  while (($#)); do
    case $1 in
      -h | --help)
        qt_usage
        exit 0
        ;;
      --dry-run) QT_DRY_RUN=1 ;;
      --settings)
        (($# >= 2)) || qt_die "--settings needs a file argument"
        QT_SETTINGS_FILE=$2
        shift
        ;;
      --settings=*) QT_SETTINGS_FILE=${1#--settings=} ;;
      *) QT_REST+=("$1") ;;
    esac
    shift
  done
  qt_load_settings "$QT_SETTINGS_FILE"
}

# qt_pass_flags: the common flags to hand to another tpu_scripts/*.sh (relaunch, watch).
qt_pass_flags() {
  QT_PASS=(--settings "$QT_SETTINGS_FILE")
  ((QT_DRY_RUN)) && QT_PASS+=(--dry-run)
  return 0
}

# qt_ssh WORKER COMMAND [EXTRA_FLAG...]: runs COMMAND on WORKER (0, 1, ... or all), with retries.
qt_ssh() {
  local worker=$1 command=$2
  shift 2
  qt_retry gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
    "--worker=$worker" --quiet "--command=$command" "$@"
}

# qt_scp LOCAL REMOTE_PATH: copies LOCAL to REMOTE_PATH on every worker, with retries.
qt_scp() {
  qt_retry gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "--project=$PROJECT" \
    "--zone=$ZONE" --worker=all --quiet
}

# qt_describe_cmd: the gcloud command printing the state of the TPU VM or queued resource.
qt_describe_cmd() {
  if [[ $QUEUED == true ]]; then
    QT_CMD=(gcloud compute tpus queued-resources describe "$TPU_NAME" "--project=$PROJECT"
      "--zone=$ZONE" "--format=value(state.state)")
  else
    QT_CMD=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE"
      "--format=value(state)")
  fi
}

# qt_state DRY_RUN_ANSWER: prints the resource state (READY, ACTIVE, PREEMPTED, SUSPENDED, ...)
# or ABSENT when it does not exist. In dry-run prints the query and answers DRY_RUN_ANSWER.
# Any other gcloud failure (auth, network, quota) is an error with gcloud's message.
qt_state() {
  local answer=$1 out err rc=0
  qt_describe_cmd
  if ((QT_DRY_RUN)); then
    echo "[dry-run] $(qt_quote "${QT_CMD[@]}")" >&3
    echo "$answer"
    return 0
  fi
  err=$(mktemp)
  out=$("${QT_CMD[@]}" 2>"$err") || rc=$?
  if ((rc == 0)); then
    rm -f "$err"
    [[ -n $out ]] || out=UNKNOWN
    echo "$out"
  elif grep -q 'NOT_FOUND' "$err"; then
    rm -f "$err"
    echo ABSENT
  else
    qt_log "$(cat "$err")"
    rm -f "$err"
    qt_die "could not read the state of $TPU_NAME (exit $rc): $(qt_quote "${QT_CMD[@]}")"
  fi
}

# qt_ready_state: READY for a TPU VM, ACTIVE for a queued resource.
qt_ready_state() {
  if [[ $QUEUED == true ]]; then echo ACTIVE; else echo READY; fi
}

# qt_is_lost STATE: true when the workers are gone and only delete + create brings them back
# (spot/preemptible VM preempted, queued resource suspended or failed).
qt_is_lost() {
  case $1 in
    PREEMPTED | TERMINATED | STOPPED | SUSPENDING | SUSPENDED | FAILED) return 0 ;;
    *) return 1 ;;
  esac
}

# qt_wait_ready TIMEOUT_S: polls until READY/ACTIVE; a lost or absent resource is an error.
qt_wait_ready() {
  local timeout_s=$1 ready state start
  ready=$(qt_ready_state)
  start=$SECONDS
  while true; do
    state=$(qt_state "$ready")
    [[ $state == "$ready" ]] && {
      qt_log "$TPU_NAME is $state"
      return 0
    }
    if qt_is_lost "$state" || [[ $state == ABSENT ]]; then
      qt_die "$TPU_NAME is $state while waiting for $ready; run relaunch.sh (delete + create)"
    fi
    if ((SECONDS - start >= timeout_s)); then
      qt_die "$TPU_NAME still $state after ${timeout_s}s (wanted $ready); re-run to keep waiting"
    fi
    qt_log "$TPU_NAME is $state; waiting for $ready (poll every ${QT_POLL_S}s)"
    sleep "$QT_POLL_S"
  done
}

# Remote paths (relative to the worker's home; every ssh command starts there).
qt_remote_script() { echo "$REMOTE_DIR/tpu_scripts/remote/$1"; }
# shellcheck disable=SC2034  # used by the scripts that source this file
QT_REMOTE_LOG_DIR=qtarget-logs
