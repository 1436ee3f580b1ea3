"""What every benchmark shares: percentiles, peak RSS, child processes that answer JSON, scratch
folders under /tmp/bench-*, and the table printer."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RESULT_MARK = "BENCH-RESULT "  # the line a child process prints its JSON result on


def job_params(model_id: str, *, task: str = "text2img", seeds=(0,), size: int = 64, steps: int = 2,
               scheduler: str = "PNDMScheduler", prompt: str = "a cat on a bench", negative_prompt: str = "",
               guidance_scale: float = 7.5, strength: float | None = None):
    """The typed params of a plain generation job (`infra.jobs.params.GenerationParams`) for the
    engine-level benchmarks: no adapters, no second passes, no safety checker."""
    from infra.jobs.params import GenerationParams

    return GenerationParams(
        task=task, model_id=model_id, prompt=prompt, negative_prompt=negative_prompt, width=size, height=size,
        seeds=tuple(seeds), steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, use_karras_sigmas=False,
        algorithm=None, clip_skip=None, tomesd=False, strength=strength,
    )


def percentile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = (len(ordered) - 1) * q
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def summary_ms(seconds: list[float]) -> dict:
    """p50 / p95 / mean / n of durations given in seconds, in milliseconds."""
    return {
        "p50_ms": round(percentile(seconds, 0.5) * 1000, 3),
        "p95_ms": round(percentile(seconds, 0.95) * 1000, 3),
        "mean_ms": round(statistics.fmean(seconds) * 1000, 3) if seconds else float("nan"),
        "n": len(seconds),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(result: dict) -> None:
    """A child's answer: one marked JSON line on stdout (its other output is left alone)."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_child(module: str, *args: str, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run `python -m <module> <args>` in a fresh process and return the JSON it emitted, plus
    `wall_s` (process start to exit, as seen from here)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-m", module, *args], cwd=ROOT, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )
    wall = time.perf_counter() - started
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return {**json.loads(line[len(RESULT_MARK):]), "wall_s": round(wall, 3)}
    raise RuntimeError(f"{module} {' '.join(args)} gave no result (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def scratch(name: str) -> Path:
    """A fresh folder under /tmp/bench-<name>-*; remove it with `cleanup`."""
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir="/tmp"))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def drop_from_page_cache(path: Path) -> None:
    """Evict the files under `path` from the page cache (posix_fadvise DONTNEED: this user's files
    only, no root and no effect on other processes' files)."""
    os.sync()
    for file in files_of(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(path: Path, chunk: int = 16 << 20) -> int:
    """Read every byte of the files under `path` (the disk floor, and the page-cache warm-up)."""
    total = 0
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    for file in files_of(path):
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
