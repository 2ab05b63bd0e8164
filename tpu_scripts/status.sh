#!/usr/bin/env bash
# status.sh: print the state of the TPU VM / queued resource and, when it is up, the run state
# of every worker (running PID | finished 0 | failed RC | stopped | none).
# Exit status: 0 up (READY/ACTIVE), 3 lost (PREEMPTED, SUSPENDED, ...: run relaunch.sh),
# 4 absent, 5 anything else (creating, waiting for capacity, ...).
#
# Usage: tpu_scripts/status.sh [--settings FILE] [--dry-run] [--no-workers]
# Example Usage: tpu_scripts/status.sh

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"
workers=1
set -- ${QT_REST[@]+"${QT_REST[@]}"}
while (($#)); do
  case $1 in
    --no-workers) workers=0 ;;
    *) qt_die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

state=$(qt_state "$(qt_ready_state)")
echo "$TPU_NAME $ACCELERATOR_TYPE $state"
if [[ $state == "$(qt_ready_state)" ]]; then
  ((workers)) && qt_ssh all "echo \$(hostname): \$(bash $(qt_remote_script train_status.sh))"
  exit 0
fi
qt_is_lost "$state" && exit 3
[[ $state == ABSENT ]] && exit 4
exit 5
