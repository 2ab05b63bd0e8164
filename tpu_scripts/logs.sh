#!/usr/bin/env bash
# logs.sh: fetch the last --lines N lines (default 2000) of every worker's training log, one
# file per worker: runs/tpu/TPU_NAME/logs/WORKER.log (QT_STAGE_DIR/logs/); or --follow one
# worker's log live (--worker N, default 0; Ctrl-C stops following, not the run).
#
# Usage: tpu_scripts/logs.sh [--settings FILE] [--dry-run] [--lines N | --follow [--worker N]]
# Example Usage: tpu_scripts/logs.sh --follow --worker 0

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"
follow=0
worker=0
lines=2000
set -- ${QT_REST[@]+"${QT_REST[@]}"}
while (($#)); do
  case $1 in
    --follow) follow=1 ;;
    --worker | --lines)
      [[ ${2:-} =~ ^[0-9]+$ ]] || qt_die "$1 needs a number, got '${2:-}'"
      if [[ $1 == --worker ]]; then worker=$2; else lines=$2; fi
      shift
      ;;
    *) qt_die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

log=$QT_REMOTE_LOG_DIR/train.log
if ((follow)); then
  qt_ssh "$worker" "tail -n 100 -F $log"
else
  out_dir=$QT_STAGE_DIR/logs
  qt_run mkdir -p "$out_dir"
  qt_ssh all "tail -n $lines $log" "--output-directory=$out_dir"
  qt_log "one log per worker in $out_dir/ (WORKER.log)"
fi
