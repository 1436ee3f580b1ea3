"""Server admin endpoints: restart_server, update_server, clear_cache, clear_queue.

What each does, locally (the Modal deployment maps them onto its containers, see modal_app.py):
- restart_server: a fresh engine — loaded models, pipelines and torch state dropped, the default
  model warmed again in the background. Queued jobs stay queued; a running job finishes.
- update_server: settings read again (environment and `.env`) and applied where they can change
  in a running process; the ones that need a process restart are named. The catalog is the
  weights store on disk, read on every request; the reply counts it. On Modal the web container
  that answers re-reads its environment, and the GPU workers are retired (the generation in the
  config Dict) so containers started afterwards read theirs.
- clear_cache: models unloaded from memory, plus one pass of the cache cleaner (expired outputs,
  old job records, download scratch). Reports what it freed.
- clear_queue: jobs not yet started end `failed` ("cancelled") and notify their webhooks;
  running jobs finish.
- update_s3: new outputs go to an S3-compatible bucket, once a test write there succeeded; the
  setting survives restarts. The secret key is stored, never returned or logged.
- reset_s3: back to the server's own storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.caller import Caller
from infra.catalog.weights import READY
from infra.net.fetcher import check_url
from infra.settings import RESTART_ONLY, Settings
from infra.storage.base import StorageError
from infra.storage.outputs import parse_s3_config
from models.errors import BadInput
from models.requests import KeyOnlyRequest, ResetS3Request, UpdateS3Request
from models.responses import MessageResponse

if TYPE_CHECKING:
    from infra.runtime import Runtime



def restart_server(req: KeyOnlyRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    queued, _ = rt.jobs.unfinished()
    unloaded = rt.dispatcher.restart()
    return MessageResponse(
        message="server restarting",
        models_unloaded=unloaded,
        jobs_kept=queued,
        tip="Queued jobs run when the engine is back; system_details shows its state.",
    )


def update_server(req: KeyOnlyRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    fresh = Settings()
    try:  # a broken default bucket is refused whole: no setting changes
        parse_s3_config(fresh.s3_config)
    except ValueError as exc:
        raise BadInput(f"The settings were not applied: {exc}", tip="Fix SDAPI_S3_CONFIG and call update_server again.") from None
    changed, needs_restart = [], []
    for name in Settings.model_fields:
        if getattr(fresh, name) == getattr(rt.settings, name):
            continue
        if name in RESTART_ONLY:
            needs_restart.append(name)
        else:
            setattr(rt.settings, name, getattr(fresh, name))
            changed.append(name)
    models = [entry.model_id for entry in rt.weights.list() if entry.status == READY]
    if rt.on_modal:  # the GPU containers read their settings at start: retire them so fresh ones start
        rt.dispatcher.restart()
    return MessageResponse(
        message="server updated",
        version=rt.version,
        settings_changed=changed,
        needs_restart=needs_restart,
        model_count=len(models),
        workers_restarted=rt.on_modal,
    )


def clear_cache(req: KeyOnlyRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    unloaded = rt.dispatcher.unload_models()
    report = rt.cleaner.clean()
    return MessageResponse(message="Cache cleared successfully", models_unloaded=unloaded, **report)


def clear_queue(req: KeyOnlyRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    cancelled = rt.jobs.cancel_queued("Cancelled by clear_queue before it started; please submit it again.")
    for job_id in cancelled:
        job = rt.jobs.get(job_id)
        if job is not None:
            rt.dispatcher.cancelled(job)  # out of the queue (on Modal its call is cancelled too)
        rt.webhooks.job_finished(job)
    return MessageResponse(
        message=f"Queue cleared: {len(cancelled)} queued job(s) cancelled; running jobs finish",
        cancelled=cancelled,
    )


def update_s3(req: UpdateS3Request, rt: Runtime, caller: Caller) -> MessageResponse:
    from infra.storage.s3 import S3Config

    config = S3Config.from_request(req, rt.settings.s3_acl)
    # the server connects to both: public addresses only (a bucket on a private network: allowlist its host)
    allowlist = rt.settings.fetch_allowlist
    check_url(config.endpoint_url, "endpoint_url", allowlist)
    check_url(config.public_url, "public_url", allowlist)
    try:
        warnings = rt.storage.use_s3(config, allowlist)
    except StorageError as exc:
        raise BadInput(
            f"The S3 settings were not applied: {exc}",
            tip="Check endpoint_url, the bucket, the keys and that they may PutObject and GetObject there.",
        ) from None
    return MessageResponse(message="S3 storage updated", storage=rt.storage.describe(), warnings=warnings)


def reset_s3(req: ResetS3Request, rt: Runtime, caller: Caller) -> MessageResponse:
    rt.storage.reset()
    return MessageResponse(message="Storage reset to the server's default", storage=rt.storage.describe())

