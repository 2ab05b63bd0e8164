#!/usr/bin/env bash
# train_status.sh: runs ON a worker. Prints one line, first word one of:
#   running PID | finished 0 | failed RC | stopped | none
# (watch.sh reads worker 0's line to tell a finished run from one to keep watching.)
#
# Usage: bash REMOTE_DIR/tpu_scripts/remote/train_status.sh
# Example Usage: bash qtarget-jax/tpu_scripts/remote/train_status.sh

set -euo pipefail
log_dir=${QT_LOG_DIR:-$HOME/qtarget-logs}
pid=$(cat "$log_dir/train.pid" 2>/dev/null || true)
code=$(cat "$log_dir/exit_code" 2>/dev/null || true)
if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ -z $code ]]; then
  echo "running $pid"
elif [[ $code == 0 ]]; then
  echo "finished 0"
elif [[ $code == stopped ]]; then
  echo "stopped"
elif [[ -n $code ]]; then
  echo "failed $code"
elif [[ -n $pid ]]; then
  echo "failed unknown (pid $pid gone without an exit code: killed or the VM restarted)"
else
  echo "none"
fi
