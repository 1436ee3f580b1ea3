"""Web-tier throughput: `fetch` (of a finished job) and `system_details` requests per second at
concurrency 32 (32 keep-alive connections sending back to back), against the real app under
uvicorn on loopback. Client and server share the machine's cores; the client is a minimal asyncio
HTTP/1.1 loop so that most of the CPU goes to the server.

    python -m bench.throughput [--quick] [--seconds S] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio

from bench.common import cleanup, emit, scratch
from bench.loopback import KEY, BenchServer, Connection, load

PREFIX = "/api/v1/enterprise"


def run(quick: bool = False, seconds: float | None = None, concurrency: int = 32) -> dict:
    seconds = seconds or (3.0 if quick else 10.0)
    folder = scratch("throughput")
    try:
        with BenchServer(folder / "data", folder / "models", torch_threads=1) as server:
            conn = Connection(server.port)
            status, job = conn.call(f"{PREFIX}/text2img", {
                "key": KEY, "prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2,
                "safety_checker": "no", "seed": 1})
            conn.close()
            if status != 200 or job.get("status") != "success":
                raise RuntimeError(f"text2img answered {status}: {job}")
            results = {}
            for name, payload in (("fetch", {"key": KEY, "request_id": job["id"]}), ("system_details", {"key": KEY})):
                asyncio.run(load(server.port, f"{PREFIX}/{name}", payload, concurrency, 1.0))  # warm-up
                results[name] = asyncio.run(load(server.port, f"{PREFIX}/{name}", payload, concurrency, seconds))
            rss = server.stats()["peak_rss_mb"]
    finally:
        cleanup(folder)
    return {"benchmark": "throughput", "concurrency": concurrency, **results, "server_peak_rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    emit(run(args.quick, args.seconds, args.concurrency))


if __name__ == "__main__":
    main()
