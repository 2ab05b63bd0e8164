#!/usr/bin/env bash
# delete.sh: delete the TPU VM (or the queued resource and its VM) named in the settings. Stops
# the billing of the TPU; the run folder in gs:// is kept. Idempotent: a resource that does not
# exist is reported, not an error.
#
# Usage: tpu_scripts/delete.sh [--settings FILE] [--dry-run]
# Example Usage: tpu_scripts/delete.sh --settings tpu_scripts/v5p-64.env

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"
((${#QT_REST[@]} == 0)) || qt_die "unknown argument '${QT_REST[0]}' (see --help)"

state=$(qt_state "$(qt_ready_state)")
if [[ $state == ABSENT ]]; then
  qt_log "$TPU_NAME does not exist in $ZONE: nothing to delete"
  exit 0
fi
qt_log "deleting $TPU_NAME (state $state)"
if [[ $QUEUED == true ]]; then
  qt_run gcloud compute tpus queued-resources delete "$TPU_NAME" "--project=$PROJECT" \
    "--zone=$ZONE" --force --quiet
else
  qt_run gcloud compute tpus tpu-vm delete "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" --quiet
fi
qt_log "$TPU_NAME deleted; runs stay in gs://$GCS_BUCKET/runs/"
