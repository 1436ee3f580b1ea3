#!/usr/bin/env bash
# Wheels the offline GPU box lacks, for bench/gpu_check.py (the app under uvicorn), bench/gpu.py and the engine
# (issues 9 and 22). Run HERE (PyPI reachable), in the repo root; the GPU command then names `.whl` in `carry` and
# bench/gpu_run.sh installs them.
#
# The box (/work/.library/device/KINDS.md) has python 3.12 with a CUDA torch, numpy, pillow, scipy, opencv,
# onnxruntime, httpx, anyio, h11, click and more; it lacks diffusers, tomesd, torchao, pydantic(-settings),
# fastapi, starlette, uvicorn and python-multipart. The Hugging Face stack (huggingface_hub with its httpx2,
# tokenizers, transformers, safetensors, accelerate, peft) is brought at the project's pins too, so the box runs
# the versions the suite ran (the box's own are of unknown version). Versions: the project venv's (pyproject.toml
# pins the direct ones). torch is never brought (too big to carry: the box's own CUDA build is used); boto3 and
# imageio_ffmpeg get stand-ins (bench/gpu.py: no checked path uses them). About 32 MB.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the box's python3
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
EXCLUDE="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$EXCLUDE")"
grep -qx "/.whl/" "$EXCLUDE" 2>/dev/null || echo "/.whl/" >> "$EXCLUDE"
WHEELS="${WHEELS:-.whl}"  # (another folder for a rehearsal with another python: WHEELS=/tmp/w311 ... 3.11)
mkdir -p "$WHEELS"
PIP="${PIP:-python3 -m pip}"
[ -x .venv/bin/python ] && PIP=".venv/bin/python -m pip"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" \
    diffusers==0.42.1 transformers==5.23.0 tokenizers==0.23.3 huggingface-hub==2.4.0 safetensors==0.8.0 \
    accelerate==1.15.0 peft==0.21.2 tomesd==0.1.3 torchao==0.18.0 \
    httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34 opentelemetry-api==1.45.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0 \
    importlib-metadata==10.2.0 zipp==4.1.2 regex==2026.11.19
ls -la "$WHEELS"
du -sh "$WHEELS"
