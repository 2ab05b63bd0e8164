#!/usr/bin/env bash
# exec.sh: run one shell command on every worker (or --worker N), with retries. For the odd job
# the other scripts do not cover, e.g. copying model weights or a prepared dataset from gs://
# to the same local path on every worker (train.py reads model.source and data.path locally).
#
# Usage: tpu_scripts/exec.sh [--settings FILE] [--dry-run] [--worker N] -- COMMAND
# Example Usage: tpu_scripts/exec.sh -- 'gcloud storage cp -r gs://my-bucket/llama3-8b ~/models/'

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"

worker=all
command=""
set -- ${QT_REST[@]+"${QT_REST[@]}"}
while (($#)); do
  case $1 in
    --worker)
      [[ ${2:-} =~ ^[0-9]+$ ]] || qt_die "--worker needs a worker number, got '${2:-}'"
      worker=$2
      shift
      ;;
    --)
      shift
      (($# == 1)) || qt_die "give the command as ONE quoted argument after --, got $# arguments"
      command=$1
      ;;
    *) qt_die "unknown argument '$1': put the command after -- (see --help)" ;;
  esac
  shift
done
[[ -n $command ]] || qt_die "missing command: tpu_scripts/exec.sh -- 'COMMAND'"

qt_ssh "$worker" "$command"
