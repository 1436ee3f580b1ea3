"""Job lifecycle (issue 17): what live progress costs.

* `progress`: the engine's time for one text2img job (the real `DiffusersEngine`, the tiny built-in
  model on the CPU, 512x512, 20 steps, the same seed every run) without progress (`progress=None`:
  no step callback at all), with a real `ProgressReporter` on a real `SqliteJobStore` (a fresh job
  record per run; `start()` before, `close()` after, the default 0.25 s interval), and with
  previews on (a `preview` job, a preview every 5 steps). A second baseline in every round (A/A)
  shows the noise floor. The variants run interleaved (rotated each round); the overhead is the
  median over rounds of each round's variant / baseline ratio (and the ratio of the medians).
  Also the reporter's own work measured alone (a step call, a flush to the store, a preview), as
  a share of the run: the figure the A/B cannot resolve on a noisy machine.
* `fanout`: one real server (`python -m infra.cli serve`, one worker, default progress interval),
  one job of 40 steps at 512x512 submitted with instant_response, followed by 0, 1 and 100
  concurrent SSE clients (`GET stream/{id}`, bearer key) to its end, interleaved per round: how
  many streams got the `result` event, progress events per stream, the delay from the job's
  `finished_at` (read from the server's SQLite store) to each stream's `result`, the job's
  `generation_time` with 100 streams vs 0, and the server's CPU seconds per job.

    python -m bench.lifecycle [--quick] [--json FILE] [--threads N]

Client and server share this machine's cores: the 100 clients' own parsing competes with the
worker, which is part of what "streams slow the worker" measures here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import PYTHON, ROOT, cleanup, emit, free_port, job_params, peak_rss_mb, percentile, scratch, table

SIZE = 512
ENGINE_STEPS = 20
FANOUT_STEPS = 40
PREVIEW_EVERY = 5
STREAMS = 100
VARIANTS = ("baseline", "baseline_again", "progress", "progress_previews")


# --------------------------------------------------------------------------- 1. engine time


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _pct(ratio: float) -> float:
    return round((ratio - 1) * 100, 2)


def engine_overhead(folder: Path, rounds: int, steps: int, threads: int) -> dict:
    import torch

    from infra.engine.engine import DiffusersEngine, latent_preview
    from infra.jobs.job import Job
    from infra.jobs.progress import ProgressReporter
    from infra.jobs.store import SqliteJobStore
    from infra.runtime import Runtime
    from infra.settings import Settings

    torch.set_num_threads(threads)
    settings = Settings(data_dir=folder / "engine-data", models_dir=folder / "models", torch_threads=threads, device="cpu")
    runtime = Runtime.local(settings)
    runtime.ensure_builtin_models()
    engine = DiffusersEngine(settings, runtime.weights)
    jobs = SqliteJobStore(folder / "bench-jobs.sqlite3")
    params = job_params("tiny-sd", size=SIZE, steps=steps, seeds=(1234,))
    interval = settings.progress_seconds

    def new_job(preview: bool) -> Job:
        return jobs.create(Job(0, "text2img", params, {}, ["generations/bench.png"], ["http://bench/bench.png"],
                               preview=preview))

    def one(variant: str) -> dict:
        if variant.startswith("baseline"):
            cpu, started = time.process_time(), time.perf_counter()
            engine.run(params, {})
            engine_s = time.perf_counter() - started
            cpu_s = time.process_time() - cpu
            return {"engine_s": engine_s, "total_s": engine_s, "cpu_s": cpu_s}
        preview = variant == "progress_previews"
        job = new_job(preview)
        reporter = ProgressReporter(job, jobs, interval=interval, preview_every=PREVIEW_EVERY if preview else 0)
        cpu, started = time.process_time(), time.perf_counter()
        reporter.start()
        run_started = time.perf_counter()
        engine.run(params, {}, reporter)
        engine_s = time.perf_counter() - run_started
        reporter.close()
        total_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu  # the whole process: the flusher thread's work included
        history = jobs.progress(job.id)
        return {"engine_s": engine_s, "total_s": total_s, "cpu_s": cpu_s, "snapshots": len(history),
                "steps_reported": reporter.steps_done, "preview_stored": jobs.preview(job.id) is not None}

    for variant in ("baseline", "progress_previews"):  # warm: the model loaded, the 512x512 path, the reporter's path
        one(variant)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for variant in order:
            runs[variant].append(one(variant))

    base = [run["engine_s"] for run in runs["baseline"]]
    base_cpu = [run["cpu_s"] for run in runs["baseline"]]
    result: dict = {"size": SIZE, "steps": steps, "rounds": rounds, "torch_threads": threads,
                    "progress_seconds": interval, "preview_every": PREVIEW_EVERY, "variants": {}}
    for variant in VARIANTS:
        engine_s = [run["engine_s"] for run in runs[variant]]
        total_s = [run["total_s"] for run in runs[variant]]
        paired = [e / b for e, b in zip(engine_s, base, strict=True)]
        paired_total = [t / b for t, b in zip(total_s, base, strict=True)]
        cpu_s = [run["cpu_s"] for run in runs[variant]]
        paired_cpu = [c / b for c, b in zip(cpu_s, base_cpu, strict=True)]
        entry = {
            "median_engine_s": round(_median(engine_s), 4),
            "min_engine_s": round(min(engine_s), 4),
            "max_engine_s": round(max(engine_s), 4),
            "median_total_s": round(_median(total_s), 4),  # start() + run + close(), what a job pays
            "overhead_pct_paired": _pct(_median(paired)),  # median of each round's variant / baseline
            "paired_iqr_pct": round((percentile(paired, 0.75) - percentile(paired, 0.25)) * 100, 2),
            "overhead_pct_of_medians": _pct(_median(engine_s) / _median(base)),
            "overhead_pct_of_mins": _pct(min(engine_s) / min(base)),
            "overhead_pct_total_paired": _pct(_median(paired_total)),
            "median_cpu_s": round(_median(cpu_s), 4),  # process CPU seconds: less sensitive to other processes
            "cpu_overhead_pct_paired": _pct(_median(paired_cpu)),
            "engine_s": [round(x, 4) for x in engine_s],
            "cpu_s": [round(x, 4) for x in cpu_s],
        }
        if "snapshots" in runs[variant][0]:
            entry["snapshots_per_run"] = _median([run["snapshots"] for run in runs[variant]])
            entry["steps_reported"] = runs[variant][0]["steps_reported"]
            entry["preview_stored"] = all(run["preview_stored"] for run in runs[variant])
        result["variants"][variant] = entry
    median_base = _median(base)
    result["noise"] = {
        "baseline_spread_pct": round((max(base) - min(base)) / median_base * 100, 2),  # (max - min) / median
        "baseline_iqr_pct": round((percentile(base, 0.75) - percentile(base, 0.25)) / median_base * 100, 2),
        "baseline_stdev_pct": round(statistics.stdev(base) / median_base * 100, 2) if len(base) > 1 else None,
        "a_a_pct_paired": result["variants"]["baseline_again"]["overhead_pct_paired"],  # baseline vs baseline
        "a_a_pct_of_mins": result["variants"]["baseline_again"]["overhead_pct_of_mins"],
        "a_a_cpu_pct_paired": result["variants"]["baseline_again"]["cpu_overhead_pct_paired"],
        "baseline_cpu_spread_pct": round((max(base_cpu) - min(base_cpu)) / _median(base_cpu) * 100, 2),
    }
    result["accounted"] = accounted_costs(jobs, new_job, latent_preview, steps, median_base, interval)
    return result


def accounted_costs(jobs, new_job, latent_preview, steps: int, engine_s: float, interval: float) -> dict:
    """The reporter's own work, each part timed alone on this machine (medians), and what it adds
    up to for one run: `steps` step calls on the engine's thread, a flush (snapshot + SQLite write of
    the history + the cancel-request read) every `interval` on the flusher thread, and one preview
    every PREVIEW_EVERY steps (the latent-to-RGB JPEG on the engine's thread, its SQLite write)."""
    import torch

    from infra.jobs.progress import ProgressReporter

    job = new_job(True)
    reporter = ProgressReporter(job, jobs, interval=interval, preview_every=PREVIEW_EVERY)  # not started: no thread
    reporter.total = 10**9

    def timed(fn, n: int) -> float:
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        return _median(samples)

    def step():
        reporter.step()
        reporter.wants_preview()

    step_s = timed(step, 2000)
    flushes = []
    for _ in range(max(10, int(engine_s / interval) + 5)):  # the history grows as it does in a run
        started = time.perf_counter()
        reporter.finish()  # a flush with a changed snapshot (finish's own two assignments aside)
        jobs.cancel_requested(job.id)
        flushes.append(time.perf_counter() - started)
    flush_s = _median(flushes)
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8)
    preview_s = timed(lambda: jobs.set_preview(job.id, latent_preview(latents)), 20)
    flushes_per_run = engine_s / interval + 2  # the loop's, plus start()'s and close()'s
    previews_per_run = steps // PREVIEW_EVERY
    progress_s = steps * step_s + flushes_per_run * flush_s
    previews_s = progress_s + previews_per_run * preview_s
    return {
        "step_call_us": round(step_s * 1e6, 2),
        "flush_ms": round(flush_s * 1000, 3),
        "preview_ms": round(preview_s * 1000, 3),
        "flushes_per_run": round(flushes_per_run, 1),
        "previews_per_run": previews_per_run,
        "progress_pct_of_run": round(progress_s / engine_s * 100, 3),
        "progress_previews_pct_of_run": round(previews_s / engine_s * 100, 3),
    }


