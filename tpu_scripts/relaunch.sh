#!/usr/bin/env bash
# relaunch.sh: bring a lost (preempted / suspended) TPU back and resume the run: delete.sh,
# create.sh, sync.sh, setup.sh, run.sh in that order, with the same settings. train.py resumes
# from the latest checkpoint in gs://GCS_BUCKET/runs/RUN_NAME/checkpoints (checkpoint.resume).
#
# Usage: tpu_scripts/relaunch.sh [--settings FILE] [--dry-run] --config CONFIG [key=value ...]
# Example Usage: tpu_scripts/relaunch.sh --config configs/tpu_v5p_llama3_8b.yaml

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"

# Check the run arguments before deleting anything.
config=""
set -- ${QT_REST[@]+"${QT_REST[@]}"}
while (($#)); do
  case $1 in
    --config)
      (($# >= 2)) || qt_die "--config needs a file"
      config=$2
      shift
      ;;
    --config=*) config=${1#--config=} ;;
    *=*) ;;
    *) qt_die "unknown argument '$1': expected --config FILE or key=value (see --help)" ;;
  esac
  shift
done
[[ -n $config ]] || qt_die "missing --config FILE (the same config as the first launch)"
[[ -f $QT_REPO_ROOT/$config ]] || qt_die "--config $config: no such file in $QT_REPO_ROOT"

qt_pass_flags
for step in delete create sync setup; do
  qt_log "== $step.sh"
  bash "$QT_SCRIPTS_DIR/$step.sh" "${QT_PASS[@]}"
done
qt_log "== run.sh"
bash "$QT_SCRIPTS_DIR/run.sh" "${QT_PASS[@]}" "${QT_REST[@]}"
