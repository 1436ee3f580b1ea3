"""The composition root. `Runtime` = the settings + the backends a handler may use, typed
against their protocols; `Runtime.local()` wires the embedded defaults (SQLite jobs, files under
the data dir, in-process worker threads, the tiny built-in models), `Runtime.modal()` the same
object from Modal's primitives (see modal_app.py). The one place that knows every implementation.

Settings are read live: every service holds the one `Settings` object and reads a knob when it
uses it, so update_server (which changes that object in place) applies at once to everything it
reports as changed; the knobs that shape what was built at start-up are `infra.settings.RESTART_ONLY`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from infra.catalog.known import BUILTIN_MODELS
from infra.catalog.weights import WeightsStore
from infra.engine.protocol import Engine
from infra.jobs.cleaner import CacheCleaner
from infra.jobs.dispatch import Dispatcher, LocalDispatcher
from infra.jobs.modal_dispatch import ModalHandles
from infra.jobs.store import JobStore, SqliteJobStore
from infra.jobs.usage import SqliteUsageStore, UsageMeter
from infra.jobs.webhooks import WebhookSender
from infra.settings import Settings
from infra.storage.config_store import ConfigStore, FileConfigStore
from infra.storage.outputs import LocalStorage, OutputStorage

log = logging.getLogger(__name__)

VERSION = "0.1.0"

def make_engine(settings: Settings, weights: WeightsStore) -> Engine:
    """The engine (torch, diffusers): imported only when the first job needs it."""
    from infra.engine.engine import DiffusersEngine

    return DiffusersEngine(settings, weights)


def prepare_model(category: str | None, download, out, precision: str, upcast_attention: bool, base=None) -> dict:
    """The engine side of a model load (`infra.catalog.loader.Prepare`), imported on first use."""
    from infra.engine.files.convert import prepare_model as prepare

    return prepare(category, download, out, precision, upcast_attention, base)


@dataclass
class Runtime:
    settings: Settings
    jobs: JobStore
    storage: OutputStorage
    weights: WeightsStore
    dispatcher: Dispatcher
    webhooks: WebhookSender
    cleaner: CacheCleaner
    usage: UsageMeter
    config: ConfigStore
    on_modal: bool = False  # on Modal: containers come and go, so start-up does not treat running jobs as dead
    version: str = VERSION

    @classmethod
    def local(cls, settings: Settings | None = None) -> Runtime:
        settings = settings or Settings()
        jobs = SqliteJobStore(settings.db_path)
        config = FileConfigStore(settings.data_dir / "config")
        storage = OutputStorage(LocalStorage(settings.outputs_dir), config, settings)
        weights = WeightsStore(settings.weights_dir)
        webhooks = WebhookSender(jobs, settings)
        usage = UsageMeter(SqliteUsageStore(settings.data_dir / "usage.sqlite3"), settings)
        dispatcher = LocalDispatcher(settings, jobs, storage, weights, webhooks, usage,
                                     make_engine=lambda: make_engine(settings, weights), prepare_model=prepare_model)
        cleaner = CacheCleaner(storage, jobs, weights, settings)
        return cls(settings, jobs, storage, weights, dispatcher, webhooks, cleaner, usage, config)

    @classmethod
    def modal(cls, handles: ModalHandles, settings: Settings | None = None) -> Runtime:
        """The runtime on Modal (see modal_app.py): jobs, their queue, run-time config and usage in
        `modal.Dict`s, work handed to the GPU class and loads to the download function (the handles'
        spawns), job webhooks to the delivery function (unless this is it), outputs on a Volume
        (committed after each write, reloaded on a miss) or in the S3 bucket set with update_s3 or
        SDAPI_S3_CONFIG, weights on a Volume (committed after each manifest change, reloaded before
        reads). No torch is imported here."""
        from infra.jobs.dict_store import DictJobStore
        from infra.jobs.modal_dispatch import ModalDispatcher
        from infra.jobs.usage import DictUsageStore
        from infra.jobs.webhooks import SpawnedWebhooks
        from infra.storage.config_store import DictConfigStore

        settings = settings or Settings()
        job_store = DictJobStore(handles.jobs, handles.inputs, handles.queue)
        config_store = DictConfigStore(handles.config)
        local = LocalStorage(settings.outputs_dir, on_write=handles.commit_outputs, on_miss=handles.reload_outputs)
        storage = OutputStorage(local, config_store, settings, on_modal_volume=True)
        weights = WeightsStore(settings.weights_dir, on_write=handles.commit_weights, refresh=handles.reload_weights)
        sender = WebhookSender(job_store, settings)
        webhooks = sender if handles.spawn_webhook is None else SpawnedWebhooks(handles.spawn_webhook, sender)
        dispatcher = ModalDispatcher(handles, job_store, weights, config_store, settings, webhooks)
        cleaner = CacheCleaner(storage, job_store, weights, settings)
        meter = UsageMeter(DictUsageStore(handles.usage), settings)
        return cls(settings, job_store, storage, weights, dispatcher, webhooks, cleaner, meter, config_store, on_modal=True)

    def start(self) -> None:
        if not self.on_modal:  # locally a start means the previous process is gone; on Modal it does not
            self.weights.recover("The server restarted while this model was loading; load it again.")
            if self.settings.build_tiny_models:
                self.ensure_builtin_models()
        self.usage.start()
        self.dispatcher.start()
        if not self.on_modal:
            self.recover_jobs()
        self.cleaner.start()

    def recover_jobs(self) -> tuple[list[int], list[int]]:
        """Jobs a dead worker left `processing`: run again while they have attempts left, else
        failed (and their webhooks called). Locally at start-up; on Modal from the scheduled
        cleaner (the Dict store counts a job dead when nothing was heard from it for a long time)."""
        attempts = self.settings.job_attempts
        queued, failed = self.dispatcher.recover(
            attempts, f"The server stopped while this job was running ({attempts} attempts); please submit it again."
        )
        if queued or failed:
            log.warning("jobs left by a dead worker: %d queued again, %d failed", len(queued), len(failed))
        for job_id in failed:
            self.webhooks.job_finished(self.jobs.get(job_id))
        return queued, failed

    def stop(self) -> None:
        self.cleaner.stop()
        self.dispatcher.stop()
        self.webhooks.stop()
        self.usage.stop()

    def ensure_builtin_models(self) -> None:
        """Build the tiny built-in models into the weights store if they are not there yet."""
        for model_id, category in BUILTIN_MODELS.items():
            entry = self.weights.get(model_id)
            if entry is not None and entry.status == "ready":
                continue
            if entry is not None:
                self.weights.delete(model_id)
            from infra.engine import LOAD_LOCK
            from infra.engine.files.tiny import build_tiny_motion_adapter, build_tiny_pipeline, build_tiny_svd

            def build(folder, category=category):
                if category == "motion_adapter":
                    build_tiny_motion_adapter(folder)
                elif category == "image_to_video":
                    build_tiny_svd(folder)
                else:
                    build_tiny_pipeline(folder, inpaint=category == "inpaint")

            log.info("building the built-in model %s", model_id)
            with LOAD_LOCK:
                self.weights.install(model_id, category, build, source="built-in (random weights)",
                                    family="svd" if category == "image_to_video" else "sd")
