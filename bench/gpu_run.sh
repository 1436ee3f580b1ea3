#!/usr/bin/env bash
# The one command on the GPU box (issues 9 and 22): install the carried wheels (bench/gpu_wheels.sh made them),
# print what the box has, then, under one deadline (DEADLINE_S, default 400 s: the run stays inside 7 minutes):
#   stage 1     bench/gpu_check.py: the production path on CUDA through HTTP (stops the run if it fails);
#   stages 2-5  bench/gpu.py with the given arguments, in the time left.
# Results under $OUT (or bench/out): nvidia-smi.txt, log.txt, gpu-check.{json,md}, gpu-<stages>.{json,md}.
#
#   device run, carry [".whl"], timeout_s 450:  bash bench/gpu_run.sh
#                                bash bench/gpu_run.sh --only sd15-text2img      (stage 1, then one speed stage)
#                                SKIP_CHECK=1 bash bench/gpu_run.sh --only sdxl  (a rerun of a speed stage alone)
#                                bash bench/gpu_run.sh coldload --quick           (issue 8's cold load, fp16 on the GPU)
#   CPU rehearsal:               PYTHON=.venv/bin/python bash bench/gpu_run.sh --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
OUTDIR="${OUT:-bench/out}"
DEADLINE="${DEADLINE_S:-400}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/log.txt"
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUTDIR/nvidia-smi.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as m, platform, torch
names = ["torch", "triton", "diffusers", "transformers", "tokenizers", "huggingface_hub", "accelerate", "peft", "tomesd",
         "torchao", "pydantic", "pydantic-settings", "fastapi", "uvicorn", "numpy", "pillow"]
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for n in names:
    try: print(f"  {n} {m.version(n)}")
    except m.PackageNotFoundError: print(f"  {n} MISSING")
PYEOF
if [ "${1:-}" = "coldload" ]; then  # issue 8's cold load on the GPU: bash bench/gpu_run.sh coldload --quick
    shift
    "$PY" -m bench.coldload --device cuda "$@" 2>&1 | tee -a "$LOG"
    exit "${PIPESTATUS[0]}"
fi
TINY=""
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY="--tiny"; done
if [ -z "${SKIP_CHECK:-}" ]; then
    echo "== stage 1: the production path through HTTP ($SECONDS s)" | tee -a "$LOG"
    timeout 200 "$PY" -m bench.gpu_check --out "$OUTDIR" --budget-s 150 $TINY 2>&1 | tee -a "$LOG"
    status="${PIPESTATUS[0]}"
    if [ "$status" != 0 ]; then
        echo "stage 1 FAILED (exit $status): see gpu-check.md; the speed stages are not run" | tee -a "$LOG"
        exit "$status"
    fi
fi
LEFT=$((DEADLINE - SECONDS - 60))  # bench.gpu starts nothing new after its budget; a started variant may take a minute
echo "== stages 2-5: speed against plain diffusers, budget $LEFT s ($SECONDS s)" | tee -a "$LOG"
"$PY" -m bench.gpu --out "$OUTDIR" --budget-s "$LEFT" "$@" 2>&1 | tee -a "$LOG"
status="${PIPESTATUS[0]}"
echo "== done in $SECONDS s" | tee -a "$LOG"
exit "$status"
