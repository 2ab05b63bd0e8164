#!/usr/bin/env bash
# setup_worker.sh: runs ON each TPU worker (setup.sh starts it with --worker=all). Installs uv,
# python PYTHON_VERSION, a .venv in the code folder, the project (pyproject.toml pins) and
# jax[tpu]==JAX_VERSION, then prints the installed versions. Safe to re-run.
#
# Usage: bash REMOTE_DIR/tpu_scripts/remote/setup_worker.sh PYTHON_VERSION JAX_VERSION
# Example Usage: bash qtarget-jax/tpu_scripts/remote/setup_worker.sh 3.11 0.10.2

set -euo pipefail
(($# == 2)) || {
  echo "usage: $0 PYTHON_VERSION JAX_VERSION" >&2
  exit 2
}
python_version=$1
jax_version=$2
code_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$code_dir"
[[ -f pyproject.toml ]] || {
  echo "ERROR [setup_worker]: no pyproject.toml in $code_dir: run tpu_scripts/sync.sh first" >&2
  exit 2
}

uv=$(command -v uv || echo "$HOME/.local/bin/uv")
if [[ ! -x $uv ]]; then
  echo "[setup_worker] installing uv"
  curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh
fi
"$uv" python install "$python_version"
"$uv" venv --allow-existing --python "$python_version" .venv
"$uv" pip install --python .venv/bin/python -e . "jax[tpu]==$jax_version"
.venv/bin/python - <<'PY'
import importlib.metadata as m
import platform
print("[setup_worker]", platform.node(), "python", platform.python_version(),
      *(f"{p} {m.version(p)}" for p in ("jax", "jaxlib", "libtpu", "flax", "qtarget-jax")))
PY
