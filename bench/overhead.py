"""Request overhead: inpaint requests through HTTP (the real app under uvicorn on loopback, the
tiny inpainting model, 2 steps), minus the engine's own time for the same job measured inside the
server process around `Engine.run`. What is left is everything a request costs beyond denoising
and encoding its outputs: HTTP, auth, validation, decoding and storing the inputs, the job
record, the queue hand-off, the output file write, waking the waiting request, the answer.

    python -m bench.overhead [--quick] [--requests N] [--before TREE]

`--before TREE` measures a second server run from another source tree (e.g. `git archive HEAD`
unpacked, with this bench/ copied in) in the same run, for before/after ratios.
"""

from __future__ import annotations

import argparse
import base64
import io
import time
from pathlib import Path

from bench.common import ROOT, cleanup, emit, scratch, summary_ms
from bench.loopback import KEY, BenchServer, Connection

INPAINT = "/api/v1/enterprise/inpaint"


def test_images(size: int) -> tuple[str, str]:
    """(init, mask) as base64 PNGs: a smooth gradient with mild noise (photo-like compression, not
    a worst case), and a mask with a white square in the middle."""
    from PIL import Image, ImageChops, ImageDraw

    gradient = Image.linear_gradient("L").resize((size, size))
    noise = Image.effect_noise((size, size), 12)
    init = Image.merge("RGB", (gradient, gradient.rotate(90), ImageChops.add(gradient, noise, scale=2)))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)

    def b64(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    return b64(init), b64(mask)


def measure(server: BenchServer, size: int, count: int, warmup: int, first_seed: int) -> dict:
    init, mask = test_images(size)
    conn = Connection(server.port)
    latencies: dict[str, float] = {}
    try:
        for i in range(warmup + count):
            seed = first_seed + i
            payload = {
                "key": KEY, "prompt": "a cat on a bench", "init_image": init, "mask_image": mask,
                "width": size, "height": size, "samples": 1, "num_inference_steps": 2, "strength": 1,
                "seed": seed, "safety_checker": "no",
            }
            started = time.perf_counter()
            status, body = conn.call(INPAINT, payload)
            elapsed = time.perf_counter() - started
            if status != 200 or body.get("status") != "success":
                raise RuntimeError(f"inpaint answered {status}: {body}")
            if i >= warmup:
                latencies[str(seed)] = elapsed
    finally:
        conn.close()
    engine = server.stats()["engine_seconds"]
    overhead = [latencies[s] - engine[s] for s in latencies]
    return {
        "size": size,
        "request_body_kb": round((len(init) + len(mask)) / 1024, 1),
        "total": summary_ms(list(latencies.values())),
        "engine": summary_ms([engine[s] for s in latencies]),
        "overhead": summary_ms(overhead),
    }


def run(quick: bool = False, requests: int | None = None, before: Path | None = None) -> dict:
    count = requests or (40 if quick else 200)
    big_count = max(5, count // 8)
    trees = {"": ROOT} if before is None else {"": ROOT, "before_": before}
    result: dict = {"benchmark": "overhead"}
    for prefix, tree in trees.items():
        folder = scratch("overhead")
        try:
            # one torch thread: the client shares the 2 cores, and OpenMP spin-waiting would blur both
            with BenchServer(folder / "data", folder / "models", root=tree, torch_threads=1) as server:
                result[prefix + "inpaint_64"] = measure(server, 64, count, warmup=5, first_seed=1000)
                result[prefix + "inpaint_512_base64"] = measure(server, 512, big_count, warmup=2, first_seed=900_000)
                result[prefix + "server_peak_rss_mb"] = server.stats()["peak_rss_mb"]
        finally:
            cleanup(folder)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--before", type=Path, help="also measure a server run from this source tree")
    args = parser.parse_args()
    emit(run(args.quick, args.requests, args.before))


if __name__ == "__main__":
    main()
