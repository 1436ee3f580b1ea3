"""The GPU worker's body on Modal, and the downloader's: plain Python that modal_app's `Worker` class
and `download_model` function call, and that tests drive through the Modal stand-in.

A Worker container's life, under Modal's memory snapshots (../shared/notes/modal-semantics.md):
1. `for_snapshot` (the `snap=True` hook, once per deployment and GPU class): imports and the default
   model's weights in memory — on the GPU with Modal's GPU snapshot, else on the CPU in the dtype the
   GPU runs (fp16; bf16 for a transformer family), so a restore only copies it over. A GPU class that
   does not run the default model's family (SDAPI_MODAL_FAMILY_GPUS) holds the imports only.
2. `after_restore` (the `snap=False` hook, in every container, the first included): everything the
   snapshot froze that must be this container's own — the runtime (settings, keys, secrets and the
   stores, read from the environment as it is now), the restart generation of this container's
   start, the models moved to the device, the default model loaded if the snapshot had none yet.
3. `run(job_id, input_id)` per input: the job through `execute_job`, with the input id as its
   runner so a re-delivered input takes its job up again; a job whose models are still loading is
   given back at once (it waits off the GPU; the downloader releases it when they are), and a
   container started before a restart_server / update_server / clear_cache gives its job back for a
   fresh one and stops taking inputs. Either way its slot is free after: the next job in the fair
   queue is spawned (`ModalDispatcher.fill`). Webhooks leave with a spawn.
4. `stop` (`@modal.exit`): what is counted is written.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from infra.catalog.loader import run_load
from infra.catalog.weights import LOADING, READY, LoadRequest
from infra.jobs.dispatch import execute_job
from infra.jobs.modal_dispatch import MEMORY_REPORT
from infra.storage.base import reload_volume

if TYPE_CHECKING:
    from infra.runtime import Runtime

log = logging.getLogger(__name__)

WEBHOOK_FLUSH_SECONDS = 30  # the downloader delivers its load event before its container may go
HAND_OUT_WAIT_SECONDS = 10  # a stopping GPU container lets its last hand-out of the next job finish


class ModalWorker:
    def __init__(self, runtime: Runtime, device: str = "cpu", dtype: str | None = None,
                 serves: Callable[[str], bool] | None = None):
        """`serves(family)`: whether this GPU class runs that model family's jobs (default: every family)."""
        from infra.engine.engine import DiffusersEngine

        self.runtime = runtime
        self.serves = serves or (lambda family: True)
        self.engine = DiffusersEngine(runtime.settings, runtime.weights, device=device, dtype=dtype)
        self.generation = runtime.config.generation()
        self._compile_cache = _folder_fingerprint(runtime.settings.compile_cache_dir)
        self._hand_outs: list[threading.Thread] = []  # hand-outs of the next job under way
        self._reported: dict = {}  # the memory report this container last wrote

    @classmethod
    def for_snapshot(cls, runtime: Runtime, gpu_snapshot: bool,
                     serves: Callable[[str], bool] | None = None) -> ModalWorker:
        """Before the memory snapshot: the engine with the default model loaded (where this class
        `serves` its family), on the GPU with Modal's GPU snapshot, else on the CPU in the GPU's
        dtype (fp16 asked: the engine takes bf16 for a transformer family)."""
        worker = cls(runtime, device="cuda" if gpu_snapshot else "cpu", dtype="fp16", serves=serves)
        worker.warm()
        return worker

    def after_restore(self, runtime: Runtime, reload_weights: Callable[[], None] | None = None) -> None:
        """After each restore: this container's runtime and generation, the models on the device
        (the setting `device`: auto = the GPU), the default model loaded if it was not yet."""
        self.runtime = runtime
        self.engine.rebind(runtime.settings, runtime.weights)
        self.generation = runtime.config.generation()
        self._compile_cache = _folder_fingerprint(runtime.settings.compile_cache_dir)
        self.engine.move_to(runtime.settings.device)
        default = runtime.settings.default_model_id
        if default not in self.engine.loaded():
            if runtime.weights.get(default) is None and reload_weights is not None:
                reload_volume(reload_weights)  # loaded by the downloader after the snapshot was taken
            self.warm()

    def warm(self) -> None:
        """Load the default model (before the memory snapshot: into CPU memory), unless its family's
        jobs go to another GPU class."""
        try:
            entry = self.runtime.weights.get(self.runtime.settings.default_model_id)
            if entry is not None and entry.family and not self.serves(entry.family):
                log.info("the default model %s (%s) runs on another GPU class", entry.model_id, entry.family)
                return
            self.engine.warm(self.runtime.settings.default_model_id)
        except Exception:  # no default model on the Volume yet: jobs load what they need
            log.warning("the default model is not loaded yet: %s", self.runtime.settings.default_model_id)

    def move_to(self, device: str) -> None:
        self.engine.move_to(device)

    def run(self, job_id: int, input_id: str | None = None, reload_weights: Callable[[], None] | None = None) -> str:
        """One job to its end; its status. The weights Volume is reloaded first when a model it needs
        is not visible in this container yet (loaded by another container after this one started);
        a reload that keeps failing (a file on the Volume held open) does not stop the job."""
        try:
            return self._run(job_id, input_id, reload_weights)
        finally:
            self._hand_out_next()

    def _run(self, job_id: int, input_id: str | None, reload_weights: Callable[[], None] | None) -> str:
        runtime = self.runtime
        job = runtime.jobs.get(job_id)
        if job is None:
            return "missing"
        if job.done:
            return job.status
        if self.outdated() and not job.runner:  # restart_server / update_server since this container started:
            runtime.dispatcher.hand_back(job)  # the job goes to a fresh container (this one stops taking inputs)
            return "handed on"
        if reload_weights is not None and any(runtime.weights.get(model_id) is None for model_id in job.models_used()):
            reload_volume(reload_weights)
        if any(getattr(runtime.weights.get(m), "status", READY) == LOADING for m in job.await_models):
            runtime.dispatcher.hand_back(job)  # not on a GPU: it waits for its models off the GPU
            return "waiting"
        finished = execute_job(job_id, runtime.jobs, runtime.storage, lambda: self.engine, runtime.webhooks,
                               runtime.weights, runtime.usage, runner=input_id, max_attempts=runtime.settings.job_attempts,
                               settings=runtime.settings)
        self._report_memory()
        return finished.status if finished else "missing"

    def _report_memory(self) -> None:
        """What this container's engine applied per loaded model (dtype, quantization, offloaded
        text encoders, fast path: `DiffusersEngine.memory_report`) into the config store, where the
        web tier's system_details reads it (`ModalDispatcher.memory_report`). Merged with what the
        other containers of this generation wrote (a report of an older generation is dropped:
        restart_server, delete_model); written only when it changed. A failure here fails no job."""
        try:
            mine = {model_id: {**report, "device": self.engine.device_name}
                    for model_id, report in self.engine.memory_report().items()}
            if not mine or mine == self._reported:
                return
            config = self.runtime.config
            known = json.loads(config.get(MEMORY_REPORT) or "{}")
            if known.get("generation", -1) > self.generation:
                return  # this container is outdated: it stops taking inputs
            if known.get("generation") != self.generation:
                known = {"generation": self.generation, "models": {}}
            known["models"].update(mine)
            config.put(MEMORY_REPORT, json.dumps(known))
            self._reported = mine
        except Exception:
            log.warning("could not write the memory report", exc_info=True)

    def _hand_out_next(self) -> None:
        """This input's slot is free: the next job in the fair order is spawned (it then usually runs
        on this very container). On a thread of its own, so that this input ends now and the
        container takes its next one while the hand-out's Dict round trips are under way; `stop`
        waits for it. A failure here fails no job: the next fill anywhere, at the latest the
        recovery pass, hands it out."""
        def hand_out() -> None:
            try:
                self.runtime.dispatcher.fill()
            except Exception:
                log.exception("could not hand out the next job")

        thread = threading.Thread(target=hand_out, name="hand-out", daemon=True)
        thread.start()
        self._hand_outs = [t for t in self._hand_outs if t.is_alive()] + [thread]

    def compile_cache_grew(self) -> bool:
        """True once after a job added to the persistent compile cache (SDAPI_COMPILE_CACHE_DIR, its
        own Volume on Modal): the caller commits it so new containers start compiled."""
        now = _folder_fingerprint(self.runtime.settings.compile_cache_dir)
        grew, self._compile_cache = now != self._compile_cache, now
        return grew

    def outdated(self) -> bool:
        """True when restart_server / clear_cache asked for fresh containers after this one started."""
        return self.runtime.config.generation() > self.generation

    def stop(self) -> None:
        """The container is going (`@modal.exit`): the hand-outs under way finish, what is counted
        is written."""
        for thread in self._hand_outs:
            thread.join(HAND_OUT_WAIT_SECONDS)
        self.runtime.usage.flush()


def run_download(runtime: Runtime, request: dict) -> str:
    """A model load on the download function: the same `run_load` as locally; then the jobs that
    waited for it are spawned (or failed with its reason). Its outcome."""
    from infra.engine.files.convert import prepare_model

    load = LoadRequest(**request)
    run_load(load, runtime.weights, runtime.settings, runtime.webhooks.post_event, prepare_model)
    runtime.dispatcher.model_loaded(load.model_id)
    runtime.webhooks.wait_idle(WEBHOOK_FLUSH_SECONDS)
    entry = runtime.weights.get(load.model_id)
    return entry.status if entry is not None else "missing"


def deliver_webhook(runtime: Runtime, job_id: int, timeout: float) -> str:
    """The delivery function's body: the job's webhook, with every retry the settings allow."""
    job = runtime.jobs.get(job_id)
    if job is None or not job.webhook:
        return "no webhook"
    runtime.webhooks.job_finished(job)
    runtime.webhooks.wait_idle(timeout)
    delivered = runtime.jobs.get(job_id)
    return delivered.webhook_status if delivered is not None else "missing"


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
