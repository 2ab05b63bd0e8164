#!/usr/bin/env bash
# watch.sh: keep a spot/preemptible run alive. Every --interval-s seconds (default 300) read the
# TPU state; when it is lost (PREEMPTED, SUSPENDED, ...) run relaunch.sh, which resumes from the
# last checkpoint, at most --max-relaunches times (default 20). Stops with exit 0 when worker 0
# reports the run finished, with exit 1 when it failed or is not running (stopped / none). A
# failed relaunch (e.g. no spot capacity) is retried at the next check.
# --once: one check and return (exit status of the relaunch, if any).
# --dry-run: one pass that assumes a preemption and prints the relaunch commands.
#
# Usage: tpu_scripts/watch.sh [--settings FILE] [--dry-run] [--once] [--interval-s N]
#          [--max-relaunches N] --config CONFIG [key=value ...]
# Example Usage: nohup tpu_scripts/watch.sh --config configs/x.yaml > watch.log 2>&1 &

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"

once=0
interval_s=300
max_relaunches=20
run_args=()
set -- ${QT_REST[@]+"${QT_REST[@]}"}
while (($#)); do
  case $1 in
    --once) once=1 ;;
    --interval-s | --max-relaunches)
      [[ ${2:-} =~ ^[0-9]+$ ]] || qt_die "$1 needs a number, got '${2:-}'"
      if [[ $1 == --interval-s ]]; then interval_s=$2; else max_relaunches=$2; fi
      shift
      ;;
    *) run_args+=("$1") ;;
  esac
  shift
done
((${#run_args[@]})) || qt_die "missing --config CONFIG [key=value ...] (the run to relaunch)"
((QT_DRY_RUN)) && once=1
qt_pass_flags

ready=$(qt_ready_state)
relaunches=0
while true; do
  rc=0
  state=$(qt_state PREEMPTED) || state=UNKNOWN
  # ABSENT after one of our relaunches failed half-way (e.g. no spot capacity at create time):
  # keep trying. ABSENT before any relaunch: someone deleted it on purpose, stop.
  if qt_is_lost "$state" || [[ $state == ABSENT && $relaunches -gt 0 ]]; then
    ((relaunches < max_relaunches)) ||
      qt_die "$TPU_NAME is $state and --max-relaunches $max_relaunches is used up"
    relaunches=$((relaunches + 1))
    qt_log "$TPU_NAME is $state: relaunch $relaunches/$max_relaunches"
    bash "$QT_SCRIPTS_DIR/relaunch.sh" "${QT_PASS[@]}" "${run_args[@]}" || rc=$?
    ((rc == 0)) || qt_log "relaunch $relaunches failed (exit $rc); trying again at the next check"
  elif [[ $state == "$ready" ]]; then
    run_state=$(qt_ssh 0 "bash $(qt_remote_script train_status.sh)") || run_state=unknown
    case $run_state in
      finished*)
        qt_log "run finished on worker 0 after $relaunches relaunch(es)"
        exit 0
        ;;
      failed* | stopped* | none*)
        qt_die "worker 0 reports '$run_state': not relaunching (see tpu_scripts/logs.sh)"
        ;;
      *) qt_log "$TPU_NAME $state, worker 0: ${run_state:-unknown}" ;;
    esac
  elif [[ $state == ABSENT ]]; then
    qt_die "$TPU_NAME does not exist: start it with create.sh/sync.sh/setup.sh/run.sh"
  else
    qt_log "$TPU_NAME is $state"
  fi
  ((once)) && exit "$rc"
  sleep "$interval_s"
done
