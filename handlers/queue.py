"""fetch (the state of any job by id; never creates work) and what every job endpoint shares:
submitting a job and answering with its envelope, output keys, expiry, size limits."""

from __future__ import annotations

import time

from infra.net.fetcher import check_url
from infra.jobs.store import Job
from infra.limits import check_job_cap
from models.errors import BadInput, NotFound
from models.requests import FetchRequest
from models.responses import JobResponse, job_response


def fetch(req: FetchRequest, rt) -> JobResponse:
    job = rt.jobs.get(req.request_id)
    if job is None:
        raise NotFound(
            f"Request id not found: {req.request_id}",
            tip="Use the `id` returned by a generation request on this server.",
        )
    return job_envelope(job, rt)


def job_envelope(job, rt) -> JobResponse:
    return job_response(job, fetch_result=rt.url(f"/api/v1/enterprise/fetch/{job.id}"), eta=remaining_seconds(job, rt))


def remaining_seconds(job, rt) -> float:
    """Estimated seconds until the job is done: its own estimate, plus the queue when not started."""
    if job.done:
        return 0.0
    if job.started_at:
        return max(0.5, job.started_at + job.eta - time.time())
    _, queued = rt.jobs.unfinished()
    return max(0.5, queued)


# --------------------------------------------------------------------------- shared by job endpoints


def submit_job(endpoint: str, params: dict, meta: dict, output_keys: list[str], inputs: dict, req, rt) -> JobResponse:
    """Create the job with its output links fixed, hand it to the dispatcher and wait up to the
    sync budget: `success` if it finished by then, `processing` with `fetch_result` if not."""
    check_job_cap(rt.jobs, rt.caller, rt.settings)
    if req.webhook:
        check_url(req.webhook, "webhook", rt.settings.fetch_allowlist)
    params["storage"] = rt.storage.current_id  # the outputs land where the links say, even if storage changes
    links = [rt.storage.url(key, rt.base_url, expires_at=params.get("expires_at")) for key in output_keys]
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
        owner=rt.caller,
    )
    job = rt.jobs.create(job, inputs)
    rt.dispatcher.submit(job.id)
    budget = 0.0 if getattr(req, "instant_response", False) else rt.settings.sync_timeout
    return job_envelope(rt.jobs.wait(job.id, budget), rt)


def output_key(name: str, base64: bool, suffix: str = ".png") -> str:
    """Where an output is stored: `base64: yes` outputs are text files of the base64 of the PNG."""
    return f"generations/{name}{'.base64' if base64 else suffix}"


def expiry(temp: bool, settings) -> dict:
    """`temp: yes` -> the time the outputs stop being served (and the cleaner deletes them)."""
    return {"expires_at": time.time() + settings.temp_output_seconds} if temp else {}


def check_output_size(width: int, height: int, what: str, settings) -> None:
    if width * height > settings.max_output_pixels:
        raise BadInput(
            f"{what}: the output would be {width}x{height}, more than the {settings.max_output_pixels} pixels "
            "this server produces",
            tip="Send a smaller image or ask for a lower scale.",
        )


def yes_no(flag) -> str:
    return "yes" if flag else "no"
