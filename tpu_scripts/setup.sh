#!/usr/bin/env bash
# setup.sh: on every worker (--worker=all) install uv, python PYTHON_VERSION, a .venv with the
# project (pyproject.toml pins) and jax[tpu]==JAX_VERSION (remote/setup_worker.sh). Needs the
# code there: run sync.sh first. Safe to re-run (e.g. after changing dependencies).
#
# Usage: tpu_scripts/setup.sh [--settings FILE] [--dry-run]
# Example Usage: tpu_scripts/setup.sh --settings tpu_scripts/v5p-64.env

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"
((${#QT_REST[@]} == 0)) || qt_die "unknown argument '${QT_REST[0]}' (see --help)"

qt_ssh all "bash $(qt_remote_script setup_worker.sh) $PYTHON_VERSION $JAX_VERSION"
qt_log "workers of $TPU_NAME set up"
