#!/usr/bin/env bash
# stop.sh: stop the run on every worker: SIGTERM (train.py saves a checkpoint), up to
# --grace-s seconds (default 120), then SIGKILL, then free the TPU. The VM keeps running (and
# billing): delete.sh removes it.
#
# Usage: tpu_scripts/stop.sh [--settings FILE] [--dry-run] [--grace-s N]
# Example Usage: tpu_scripts/stop.sh --grace-s 300

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"
grace_s=120
set -- ${QT_REST[@]+"${QT_REST[@]}"}
while (($#)); do
  case $1 in
    --grace-s)
      [[ ${2:-} =~ ^[0-9]+$ ]] || qt_die "--grace-s needs a number of seconds, got '${2:-}'"
      grace_s=$2
      shift
      ;;
    *) qt_die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

qt_ssh all "bash $(qt_remote_script stop_train.sh) $grace_s"
qt_log "run stopped on all workers of $TPU_NAME (the TPU is still up: delete.sh removes it)"
