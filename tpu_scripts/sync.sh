#!/usr/bin/env bash
# sync.sh: copy the working tree (every file but .git, .venv, runs/, data_cache/, caches and
# tpu_scripts/settings.env) to REMOTE_DIR on every worker. Files deleted locally are deleted
# there too; the remote .venv and runs/ are kept. Run it before setup.sh and after every local
# change.
#
# Usage: tpu_scripts/sync.sh [--settings FILE] [--dry-run]
# Example Usage: tpu_scripts/sync.sh --settings tpu_scripts/v5p-64.env

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qt_init "$@"
((${#QT_REST[@]} == 0)) || qt_die "unknown argument '${QT_REST[0]}' (see --help)"

tarball=$QT_STAGE_DIR/code.tar.gz
qt_run mkdir -p "$QT_STAGE_DIR"
qt_run tar -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./runs \
  --exclude=./data_cache --exclude=./tpu_scripts/settings.env --exclude=__pycache__ \
  --exclude=.pytest_cache --exclude=.hypothesis --exclude='*.egg-info' -C "$QT_REPO_ROOT" .
qt_scp "$tarball" qtarget-code.tar.gz
clean="find $REMOTE_DIR -mindepth 1 -maxdepth 1 ! -name .venv ! -name runs -exec rm -rf {} +"
qt_ssh all "mkdir -p $REMOTE_DIR && $clean && tar -xzf qtarget-code.tar.gz -C $REMOTE_DIR \
&& rm qtarget-code.tar.gz"
qt_log "code synced to $REMOTE_DIR on every worker of $TPU_NAME"
