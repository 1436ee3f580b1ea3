#!/usr/bin/env bash
# Create .venv and install the project (CPU torch, engine, dev tools). Idempotent: a second
# run only checks that pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: the CPU build (an unpinned torch would pull a multi-GB CUDA build)
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[engine,torch,dev,quant]"
  # rembg's first import compiles pymatting's numba kernels (about a minute) into numba's cache: once
  # here, not in each test worker at once
  .venv/bin/python -c "import rembg"
  echo "$want" > "$stamp"
fi
