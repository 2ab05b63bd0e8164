#!/usr/bin/env bash
# run.sh: launch `python train.py --config CONFIG key=value ...` on all workers at once. Each
# worker first frees the TPU (kills stale holders of /dev/accel* and /dev/vfio, removes
# /tmp/libtpu_lockfile), then starts the run detached; logs.sh shows the output. Checkpoints
# go to gs://GCS_BUCKET/runs/RUN_NAME/checkpoints (checkpoint.dir), so a relaunch with the same
# RUN_NAME resumes from the latest one, on any VM. run.dir (config.yaml, metrics.jsonl, tb/) is
# runs/RUN_NAME in the code folder of each worker (worker 0 writes it).
#
# Usage: tpu_scripts/run.sh [--settings FILE] [--dry-run] --config CONFIG [key=value ...]
# Example Usage: tpu_scripts/run.sh --config configs/tpu_v5p_llama3_8b.yaml run.steps=2000

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"
config=""
overrides=()
set -- ${QT_REST[@]+"${QT_REST[@]}"}
while (($#)); do
  case $1 in
    --config)
      (($# >= 2)) || qt_die "--config needs a file, e.g. --config configs/base.yaml"
      config=$2
      shift
      ;;
    --config=*) config=${1#--config=} ;;
    *=*) overrides+=("$1") ;;
    *) qt_die "unknown argument '$1': expected --config FILE or key=value (see --help)" ;;
  esac
  shift
done
[[ -n $config ]] || qt_die "missing --config FILE (a path inside the repo, e.g. configs/base.yaml)"
[[ -f $QT_REPO_ROOT/$config ]] ||
  qt_die "--config $config: no such file in $QT_REPO_ROOT (give a path relative to the repo)"

ckpt_dir=gs://$GCS_BUCKET/runs/$RUN_NAME/checkpoints
# A retried ssh (one worker unreachable) re-sends the same id: workers that already started
# this launch keep their run, the others start it. QT_LAUNCH_ID pins it (tests).
launch_id=${QT_LAUNCH_ID:-$(date -u +%Y%m%dT%H%M%SZ)-$$}
remote=$(qt_quote bash "$(qt_remote_script launch.sh)" --launch-id "$launch_id" "$config" \
  "run.dir=runs/$RUN_NAME" "checkpoint.dir=$ckpt_dir" ${overrides[@]+"${overrides[@]}"})
qt_ssh all "$remote"
qt_log "launched on all workers of $TPU_NAME; checkpoints in $ckpt_dir"
qt_log "follow with: tpu_scripts/logs.sh --follow   (all workers: tpu_scripts/logs.sh)"
