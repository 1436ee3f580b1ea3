"""What every job endpoint shares, from a request to its answer: reading image inputs, the
checks a job must pass (model, scheduler, output size), then `submit_job`, the one step with
side effects, and the envelope of a job (`job_envelope`, also fetch's answer).

The order is the contract: a handler checks everything a client could get wrong first, and only
then calls `submit_job`, which checks the key's job cap and the webhook URL, starts the loads of
models fetched on first use, creates the job with its output links fixed and hands it to the
dispatcher. It returns `Submitted`: the web layer waits for the job up to the sync budget without
holding a thread (`success` if it finished by then, `processing` with `fetch_result` if not), then
answers with `job_envelope`. A refused request leaves nothing behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from handlers import ondemand
from handlers.caller import Caller
from infra.catalog.weights import PIPELINE_CATEGORIES, ModelEntry
from infra.jobs.job import Job
from infra.jobs.params import JobParams
from infra.limits import check_job_cap
from infra.net.fetcher import check_url
from infra.net.inputs import decode_image
from infra.net.inputs import load_image as fetch_image
from models.errors import ApiError, BadInput, NotFound
from models.responses import JobResponse, job_response
from models.schedulers import SchedulerError, resolve_algorithm, resolve_name

if TYPE_CHECKING:
    from infra.runtime import Runtime


# --------------------------------------------------------------------------- inputs and checks


def load_image(ref: str, field: str, rt: Runtime, caller: Caller) -> Image.Image:
    """An image input (URL, base64, data URI). A link to this server's own files (an upload_image
    URL, an earlier output) is read from storage directly, not fetched over HTTP."""
    own = rt.storage.url("", caller.base_url)
    if caller.base_url and ref.startswith(own):
        path = rt.storage.open_path(ref[len(own):])
        if path is None:
            raise NotFound(f"{field}: {ref} is not (or no longer) stored on this server")
        return decode_image(path.read_bytes(), field, ref, rt.settings.max_input_image_pixels)
    return fetch_image(ref, field, rt.settings)


def resolve_model(task: str, requested: str | None, rt: Runtime, inpainting: bool = False) -> ModelEntry | ondemand.Pending:
    """The pipeline model a request runs on (the default when it names none or a placeholder),
    checked once to exist, be ready and suit the task; or, for a default model with a source
    (settings default_model_source, default_inpaint_model_source) that is not loaded yet, the load
    the job will wait for."""
    settings = rt.settings
    if requested is None or requested in settings.placeholder_model_ids:
        inpaint = task == "inpaint"
        requested = settings.default_inpaint_model_id if inpaint else settings.default_model_id
        source = settings.default_inpaint_model_source if inpaint else settings.default_model_source
        if source:
            needed = ondemand.require_default(requested, source, rt)
            if isinstance(needed, ondemand.Pending):
                return needed
    entry = rt.weights.require(requested, PIPELINE_CATEGORIES)
    if entry.category == "inpaint" and not inpainting:
        raise BadInput(
            f"Model {requested} is an inpainting model; use it with the inpaint endpoint (or controlnet with a mask_image)",
            tip=f"Pick a text-to-image model for {task} (get_all_models lists them).",
        )
    return entry


def resolve_scheduler(requested: str | None, algorithm_type: str, model: ModelEntry | None,
                      rt: Runtime) -> tuple[str | None, str | None]:
    """(scheduler class name, diffusers algorithm_type or None); default: the model's own scheduler
    (None while the model is still to be loaded: the engine takes the model's own, and meta says which)."""
    try:
        if not requested and model is None:
            return None, None
        name = resolve_name(requested) if requested else rt.weights.default_scheduler(model.model_id)
        algorithm = resolve_algorithm(name, algorithm_type)
    except SchedulerError as exc:
        field = "algorithm_type" if "algorithm_type" in str(exc) else "scheduler"
        raise ApiError({field: [str(exc)]}, status_code=422) from None
    return name, algorithm


def enhance_prompt(prompt: str, suffix: str) -> str:
    """Deterministic prompt enhancement: append the quality terms of `suffix` the prompt lacks."""
    have = prompt.lower()
    missing = [term.strip() for term in suffix.split(",") if term.strip() and term.strip().lower() not in have]
    return ", ".join([prompt.rstrip(" ,"), *missing]) if missing else prompt


def check_output_size(width: int, height: int, what: str, settings) -> None:
    if width * height > settings.max_output_pixels:
        raise BadInput(
            f"{what}: the output would be {width}x{height}, more than the {settings.max_output_pixels} pixels "
            "this server produces",
            tip="Send a smaller image or ask for a lower scale.",
        )


def output_key(name: str, base64: bool, suffix: str = ".png") -> str:
    """Where an output is stored: `base64: yes` outputs are text files of the base64 of the PNG."""
    return f"generations/{name}{'.base64' if base64 else suffix}"


def expiry_at(temp: bool, settings) -> float | None:
    """`temp: yes` -> the time the outputs stop being served (and the cleaner deletes them)."""
    return time.time() + settings.temp_output_seconds if temp else None


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Submitted:
    """A job handed to the dispatcher, and how long its request may wait for it (the web layer
    waits asynchronously, then answers with `job_envelope`)."""

    job: Job
    budget: float


def submit_job(endpoint: str, params: JobParams, meta: dict, output_keys: list[str], inputs: dict[str, bytes], req,
               rt: Runtime, caller: Caller, pending: Iterable[ondemand.Pending] = ()) -> Submitted:
    """Create the job with its output links fixed and hand it to the dispatcher. `pending`: models
    fetched on first use that the job waits for."""
    # 1. the last checks: the key's job cap, the webhook URL
    check_job_cap(rt.jobs, caller.key_id, rt.settings)
    if req.webhook:
        check_url(req.webhook, "webhook", rt.settings.fetch_allowlist)
    # 2. accepted: start the fetches, fix where the outputs go (even if storage changes meanwhile)
    await_models = ondemand.start(pending, rt)
    storage_id = rt.storage.current_id
    expires_at = expiry_at(req.temp, rt.settings)
    links = [rt.storage.url(key, caller.base_url, expires_at=expires_at, storage_id=storage_id) for key in output_keys]
    # 3. the job, queued; the web layer waits for it
    job = Job(
        id=0,
        endpoint=endpoint,
        params=params,
        meta=meta,
        output_keys=output_keys,
        future_links=links,
        eta=rt.dispatcher.estimate(params),
        webhook=req.webhook,
        track_id=req.track_id,
        owner=caller.key_id,
        storage_id=storage_id,
        expires_at=expires_at,
        await_models=await_models,
    )
    job = rt.jobs.create(job, inputs)
    rt.dispatcher.submit(job)
    return Submitted(job, 0.0 if getattr(req, "instant_response", False) else rt.settings.sync_timeout)


def job_envelope(job: Job, rt: Runtime, caller: Caller) -> JobResponse:
    return job_response(job, fetch_result=caller.url(f"/api/v1/enterprise/fetch/{job.id}"), eta=remaining_seconds(job, rt))


def remaining_seconds(job: Job, rt: Runtime) -> float:
    """Estimated seconds until the job is done: its own estimate, plus the queue when not started."""
    if job.done:
        return 0.0
    if job.started_at:
        return max(0.5, job.started_at + job.eta - time.time())
    _, queued = rt.jobs.unfinished()
    return max(0.5, queued)
