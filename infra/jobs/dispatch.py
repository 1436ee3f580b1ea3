"""Hand jobs to the engine. `Dispatcher` is what the handlers use; `LocalDispatcher` runs jobs on
in-process worker threads fed by a queue, `infra.jobs.modal_dispatch.ModalDispatcher` spawns the
Modal GPU worker class. Every job ends through `execute_job`, wherever it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from infra.catalog.loader import Prepare, run_load
from infra.catalog.weights import LoadRequest
from infra.engine.protocol import Cancelled, EngineError
from infra.jobs.job import FAILED, PRIORITIES, SUCCESS, Job
from infra.jobs.params import JobParams
from infra.jobs.progress import ProgressReporter
from infra.storage.base import StorageError, content_type
from models.errors import ApiError

if TYPE_CHECKING:
    from infra.catalog.weights import WeightsStore
    from infra.engine.protocol import Engine
    from infra.jobs.store import JobStore

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """Where jobs and model loads go. `device` names what runs them (for system_details)."""

    device: str

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def submit(self, job: Job) -> None:
        """Run a stored job (at least once; `execute_job`'s claim makes a repeat harmless)."""

    def load(self, request: LoadRequest) -> None:
        """Run a model load in the background; its outcome lands in the weights store."""

    def evict(self, model_id: str) -> None:
        """A model was deleted: drop it from the engines' memory."""

    def loaded_models(self) -> list[str]:
        """Models in the engines' memory, where this process can see them."""

    def memory_report(self) -> dict[str, dict]:
        """Per loaded model, the memory settings its engine applied (dtype, quantization, offloaded
        text encoders: `infra.engine.speed.memory_report`), where this process can see them."""

    def unload_models(self) -> list[str]:
        """Drop every loaded model from memory."""

    def restart(self) -> list[str]:
        """A fresh engine; queued jobs stay queued."""

    def estimate(self, params: JobParams) -> float:
        """Seconds a job with these params will take."""

    def check(self, job: Job) -> Job:
        """A `processing` job as it really is (ended `failed` when what ran it is known to have failed)."""

    def cancelled(self, job: Job) -> None:
        """A queued job was cancelled in the store: take it out of what would start it."""

    def queue_position(self, job: Job) -> int:
        """How many queued jobs start before this queued one."""

    def queue_lengths(self) -> dict[str, int]:
        """Jobs queued (not started) per priority."""

    def recover(self, max_attempts: int, message: str) -> tuple[list[int], list[int]]:
        """Jobs whose worker is gone: run again while they have attempts left, else ended `failed`
        with `message`. (ids run again, ids failed)."""


def execute_job(job_id: int, jobs: JobStore, storage, engine: Callable[[], Engine], webhooks, weights: WeightsStore,
                usage=None, runner: str | None = None, max_attempts: int = 0, settings=None) -> Job | None:
    """Run one job to its end: the models it waits for ready, outputs stored under their
    precomputed keys in the storage it was submitted under, then `success`; any error (the engine
    failing to start included) -> `failed` with a message; a cancel or a passed deadline (seen at
    the engine's next step) -> `failed` with `cancelled`. Never raises, never leaves the job
    `processing`. Returns the finished record; its usage (images, video seconds, engine seconds,
    the steps that ran) goes to the `usage` meter, for its key. Its progress is reported while it
    runs (`infra.jobs.progress`, every `settings.progress_seconds`), and its webhook gets the
    `started` and `progress` events it asked for.

    `runner` names what runs it (on Modal, the input id): the same input delivered again after its
    container died takes the job up again as its next attempt, and ends it `failed` instead when
    the job has had `max_attempts` starts."""
    if runner and max_attempts and (started := jobs.get(job_id)) is not None and not started.done \
            and started.started_at is not None and started.runner == runner and started.attempts >= max_attempts:
        jobs.update(job_id, status=FAILED, finished_at=time.time(), message=(
            f"The worker running this job stopped {started.attempts} times (pre-empted or crashed); please submit it again."))
        webhooks.job_finished(jobs.get(job_id))
        return jobs.get(job_id)
    if not jobs.claim(job_id, runner):  # cancelled (by its client or clear_queue), finished, or taken by another worker
        return jobs.get(job_id)
    try:
        job = jobs.get(job_id)
    except Exception:  # a record no schema version reads (damaged, or from a newer release): ended, not stuck
        log.exception("job %s: its record cannot be read", job_id)
        jobs.update(job_id, status=FAILED, message="The job's record could not be read; please submit it again.",
                    finished_at=time.time())
        return None
    started = time.time()
    webhooks.job_event(job, "started")
    reporter = ProgressReporter(
        job, jobs, interval=getattr(settings, "progress_seconds", 0.25),
        preview_every=getattr(settings, "preview_every_steps", 0),
        on_progress=(lambda snapshot: webhooks.job_event(job, "progress", snapshot)) if job.wants_event("progress") else None,
        progress_event_seconds=getattr(settings, "webhook_progress_seconds", 5.0),
    )
    try:
        reporter.start()
        reporter.check()  # cancelled or past its deadline while it was queued
        changes = _run(job, jobs, storage, engine, weights, reporter)
    except Cancelled as exc:
        changes = {"status": FAILED, "message": exc.message, "cancelled": True}
    except Exception as exc:  # the reporter's store failing: the job still ends
        log.exception("job %s failed", job_id)
        changes = {"status": FAILED, "message": f"Generation failed: {type(exc).__name__}: {exc}"}
    finally:
        reporter.close()  # before the end is written: nothing of the run is written after it
    jobs.update(job_id, **changes, finished_at=time.time())
    finished = jobs.get(job_id)
    if usage is not None and finished is not None:
        usage.job(finished, time.time() - started, steps=reporter.steps_done)
    webhooks.job_finished(finished)
    return finished


def _run(job: Job, jobs: JobStore, storage, engine: Callable[[], Engine], weights: WeightsStore,
         reporter: ProgressReporter) -> dict:
    """The job's run, as the changes that end its record."""
    started = time.time()
    try:
        weights.wait_ready(job.await_models)
        files, facts = engine().run(job.params, jobs.inputs(job.id), reporter)
        reporter.stage("storing")
        for key, data in zip(job.output_keys, files, strict=True):
            storage.put(key, data, content_type(key), expires_at=job.expires_at, storage_id=job.storage_id)
        reporter.finish()
        return {"status": SUCCESS, "meta": {**job.meta, **facts}, "generation_time": round(time.time() - started, 3)}
    except Cancelled:
        raise
    except (ApiError, EngineError) as exc:  # a model deleted or failed meanwhile; a job the engine cannot run
        return {"status": FAILED, "message": str(exc.message)}
    except StorageError as exc:  # never `success` with outputs that are not stored
        return {"status": FAILED, "message": f"The outputs could not be stored: {exc}"}
    except Exception as exc:  # the job ends `failed`, the trace goes to the log only
        log.exception("job %s failed", job.id)
        return {"status": FAILED, "message": f"Generation failed: {type(exc).__name__}: {exc}"}


class FairQueue:
    """The local workers' queue of job ids: the highest priority first; within a priority,
    round-robin across keys (each key's next job in turn, so one key's burst does not starve the
    others), each key's own jobs in submission order. `stop_one` makes one `get` return None.
    (queue.Queue is FIFO only; this is the one scheduling policy written here.)"""

    def __init__(self):
        self._cond = threading.Condition()
        self._lanes: dict[str, OrderedDict[str, deque[int]]] = {priority: OrderedDict() for priority in PRIORITIES}
        self._stops = 0

    def put(self, job_id: int, owner: str, priority: str) -> None:
        with self._cond:
            lane = self._lanes.get(priority, self._lanes["normal"])
            lane.setdefault(owner, deque()).append(job_id)
            self._cond.notify()

    def get(self) -> int | None:
        with self._cond:
            while True:
                if self._stops:
                    self._stops -= 1
                    return None
                for lane in self._lanes.values():
                    if lane:
                        return _pop_turn(lane)
                self._cond.wait()

    def stop_one(self) -> None:
        with self._cond:
            self._stops += 1
            self._cond.notify()

    def discard(self, job_id: int) -> None:
        with self._cond:
            for lane in self._lanes.values():
                for owner, ids in list(lane.items()):
                    if job_id in ids:
                        ids.remove(job_id)
                        if not ids:
                            del lane[owner]
                        return

    def order(self) -> list[int]:
        """The ids in the order they would start."""
        with self._cond:
            lanes = [OrderedDict((owner, deque(ids)) for owner, ids in lane.items()) for lane in self._lanes.values()]
        return _round_robin(lanes)

    def lengths(self) -> dict[str, int]:
        with self._cond:
            return {priority: sum(map(len, lane.values())) for priority, lane in self._lanes.items()}


def _pop_turn(lane: OrderedDict[str, deque[int]]) -> int:
    """The next job of a priority's lane: the first key's oldest; that key then goes last."""
    owner, ids = next(iter(lane.items()))
    job_id = ids.popleft()
    if ids:
        lane.move_to_end(owner)  # this key's next job waits for every other key's turn
    else:
        del lane[owner]
    return job_id


def _round_robin(lanes: list[OrderedDict[str, deque[int]]]) -> list[int]:
    """Every id of the lanes (highest priority first) in the order they start."""
    started = []
    for lane in lanes:
        while lane:
            started.append(_pop_turn(lane))
    return started


def fair_order(entries: dict[int, dict], served: dict[str, float]) -> list[int]:
    """The start order of queued jobs kept as queue entries ({job id: {"owner", "priority",
    "queued_at"}}, the Modal side's queue), by the same policy as `FairQueue`: the highest priority
    first; within one, round-robin across keys, the key served longest ago (`served`: owner -> when
    its last job was handed out; never: 0) first, each key's jobs in the order they were queued."""
    lanes: dict[str, dict[str, deque[int]]] = {priority: {} for priority in PRIORITIES}
    for _, job_id, owner, priority in sorted((entry.get("queued_at", 0.0), job_id, entry.get("owner", ""),
                                              entry.get("priority", "normal")) for job_id, entry in entries.items()):
        lanes.get(priority, lanes["normal"]).setdefault(owner, deque()).append(job_id)
    # keys in the order they were served (a stable sort: keys never served in the order they queued)
    return _round_robin([OrderedDict((owner, lane[owner]) for owner in sorted(lane, key=lambda o: served.get(o, 0.0)))
                         for lane in lanes.values()])


class LocalDispatcher:
    """Worker threads in this process. The engine (torch) is created on the first worker thread by
    `make_engine`, so the web tier starts without importing torch and the model warms up in the
    background; model loads run `run_load` with the engine side's `prepare_model`."""

    def __init__(self, settings, jobs: JobStore, storage, weights: WeightsStore, webhooks, usage,
                 make_engine: Callable[[], Engine], prepare_model: Prepare):
        self.settings = settings
        self.make_engine, self.prepare_model = make_engine, prepare_model
        self.jobs, self.storage, self.weights, self.webhooks = jobs, storage, weights, webhooks
        self.usage = usage
        self._measured: float | None = None  # seconds per step per megapixel per image, once a job was timed
        self.device = "starting"
        self._queue = FairQueue()
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
            self._queue.stop_one()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        self._loads.shutdown(wait=False, cancel_futures=True)

    # --- the interface handlers use
    def submit(self, job: Job) -> None:
        self._queue.put(job.id, job.owner, job.priority)

    def check(self, job: Job) -> Job:
        return job  # a worker thread that dies takes the process with it: start-up recovers

    def cancelled(self, job: Job) -> None:
        self._queue.discard(job.id)

    def queue_position(self, job: Job) -> int:
        order = self._queue.order()
        return order.index(job.id) if job.id in order else len(order)

    def queue_lengths(self) -> dict[str, int]:
        return self._queue.lengths()

    def recover(self, max_attempts: int, message: str) -> tuple[list[int], list[int]]:
        """At start-up: every job left `processing` was the previous process's."""
        queued, failed = self.jobs.recover(max_attempts, message)
        for job_id in queued:
            job = self.jobs.get(job_id)
            if job is not None:
                self._queue.put(job_id, job.owner, job.priority)
        return queued, failed

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
        return engine.loaded() if engine is not None else []

    def memory_report(self) -> dict[str, dict]:
        """What the engine applied per loaded model (an engine without `memory_report`: nothing)."""
        report = getattr(self._engine, "memory_report", None)
        return report() if report is not None else {}

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

    @property
    def seconds_per_unit(self) -> float:
        """The measured speed, or the setting initial_seconds_per_step until a job was timed."""
        return self.settings.initial_seconds_per_step if self._measured is None else self._measured

    def estimate(self, params: JobParams) -> float:
        """Seconds a job with these params will take, from the measured speed of earlier jobs."""
        return self.seconds_per_unit * params.work_units()

    def engine(self) -> Engine:
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
            job = execute_job(job_id, self.jobs, self.storage, self.engine, self.webhooks, self.weights, self.usage,
                              settings=self.settings)
            self._learn(job, time.time() - started)

    def _learn(self, job: Job | None, seconds: float) -> None:
        if job is None or job.status != SUCCESS or not job.params.denoises:
            return  # only denoising jobs tell the speed of denoising
        units = job.params.work_units()
        if units > 0:
            self._measured = 0.7 * self.seconds_per_unit + 0.3 * (seconds / units)
