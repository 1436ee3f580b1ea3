"""`python -m bench.server PORT DATA_DIR MODELS_DIR`: the real app, served by uvicorn exactly as
`python -m infra.cli serve` serves it, plus `GET /bench/stats`: the engine's own time of every
job it ran (keyed by the job's first seed, measured inside this process around `Engine.run`),
whether the engine is up, and this process's peak RSS. Settings come from SDAPI_* variables."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import uvicorn

from bench.common import peak_rss_mb
from infra.runtime import Runtime
from infra.settings import Settings
from infra.web.api import create_app


def main() -> None:
    port, data_dir, models_dir = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    settings = Settings(data_dir=data_dir, models_dir=models_dir, port=port)
    runtime = Runtime.local(settings)
    dispatcher = runtime.dispatcher
    engine_seconds: dict[str, float] = {}
    lock = threading.Lock()
    plain_engine = dispatcher.engine

    def timed_engine():
        engine = plain_engine()
        if not getattr(engine, "_bench_timed", False):
            run = engine.run

            def timed_run(params, inputs):
                started = time.perf_counter()
                try:
                    return run(params, inputs)
                finally:
                    with lock:
                        engine_seconds[str(getattr(params, "seeds", [None])[0])] = time.perf_counter() - started

            engine.run = timed_run
            engine._bench_timed = True
        return engine

    dispatcher.engine = timed_engine  # the workers look it up per job
    app = create_app(runtime)

    @app.get("/bench/stats", include_in_schema=False)
    def stats():
        with lock:
            times = dict(engine_seconds)
        engine = dispatcher._engine
        ready = engine is not None and settings.default_model_id in engine.loaded()
        return {"engine_seconds": times, "engine_ready": ready, "peak_rss_mb": peak_rss_mb()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


if __name__ == "__main__":
    main()
