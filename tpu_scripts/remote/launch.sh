#!/usr/bin/env bash
# launch.sh: runs ON each TPU worker (run.sh starts it with --worker=all, all workers at once).
# Refuses when an earlier run is still alive (a retry of the same launch, same --launch-id, is
# a no-op on the workers where it already started), frees the TPU (free_tpu.sh), then starts
# train_wrapper.sh detached (setsid nohup) so the ssh session can end. jax.distributed finds
# the other workers from the TPU environment (JAX_COORDINATOR_ADDRESS = worker 0 on a multi-host
# slice). Output: $HOME/qtarget-logs/train.log (appended).
#
# Usage: bash REMOTE_DIR/tpu_scripts/remote/launch.sh --launch-id ID CONFIG [key=value ...]
# Example Usage: bash qtarget-jax/tpu_scripts/remote/launch.sh --launch-id 1 configs/x.yaml

set -euo pipefail
if (($# < 3)) || [[ $1 != --launch-id ]]; then
  echo "usage: $0 --launch-id ID CONFIG [key=value ...]" >&2
  exit 2
fi
launch_id=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
code_dir=$(cd "$here/../.." && pwd)
log_dir=${QT_LOG_DIR:-$HOME/qtarget-logs}
mkdir -p "$log_dir"
[[ -x $code_dir/.venv/bin/python ]] || {
  echo "ERROR [launch]: $(hostname): no $code_dir/.venv: run tpu_scripts/setup.sh first" >&2
  exit 2
}
[[ -f $code_dir/$1 ]] || {
  echo "ERROR [launch]: $(hostname): config '$1' not found in $code_dir (sync.sh it first?)" >&2
  exit 2
}
if [[ -f $log_dir/train.pid ]]; then
  pid=$(cat "$log_dir/train.pid")
  if kill -0 "$pid" 2>/dev/null; then
    if [[ $(cat "$log_dir/launch_id" 2>/dev/null) == "$launch_id" ]]; then
      echo "[launch] $(hostname): launch $launch_id already started here (pid $pid)"
      exit 0
    fi
    echo "ERROR [launch]: $(hostname): a run is still going (pid $pid): stop.sh first" >&2
    exit 3
  fi
fi
# Multi-host slice: train.py calls jax.distributed.initialize() when JAX_COORDINATOR_ADDRESS is
# set; JAX reads the process id and count from the TPU metadata. The coordinator is worker 0
# (first of worker-network-endpoints: "name:id:ip" or "hostname" entries), port 8482 as JAX's.
metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes
endpoints_url=${QT_TPU_METADATA_URL:-$metadata/worker-network-endpoints}
endpoints=$(curl -sSf -H 'Metadata-Flavor: Google' "$endpoints_url") || {
  echo "ERROR [launch]: $(hostname): cannot read $endpoints_url (not a Cloud TPU VM?)" >&2
  exit 2
}
IFS=, read -ra workers <<<"$endpoints"
if ((${#workers[@]} > 1)); then
  export JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:-${workers[0]##*:}:8482}
  echo "[launch] $(hostname): ${#workers[@]} workers, coordinator $JAX_COORDINATOR_ADDRESS"
fi
bash "$here/free_tpu.sh"
rm -f "$log_dir/exit_code" "$log_dir/train.pid"
echo "$launch_id" >"$log_dir/launch_id"
setsid nohup bash "$here/train_wrapper.sh" "$@" >>"$log_dir/train.log" 2>&1 </dev/null &
# The wrapper writes its own pid (setsid may fork): wait for it so status/stop can find it.
for ((i = 0; i < 100; i++)); do
  [[ -s $log_dir/train.pid ]] && break
  sleep 0.1
done
[[ -s $log_dir/train.pid ]] || {
  echo "ERROR [launch]: $(hostname): the run did not start; see $log_dir/train.log" >&2
  exit 1
}
echo "[launch] $(hostname): started pid $(cat "$log_dir/train.pid"); log $log_dir/train.log"
