"""A running job's progress: what the engine reports, what the stores keep, what clients read.

The wire shape, in every `processing` answer (generation answers, `fetch`, the stream):

    "progress": {"percent": 0..100, "step": i, "total_steps": n, "image": k, "images": m,
                 "stage": "queued" | "loading_model" | "denoising" | "decoding" | "postprocessing"
                          | "storing", "preview": "<link>" (jobs that asked for previews)}

`total_steps` is `params.total_steps()` (every denoising step of every image and pass, one per
upscaled image), corrected by the engine when a scheduler runs more steps than asked (second-order
schedulers). `percent` never goes backwards: it is 99 at most until the job's outputs are stored,
then 100. `image` is 1-based.

`ProgressReporter` is the engine's `Progress` (infra.engine.protocol) for one attempt of one job.
Its calls only change memory (the engine's thread does no I/O for it); a flusher thread, every
`progress_seconds`, writes the snapshot when it changed (appended to the job's history, numbered
by `seq`: what a stream's `Last-Event-ID` names), writes the latest preview, reads whether the
job was cancelled, and sends the rate-limited `progress` webhook event. `step` raises `Cancelled`
once the job was cancelled or its deadline passed, so the engine stops at its next step.

Each snapshot also keeps `at` (when it was taken), `eta` (seconds left, from this job's own
measured seconds per step; the answers turn it into their `eta`) and `previewed` (a preview is
stored); none of them is part of the wire object.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from infra.engine.protocol import Cancelled

if TYPE_CHECKING:
    from infra.jobs.job import Job
    from infra.jobs.store import JobStore

log = logging.getLogger(__name__)

HISTORY_LIMIT = 500  # snapshots kept per job (a stream replays at most these)
WIRE_FIELDS = ("percent", "step", "total_steps", "image", "images", "stage")
CANCELLED = "Cancelled by the client"


def deadline_message(job: Job) -> str:
    seconds = round((job.deadline_at or 0) - job.created_at, 1)
    return f"The job's deadline passed ({seconds:g} s after it was submitted) before it finished"


def images_of(job: Job) -> int:
    return getattr(job.params, "samples", 1)


def queued_snapshot(job: Job) -> dict[str, Any]:
    """The progress of a job no worker has started (no history yet)."""
    return {"percent": 0, "step": 0, "total_steps": job.params.total_steps(), "image": 0, "images": images_of(job),
            "stage": "queued"}


def wire(snapshot: dict[str, Any], preview_url: str | None = None) -> dict[str, Any]:
    """A stored snapshot as clients see it."""
    shown = {name: snapshot[name] for name in WIRE_FIELDS if name in snapshot}
    if preview_url:
        shown["preview"] = preview_url
    return shown


class ProgressReporter:
    """The `Progress` of one attempt of one job (see the module docstring). `start()` it after
    the job is claimed, `close()` it when the engine is done (it writes what is left)."""

    def __init__(self, job: Job, jobs: JobStore, interval: float, preview_every: int = 0,
                 on_progress: Callable[[dict], None] | None = None, progress_event_seconds: float = 5.0):
        self.job_id, self.jobs = job.id, jobs
        self.interval = max(0.01, interval)
        self.preview_every = preview_every if job.preview else 0
        self.deadline_at, self._deadline_message = job.deadline_at, deadline_message(job)
        self.on_progress, self.progress_event_seconds = on_progress, progress_event_seconds
        self.total = job.params.total_steps()
        self.images = images_of(job)
        history = jobs.progress(job.id)  # an earlier attempt's (a worker re-delivered the job): numbers go on
        self._history: list[dict] = list(history)
        self._floor = max((entry.get("percent", 0) for entry in history), default=0)
        self._lock = threading.Lock()
        self._step = 0
        self._image = 0
        self._stage = "loading_model"
        self._first_step_at: float | None = None
        self._steps_since_preview = 0
        self._preview: bytes | None = None
        self._previewed = False
        self._changed = True
        self._cancel: str | None = None
        self._stop = threading.Event()
        self._last_event = 0.0
        self._thread: threading.Thread | None = None

    # --- the engine's side (Progress)
    def stage(self, stage: str) -> None:
        with self._lock:
            if stage != self._stage:
                self._stage, self._changed = stage, True

    def image(self, index: int) -> None:
        with self._lock:
            if index + 1 != self._image:
                self._image, self._changed = index + 1, True

    def adjust(self, extra_steps: int) -> None:
        """The engine found a pass runs `extra_steps` more (or fewer) steps than planned."""
        with self._lock:
            self.total = max(self._step + 1, self.total + extra_steps)
            self._changed = True

    def step(self, count: int = 1) -> None:
        self.check()
        with self._lock:
            if self._first_step_at is None:
                self._first_step_at = time.time()
            self._step = min(self._step + count, self.total)
            self._steps_since_preview += count
            self._changed = True

    def wants_preview(self) -> bool:
        return bool(self.preview_every) and self._steps_since_preview >= self.preview_every

    def preview(self, jpeg: bytes) -> None:
        with self._lock:
            self._preview, self._steps_since_preview = jpeg, 0
            self._previewed = self._changed = True

    def check(self) -> None:
        """Raise `Cancelled` when the job was cancelled or its deadline passed."""
        if self._cancel is not None:
            raise Cancelled(self._cancel)
        if self.deadline_at is not None and time.time() > self.deadline_at:
            raise Cancelled(self._deadline_message)

    # --- what execute_job reads
    @property
    def steps_done(self) -> int:
        return self._step

    def finish(self) -> None:
        """The outputs are stored: 100 %, written now (before the job turns `success`)."""
        with self._lock:
            self._step, self._stage, self._floor, self._changed = self.total, "storing", 100, True
        self._flush(final=True)

    # --- lifecycle
    def start(self) -> ProgressReporter:
        self._cancel = self.jobs.cancel_requested(self.job_id)
        self._flush()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"progress-{self.job_id}")
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(1.0, 4 * self.interval))
        self._flush()

    # --- the flusher
    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._flush()
                self._cancel = self._cancel or self.jobs.cancel_requested(self.job_id)
            except Exception:  # a store hiccup: the next round tries again; the job goes on
                log.exception("job %s: could not write its progress", self.job_id)

    def _snapshot(self) -> dict[str, Any]:
        """The current state (call with the lock held)."""
        now = time.time()
        percent = 100 if self._floor >= 100 else max(self._floor, min(99, 100 * self._step // max(1, self.total)))
        self._floor = percent
        eta = None
        if self._first_step_at is not None and self._step:
            per_step = (now - self._first_step_at) / self._step
            eta = round(per_step * (self.total - self._step), 2)
        return {"percent": percent, "step": self._step, "total_steps": self.total, "image": self._image,
                "images": self.images, "stage": self._stage, "at": now, "eta": eta, "previewed": self._previewed}

    def _flush(self, final: bool = False) -> None:
        with self._lock:
            if not self._changed and self._preview is None:
                return
            preview, self._preview = self._preview, None
            snapshot = None
            if self._changed:
                snapshot = self._snapshot()
                snapshot["seq"] = (self._history[-1]["seq"] + 1) if self._history else 1
                self._history.append(snapshot)
                del self._history[:-HISTORY_LIMIT]
                self._changed = False
            history = list(self._history)
        if preview is not None:
            self.jobs.set_preview(self.job_id, preview)
        if snapshot is not None:
            self.jobs.set_progress(self.job_id, history)
            if self.on_progress is not None and not final and time.time() - self._last_event >= self.progress_event_seconds:
                self._last_event = time.time()
                self.on_progress(snapshot)