# --------------------------------------------------------------------------- 2. stream fan-out


class Server:
    """`python -m infra.cli serve` in a child process (as tests/conftest.py's ServerProcess)."""

    def __init__(self, data_dir: Path, models_dir: Path, threads: int):
        from infra.settings import DEV_API_KEY

        self.key = DEV_API_KEY
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SDAPI_PORT": str(self.port), "SDAPI_DATA_DIR": str(data_dir),
               "SDAPI_MODELS_DIR": str(models_dir), "SDAPI_FETCH_KNOWN_MODELS": "false",
               "SDAPI_TORCH_THREADS": str(threads), "SDAPI_WORKERS": "1", "SDAPI_DEVICE": "cpu",
               "PYTHONPATH": str(ROOT)}
        self.log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([PYTHON, "-m", "infra.cli", "serve"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.data_dir / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def post(self, endpoint: str, **body) -> dict:
        import httpx

        return httpx.post(f"{self.base}/api/v1/enterprise/{endpoint}", json={"key": self.key, **body}, timeout=120).json()

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def job_row(self, job_id: int) -> dict:
        with sqlite3.connect(f"file:{self.data_dir / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=10) as db:
            row = db.execute("SELECT status, started_at, finished_at, generation_time FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
        return dict(zip(("status", "started_at", "finished_at", "generation_time"), row))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def follow(client, url: str, headers: dict, submitted: float) -> dict:
    """One stream to its end: its events, when it connected, when `result` arrived."""
    record = {"progress": 0, "result_at": None, "result_status": None, "other": 0, "http": None}
    async with client.stream("GET", url, headers=headers) as response:
        record["http"] = response.status_code
        record["connect_s"] = time.time() - submitted
        event, data = None, None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif line == "" and event is not None:
                if event == "progress":
                    record["progress"] += 1
                elif event == "result":
                    record["result_at"] = time.time()
                    record["result_status"] = json.loads(data)["status"]
                else:
                    record["other"] += 1
                event, data = None, None
    return record


async def one_job(server: Server, streams: int, steps: int, seed: int) -> dict:
    import httpx

    cpu_before = server.cpu_s()
    client_cpu_before = time.process_time()
    submitted = time.time()
    answer = await asyncio.to_thread(server.post, "text2img", prompt="a lighthouse at dusk", width=SIZE, height=SIZE,
                                     num_inference_steps=steps, seed=seed, samples=1, safety_checker="no",
                                     instant_response="yes")
    job_id = answer["id"]
    url = f"{server.base}/api/v1/enterprise/stream/{job_id}"
    headers = {"Authorization": f"Bearer {server.key}"}
    records: list[dict] = []
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300)) as client:
        if streams:
            outcomes = await asyncio.gather(*(follow(client, url, headers, submitted) for _ in range(streams)),
                                            return_exceptions=True)
            records = [o for o in outcomes if isinstance(o, dict)]
            errors = [repr(o) for o in outcomes if not isinstance(o, dict)]
        else:  # nobody streams: look at the store twice a second (a read-only SQLite query; no request)
            errors = []
            while server.job_row(job_id)["status"] == "processing":
                await asyncio.sleep(0.5)
    row = server.job_row(job_id)
    cpu = server.cpu_s() - cpu_before
    result = {"streams": streams, "job_id": job_id, "status": row["status"],
              "generation_time_s": row["generation_time"],
              "queue_to_start_s": round(row["started_at"] - submitted, 3),
              "server_cpu_s": round(cpu, 2), "client_cpu_s": round(time.process_time() - client_cpu_before, 2)}
    if streams:
        got = [r for r in records if r["result_at"] is not None]
        delays = [(r["result_at"] - row["finished_at"]) * 1000 for r in got]
        events = [r["progress"] for r in records]
        result.update({
            "streams_with_result": len(got),
            "results_success": sum(r["result_status"] == "success" for r in got),
            "stream_errors": errors[:3], "stream_error_count": len(errors),
            "non_200": sum(r["http"] != 200 for r in records),
            "progress_events_per_stream": {"min": min(events, default=0), "median": _median(events),
                                           "max": max(events, default=0)},
            "result_delay_ms": {"p50": round(percentile(delays, 0.5), 1), "p99": round(percentile(delays, 0.99), 1),
                                "max": round(max(delays, default=float("nan")), 1)},
            "last_connect_s": round(max(r["connect_s"] for r in records), 3) if records else None,
        })
    return result


def fanout(folder: Path, rounds: int, steps: int, threads: int, streams: int) -> dict:
    server = Server(folder / "server-data", folder / "models", threads)
    try:
        server.wait_ready()
        warm = server.post("text2img", prompt="warm", width=SIZE, height=SIZE, num_inference_steps=2, seed=1,
                           samples=1, safety_checker="no")  # the model loaded and the 512x512 path seen, synchronously
        if warm.get("status") != "success":
            raise RuntimeError(f"warm-up job: {warm}")
        counts = (0, streams, 1)
        jobs: dict[int, list[dict]] = {n: [] for n in counts}
        for r in range(rounds):
            order = counts[r % len(counts):] + counts[:r % len(counts)]
            for n in order:
                jobs[n].append(asyncio.run(one_job(server, n, steps, seed=1000 + 10 * r + n)))
        result: dict = {"size": SIZE, "steps": steps, "rounds": rounds, "streams": streams, "jobs": jobs}
        gen = {n: _median([j["generation_time_s"] for j in jobs[n]]) for n in counts}
        cpu = {n: _median([j["server_cpu_s"] for j in jobs[n]]) for n in counts}
        many = jobs[streams]
        delays = [j["result_delay_ms"] for j in many]
        result["summary"] = {
            "streams_with_result_min": min(j["streams_with_result"] for j in many),
            "results_success_min": min(j["results_success"] for j in many),
            "stream_errors": sum(j["stream_error_count"] + j["non_200"] for j in many),
            "progress_events_per_stream": {"min": min(j["progress_events_per_stream"]["min"] for j in many),
                                           "median": _median([j["progress_events_per_stream"]["median"] for j in many]),
                                           "max": max(j["progress_events_per_stream"]["max"] for j in many)},
            "result_delay_ms": {"p50": _median([d["p50"] for d in delays]), "p99": max(d["p99"] for d in delays),
                                "max": max(d["max"] for d in delays)},
            "one_stream_result_delay_ms": _median([j["result_delay_ms"]["p50"] for j in jobs[1]]),
            "generation_time_s": {str(n): round(gen[n], 3) for n in counts},
            f"generation_ratio_{streams}_vs_0": round(gen[streams] / gen[0], 3),
            "generation_ratio_1_vs_0": round(gen[1] / gen[0], 3),
            "server_cpu_s": {str(n): cpu[n] for n in counts},
            "last_connect_s": max(j["last_connect_s"] for j in many),
        }
        result["server_peak_rss_mb"] = server.peak_rss_mb()
        return result
    finally:
        server.stop()


# --------------------------------------------------------------------------- the whole benchmark


def run(quick: bool = False, threads: int = 1) -> dict:
    folder = scratch("lifecycle")
    try:
        result: dict = {"benchmark": "lifecycle", "quick": quick}
        result["progress"] = engine_overhead(folder, rounds=3 if quick else 8, steps=ENGINE_STEPS, threads=threads)
        result["engine_peak_rss_mb"] = peak_rss_mb()
        result["fanout"] = fanout(folder, rounds=1 if quick else 3, steps=FANOUT_STEPS, threads=threads, streams=STREAMS)
        return result
    finally:
        cleanup(folder)


def rows(result: dict) -> list[list]:
    """Table rows (measurement, result, detail, peak RSS MB), shared with `python -m bench`."""
    out = []
    p = result["progress"]
    v, noise, acc = p["variants"], p["noise"], p["accounted"]
    rss = result["engine_peak_rss_mb"]
    where = f"{p['size']}x{p['size']}, {p['steps']} steps, {p['torch_threads']} torch thread(s), n={p['rounds']}"
    detail = (f"spread {noise['baseline_spread_pct']} % (CPU time {noise['baseline_cpu_spread_pct']} %); A/A "
              f"{noise['a_a_pct_paired']:+} % paired, {noise['a_a_pct_of_mins']:+} % of mins, "
              f"{noise['a_a_cpu_pct_paired']:+} % CPU")
    out.append([f"engine time, no progress ({where})", f"{v['baseline']['median_engine_s']} s", detail, rss])
    for name, label, accounted in (("progress", "progress reporting", acc["progress_pct_of_run"]),
                                   ("progress_previews", f"progress + previews every {p['preview_every']} steps",
                                    acc["progress_previews_pct_of_run"])):
        r = v[name]
        detail = (f"paired IQR {r['paired_iqr_pct']} %, of mins {r['overhead_pct_of_mins']:+} %, with start/close {r['overhead_pct_total_paired']:+} %, "
                  f"CPU {r['cpu_overhead_pct_paired']:+} %; accounted work {accounted} %")
        out.append([f"engine time, {label}", f"{r['overhead_pct_paired']:+} % ({r['median_engine_s']} s)", detail, rss])
    detail = f"preview {acc['preview_ms']} ms; {acc['flushes_per_run']} flushes, {acc['previews_per_run']} previews a run"
    out.append(["progress reporter's own work", f"flush {acc['flush_ms']} ms, step {acc['step_call_us']} us", detail, ""])
    f = result["fanout"]
    s, n, rss = f["summary"], f["streams"], f["server_peak_rss_mb"]
    events, gen, cpu = s["progress_events_per_stream"], s["generation_time_s"], s["server_cpu_s"]
    detail = (f"progress events/stream min {events['min']} / median {events['median']} / max {events['max']}, "
              f"{s['stream_errors']} errors")
    out.append([f"stream fan-out: {n} SSE clients, {f['size']}x{f['size']} {f['steps']} steps, n={f['rounds']}",
                f"{s['streams_with_result_min']}/{n} got result", detail, rss])
    d = s["result_delay_ms"]
    out.append(["stream fan-out: finished_at -> result event", f"p50 {d['p50']} ms / p99 {d['p99']} ms",
                f"max {d['max']} ms; one stream: p50 {s['one_stream_result_delay_ms']} ms", rss])
    detail = f"{gen[str(n)]} s vs {gen['0']} s (1 stream: {gen['1']} s); server CPU {cpu[str(n)]} vs {cpu['0']} s"
    out.append([f"stream fan-out: job generation_time, {n} streams vs 0", f"{s[f'generation_ratio_{n}_vs_0']}x",
                detail, rss])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 2 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, engine and server (default 1)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = run(args.quick, args.threads)
    emit(result)  # the marked JSON line `python -m bench` reads
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(file=sys.stdout)
    print(table(rows(result), ["measurement", "result", "detail", "peak RSS MB"]))


if __name__ == "__main__":
    main()
