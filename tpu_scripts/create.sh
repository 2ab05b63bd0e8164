#!/usr/bin/env bash
# create.sh: create the TPU VM (or queued resource) named in the settings and wait until READY.
#
# Usage: tpu_scripts/create.sh [--settings FILE] [--dry-run] [--no-wait] [--timeout-s N]
# Example Usage: tpu_scripts/create.sh --settings tpu_scripts/v5p-64.env
#
# PROVISIONING=spot|preemptible|reserved adds --spot/--preemptible/--reserved; QUEUED=true uses
# `gcloud compute tpus queued-resources create` (capacity is granted when available: the wait
# default is generous, --no-wait returns right after the request is accepted).
# Idempotent: an existing READY/CREATING resource is reported and not created again; a
# PREEMPTED/SUSPENDED one is an error pointing to relaunch.sh.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"

wait=1
timeout_s=3600
[[ $QUEUED == true ]] && timeout_s=86400
set -- "${QT_REST[@]}"
while (($#)); do
  case $1 in
    --no-wait) wait=0 ;;
    --timeout-s)
      [[ ${2:-} =~ ^[0-9]+$ ]] || qt_die "--timeout-s needs a number of seconds, got '${2:-}'"
      timeout_s=$2
      shift
      ;;
    *) qt_die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

state=$(qt_state ABSENT)
while [[ $state == DELETING ]]; do  # a delete (ours, from a relaunch) still finishing
  qt_log "$TPU_NAME is being deleted; creating it again once it is gone"
  sleep "$QT_POLL_S"
  state=$(qt_state ABSENT)
done
if [[ $state == ABSENT ]]; then
  provisioning=()
  case $PROVISIONING in
    spot) provisioning=(--spot) ;;
    preemptible) provisioning=(--preemptible) ;;
    reserved) provisioning=(--reserved) ;;
  esac
  if [[ $QUEUED == true ]]; then
    qt_log "requesting queued resource $TPU_NAME ($ACCELERATOR_TYPE, $PROVISIONING) in $ZONE"
    qt_run gcloud compute tpus queued-resources create "$TPU_NAME" "--project=$PROJECT" \
      "--zone=$ZONE" "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
      "--runtime-version=$RUNTIME_VERSION" ${provisioning[@]+"${provisioning[@]}"}
  else
    qt_log "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $PROVISIONING) in $ZONE"
    qt_run gcloud compute tpus tpu-vm create "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
      ${provisioning[@]+"${provisioning[@]}"}
  fi
elif qt_is_lost "$state"; then
  qt_die "$TPU_NAME exists but is $state: its workers are gone. Run tpu_scripts/relaunch.sh" \
    "(delete + create + sync + setup + run), or delete.sh then create.sh"
else
  qt_log "$TPU_NAME already exists (state $state): not creating it again"
fi

if ((wait)); then
  qt_wait_ready "$timeout_s"
fi
