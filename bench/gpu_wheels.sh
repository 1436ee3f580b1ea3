#!/usr/bin/env bash
# Wheels the offline GPU box lacks, for bench/gpu.py and the engine (issue 9). Run HERE (PyPI reachable),
# in the repo root; the GPU command then names `.whl` in `carry` and bench/gpu_run.sh installs them.
#
# The box (see /work/.library/device/KINDS.md) has python 3.12 with a CUDA torch, transformers, accelerate,
# safetensors, tokenizers, huggingface_hub, peft, numpy, pillow, scipy, opencv, httpx; it lacks diffusers,
# tomesd and pydantic(-settings). transformers is brought too, at the project's pin. torch is never
# brought (too big to carry: the box's own CUDA build is used). About 25 MB.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the box's python3
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
EXCLUDE="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$EXCLUDE")"
grep -qx "/.whl/" "$EXCLUDE" 2>/dev/null || echo "/.whl/" >> "$EXCLUDE"
mkdir -p .whl
PIP="${PIP:-python3 -m pip}"
[ -x .venv/bin/python ] && PIP=".venv/bin/python -m pip"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 transformers==5.23.0 tomesd==0.1.3 \
    pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0 \
    importlib-metadata==10.2.0 zipp==4.1.2 regex==2026.11.15
ls -la .whl
du -sh .whl
