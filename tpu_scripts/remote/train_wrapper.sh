#!/usr/bin/env bash
# train_wrapper.sh: runs ON a worker, started detached by launch.sh. Runs
# `.venv/bin/python train.py --config CONFIG key=value ...` in the code folder and records how
# it ended in $HOME/qtarget-logs/exit_code: the exit status, or "stopped" after SIGTERM
# (stop.sh: train.py saves a checkpoint on SIGTERM, so the wrapper waits for it to exit).
#
# Usage: bash train_wrapper.sh CONFIG [key=value ...]
# Example Usage: bash qtarget-jax/tpu_scripts/remote/train_wrapper.sh configs/x.yaml

set -euo pipefail
code_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log_dir=${QT_LOG_DIR:-$HOME/qtarget-logs}
echo "$$" >"$log_dir/train.pid"
stopped=0
trap 'stopped=1' TERM INT
echo "=== $(date -u +%FT%TZ) $(hostname) start: train.py --config $*" \
  "(JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:-unset})"
cd "$code_dir" || exit 2
PYTHONUNBUFFERED=1 .venv/bin/python train.py --config "$@" &
child=$!
# `wait` returns early when a trapped signal arrives: keep waiting for train.py to exit.
while true; do
  rc=0
  wait "$child" || rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if ((stopped)); then
  echo stopped >"$log_dir/exit_code"
else
  echo "$rc" >"$log_dir/exit_code"
fi
echo "=== $(date -u +%FT%TZ) $(hostname) exit $rc (stopped=$stopped)"
exit "$rc"
