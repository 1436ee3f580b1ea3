#!/usr/bin/env bash
# The one command on the GPU box (issue 9): install the carried wheels (bench/gpu_wheels.sh made them),
# print what the box has, run bench/gpu.py with the given arguments; results under $OUT (or bench/out).
#
#   device run, carry [".whl"]:  bash bench/gpu_run.sh --only sd15-text2img
#                                bash bench/gpu_run.sh coldload --quick   (issue 8's cold load, fp16 on the GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
OUTDIR="${OUT:-bench/out}"
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUTDIR/nvidia-smi.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF'
import importlib.metadata as m, platform, torch
names = ["torch", "triton", "diffusers", "transformers", "tokenizers", "huggingface_hub", "accelerate", "peft", "tomesd", "pydantic", "pydantic-settings"]
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for n in names:
    try: print(f"  {n} {m.version(n)}")
    except m.PackageNotFoundError: print(f"  {n} MISSING")
PYEOF
if [ "${1:-}" = "coldload" ]; then  # issue 8's cold load on the GPU: bash bench/gpu_run.sh coldload --quick
    shift
    "$PY" -m bench.coldload --device cuda "$@" 2>&1 | tee "$OUTDIR/coldload.txt"
    exit "${PIPESTATUS[0]}"
fi
"$PY" -m bench.gpu --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/log.txt"
exit "${PIPESTATUS[0]}"
