#!/usr/bin/env bash
# stop_train.sh: runs ON each worker (stop.sh starts it with --worker=all). Sends SIGTERM to the
# run's process group (train.py checkpoints on SIGTERM), waits up to GRACE_S seconds, then
# SIGKILLs what is left and frees the TPU (free_tpu.sh). Safe when nothing runs.
#
# Usage: bash REMOTE_DIR/tpu_scripts/remote/stop_train.sh [GRACE_S]
# Example Usage: bash qtarget-jax/tpu_scripts/remote/stop_train.sh 120

set -euo pipefail
grace_s=${1:-120}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log_dir=${QT_LOG_DIR:-$HOME/qtarget-logs}
pid=$(cat "$log_dir/train.pid" 2>/dev/null || true)
if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
  pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
  echo "[stop_train] $(hostname): SIGTERM to process group $pgid"
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for ((i = 0; i < grace_s; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 -- "-$pgid" 2>/dev/null; then
    echo "[stop_train] $(hostname): still alive after ${grace_s}s: SIGKILL"
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
else
  echo "[stop_train] $(hostname): no run going"
fi
bash "$here/free_tpu.sh"
