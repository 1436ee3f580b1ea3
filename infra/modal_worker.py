"""The GPU worker's side on Modal: one container of `modal_app.Worker` runs jobs through the same
`execute_job` as the local worker threads, with an engine that can be built on the CPU (for the
memory snapshot) and moved to the GPU after the restore.

Kept out of modal_app.py so it is plain Python that tests can drive with stand-ins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from infra.catalog.loader import run_load
from infra.catalog.weights import LoadRequest
from infra.jobs.dispatch import execute_job

if TYPE_CHECKING:
    from infra.runtime import Runtime

log = logging.getLogger(__name__)

WEBHOOK_FLUSH_SECONDS = 30  # a container may be reclaimed after its input: deliver webhooks first


class ModalWorker:
    def __init__(self, runtime: Runtime, device: str = "cpu"):
        from infra.engine.engine import DiffusersEngine

        self.runtime = runtime
        self.engine = DiffusersEngine(runtime.settings, runtime.weights, device=device)
        self.generation = runtime.config.generation()
        self._compile_cache = _folder_fingerprint(runtime.settings.compile_cache_dir)

    def warm(self) -> None:
        """Load the default model (before the memory snapshot: into CPU memory)."""
        try:
            self.engine.warm(self.runtime.settings.default_model_id)
        except Exception:  # no default model on the Volume yet: jobs load what they need
            log.exception("could not warm the default model")

    def move_to(self, device: str) -> None:
        self.engine.move_to(device)

    def run(self, job_id: int, reload_weights: Callable[[], None] | None = None) -> str:
        """One job to its end; the weights Volume is reloaded first when a model it needs is not
        visible in this container yet (loaded by another container after this one started)."""
        runtime = self.runtime
        job = runtime.jobs.get(job_id)
        if job is None:
            return "missing"
        if reload_weights is not None and any(runtime.weights.get(model_id) is None for model_id in job.models_used()):
            reload_weights()
        finished = execute_job(
            job_id, runtime.jobs, runtime.storage, lambda: self.engine, runtime.webhooks, runtime.weights, runtime.usage
        )
        runtime.webhooks.wait_idle(WEBHOOK_FLUSH_SECONDS)
        return finished.status if finished else "missing"

    def compile_cache_grew(self) -> bool:
        """True once after a job added to the persistent compile cache (SDAPI_COMPILE_CACHE_DIR, on the
        weights Volume on Modal): the caller commits the Volume so new containers start compiled."""
        now = _folder_fingerprint(self.runtime.settings.compile_cache_dir)
        grew, self._compile_cache = now != self._compile_cache, now
        return grew

    def outdated(self) -> bool:
        """True when restart_server / clear_cache asked for fresh containers after this one started."""
        return self.runtime.config.generation() > self.generation


def run_download(runtime: Runtime, request: dict) -> str:
    """A model load on the download function: the same `run_load` as locally; its outcome."""
    from infra.engine.files.convert import prepare_model

    load = LoadRequest(**request)
    run_load(load, runtime.weights, runtime.settings, runtime.webhooks.post_event, prepare_model)
    runtime.webhooks.wait_idle(WEBHOOK_FLUSH_SECONDS)
    entry = runtime.weights.get(load.model_id)
    return entry.status if entry is not None else "missing"


def _folder_fingerprint(folder) -> tuple[int, int]:
    """(files, bytes) under `folder`; (0, 0) when it is not set or not there."""
    files = size = 0
    if folder is None:
        return files, size
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(root, name))
                files += 1
            except OSError:
                continue
    return files, size
