#!/usr/bin/env bash
# free_tpu.sh: runs ON a TPU worker. Kills processes still holding the TPU (/dev/accel*,
# /dev/vfio/*: a crashed or stale run makes the next one fail with "TPU in use") and removes
# /tmp/libtpu_lockfile. Prints what it killed. Safe when nothing holds the TPU.
#
# Usage: bash REMOTE_DIR/tpu_scripts/remote/free_tpu.sh
# Example Usage: bash qtarget-jax/tpu_scripts/remote/free_tpu.sh

set -euo pipefail
shopt -s nullglob
dev=${QT_DEV_DIR:-/dev}                                  # tests point both at a temp folder
lockfile=${QT_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}
devices=("$dev"/accel* "$dev"/vfio/[0-9]*)
pids=""
if ((${#devices[@]})); then
  # lsof exits 1 when no process holds the files: that is the normal, free case.
  pids=$(sudo lsof -t "${devices[@]}" 2>/dev/null | sort -u | tr '\n' ' ' || true)
fi
if [[ -n ${pids// /} ]]; then
  echo "[free_tpu] $(hostname): killing stale TPU holders: $pids"
  # shellcheck disable=SC2086  # one argument per pid
  sudo kill -9 $pids || true
  sleep 2
fi
if [[ -e $lockfile ]]; then
  echo "[free_tpu] $(hostname): removing $lockfile"
  sudo rm -f "$lockfile"
fi
