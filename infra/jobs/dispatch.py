"""Hand jobs to the engine. `LocalDispatcher` runs them on in-process worker threads fed by a
queue; the Modal side spawns the GPU worker class. Both end every job through `execute_job`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from infra.jobs.store import FAILED, SUCCESS, Job
from infra.catalog.loader import LoadRequest, run_load
from infra.storage.base import StorageError, content_type
from models.errors import ApiError

log = logging.getLogger(__name__)


def execute_job(job_id: int, jobs, storage, get_engine, webhooks, usage=None) -> Job | None:
    """Run one job to its end: outputs stored under their precomputed keys, then `success`;
    any error (the engine failing to start included) -> `failed` with a message.
    Never raises, never leaves the job `processing`. Returns the finished record; its usage
    (images, video seconds, engine seconds) goes to the `usage` meter, for its key."""
    if not jobs.claim(job_id):  # cancelled by clear_queue, finished, or taken by another worker
        return jobs.get(job_id)
    job = jobs.get(job_id)
    started = time.time()
    try:
        files, facts = get_engine().run(job.endpoint, job.params, jobs.inputs(job_id))
        expires_at = job.params.get("expires_at")
        for key, data in zip(job.output_keys, files, strict=True):
            storage.put(key, data, content_type(key), expires_at=expires_at, storage_id=job.params.get("storage"))
        jobs.update(
            job_id,
            status=SUCCESS,
            meta={**job.meta, **facts},
            generation_time=round(time.time() - started, 3),
            finished_at=time.time(),
        )
    except ApiError as exc:
        jobs.update(job_id, status=FAILED, message=str(exc.message), finished_at=time.time())
    except StorageError as exc:  # never `success` with outputs that are not stored
        jobs.update(job_id, status=FAILED, message=f"The outputs could not be stored: {exc}", finished_at=time.time())
    except Exception as exc:  # the job ends `failed`, the trace goes to the log only
        log.exception("job %s failed", job_id)
        jobs.update(job_id, status=FAILED, message=f"Generation failed: {type(exc).__name__}: {exc}", finished_at=time.time())
    finished = jobs.get(job_id)
    if usage is not None and finished is not None:
        usage.job(finished, time.time() - started)
    webhooks.job_finished(finished)
    return finished


def work_units(params: dict) -> float:
    """Denoising steps x megapixels x images (x video frames): what a job's run time is
    proportional to. An upscale-only job counts as one step at its output size."""
    steps = params.get("steps", 1) * params.get("strength", 1.0)
    units = steps * params["width"] * params["height"] / 1e6
    if highres := params.get("highres_fix"):
        units += params["steps"] * highres["strength"] * highres["width"] * highres["height"] / 1e6
    return units * params.get("samples", 1) * params.get("num_frames", 1)


class LocalDispatcher:
    """Worker threads in this process. The engine (torch) is created on the first worker thread by
    `make_engine`, so the web tier starts without importing torch and the model warms up in the
    background; model loads run `run_load` with the engine side's `prepare_model`."""

    def __init__(self, settings, jobs, storage, weights, webhooks, usage, make_engine, prepare_model):
        self.settings = settings
        self.make_engine, self.prepare_model = make_engine, prepare_model
        self.jobs, self.storage, self.weights, self.webhooks = jobs, storage, weights, webhooks
        self.usage = usage
        self.seconds_per_unit = settings.initial_seconds_per_step  # per step per megapixel per image
        self.device = "starting"
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._engine = None
        self._engine_ready = threading.Event()
        self._engine_lock = threading.Lock()
        self._loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")

    # --- lifecycle
    def start(self) -> None:
        for n in range(max(1, self.settings.workers)):
            thread = threading.Thread(target=self._work, daemon=True, name=f"worker-{n}")
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        self._loads.shutdown(wait=False, cancel_futures=True)

    # --- the interface handlers use
    def submit(self, job_id: int) -> None:
        self._queue.put(job_id)

    def load(self, request: LoadRequest) -> None:
        """Run a model load in the background (one at a time, beside the generation workers)."""
        self._loads.submit(run_load, request, self.weights, self.settings, self.webhooks.post_event, self.prepare_model)

    def evict(self, model_id: str) -> None:
        """Drop a deleted model from memory, if the engine has it."""
        if self._engine is not None:
            self._engine.evict(model_id)

    def loaded_models(self) -> list[str]:
        """Ids of the models (and components) in the engine's memory, least recently used first."""
        engine = self._engine
        return engine.cache.loaded if engine is not None else []

    def unload_models(self) -> list[str]:
        """Drop every loaded model from memory (they load again on their next job)."""
        engine = self._engine
        return engine.unload_all() if engine is not None else []

    def restart(self) -> list[str]:
        """A fresh engine: the current one (its models, pipelines, torch state) is dropped and a new
        one starts and warms the default model in the background. Queued jobs stay queued and run
        on the new engine; a running job finishes on the old one, which goes when it is done."""
        with self._engine_lock:
            old, self._engine = self._engine, None
            self._engine_ready.clear()
            self.device = "restarting"
        unloaded = old.unload_all() if old is not None else []
        threading.Thread(target=self._warm, daemon=True, name="engine-restart").start()
        return unloaded

    def estimate(self, params: dict) -> float:
        """Seconds a job with these params will take, from the measured speed of earlier jobs."""
        return self.seconds_per_unit * work_units(params)

    def engine(self):
        with self._engine_lock:
            if self._engine is None:
                self._engine = self.make_engine()
                self.device = self._engine.device_name
                self._engine_ready.set()
            return self._engine

    # --- workers
    def _warm(self) -> None:
        try:
            self.engine().warm(self.settings.default_model_id)
        except Exception:  # a broken default model must not kill the worker; jobs report it
            log.exception("could not warm the default model")

    def _work(self) -> None:
        self._warm()
        while (job_id := self._queue.get()) is not None:
            started = time.time()
            job = execute_job(job_id, self.jobs, self.storage, self.engine, self.webhooks, self.usage)
            self._learn(job, time.time() - started)

    def _learn(self, job: Job | None, seconds: float) -> None:
        if job is None or job.status != SUCCESS or "steps" not in job.params:
            return  # only denoising jobs tell the speed of denoising
        units = work_units(job.params)
        if units > 0:
            self.seconds_per_unit = 0.7 * self.seconds_per_unit + 0.3 * (seconds / units)
