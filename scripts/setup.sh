#!/usr/bin/env bash
# Create .venv and install the project (CPU torch, engine, dev tools). Idempotent: a second
# run only checks that pyproject.toml has not changed since the last install.
# The browser tests (tests/browser/) drive the system's Chromium: with no browser on the machine,
# Debian's `chromium` is installed with apt-get (as root, or through sudo without a password);
# where that cannot be done a line says how to install it (the browser tests fail without it).
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

browser_hint="the browser tests need Chromium: apt-get install -y chromium (Debian/Ubuntu), or set SDAPI_TEST_CHROMIUM to a Chromium binary"
if [ -z "${SDAPI_TEST_CHROMIUM:-}" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"
    else sudo="none"; fi
    if [ "$sudo" != "none" ]; then
      echo "setup: installing Debian's chromium for the browser tests" >&2
      $sudo apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null
    else
      echo "setup: $browser_hint (not root and no passwordless sudo: install it by hand)" >&2
    fi
  else
    echo "setup: $browser_hint" >&2
  fi
fi
