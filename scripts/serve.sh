#!/usr/bin/env bash
# Set up (idempotently) and start the local API with the built-in tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m infra.cli serve
