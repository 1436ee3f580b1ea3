"""fetch: the state of any job by id. Never creates work."""

from __future__ import annotations

import time

from models.errors import NotFound
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
