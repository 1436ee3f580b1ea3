"""fetch: the state of any job by id (also `fetch/{id}`, `video/fetch/{id}`, `fetch_queue_image`);
never creates work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.caller import Caller
from handlers.submit import job_envelope
from models.errors import NotFound
from models.requests import FetchRequest
from models.responses import JobResponse

if TYPE_CHECKING:
    from infra.runtime import Runtime


def fetch(req: FetchRequest, rt: Runtime, caller: Caller) -> JobResponse:
    job = rt.jobs.get(req.request_id)
    if job is None:
        raise NotFound(
            f"Request id not found: {req.request_id}",
            tip="Use the `id` returned by a generation request on this server.",
        )
    return job_envelope(rt.dispatcher.check(job), rt, caller)
