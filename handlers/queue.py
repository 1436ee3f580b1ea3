"""Following a job: fetch (its state by id; also `fetch/{id}`, `video/fetch/{id}`,
`fetch_queue_image`), cancel (also `cancel/{id}`), the event stream of its progress
(`stream/{id}`) and its preview image. None of them creates work.

- fetch answers the job's envelope (`handlers.submit.job_envelope`: progress and queue position
  while it is processing). A queued job whose deadline passed is cancelled when it is looked at.
- cancel: a queued job never starts, a running one stops at its next denoising step; either way
  it ends `failed` with `"message": "Cancelled by the client"` and `"cancelled": true`, and its
  webhook is called once. Another key's job is a 404 (as if it did not exist); a job that ended is
  a 409 naming its state. The answer is the job's envelope once it stopped (waited for up to
  CANCEL_WAIT_SECONDS, like a generation waits).
- queue (ours, admin keys): every job queued or running, whatever its key: id, key id (never the
  key), endpoint, model, priority, state (`queued` / `running`), progress, eta and queue position;
  running jobs first, then in start order; with the counts per key and priority. It reads the
  store, so locally and on Modal it lists the same jobs. At most QUEUE_LIST_LIMIT queued jobs are
  listed (those first by priority, then age); `unlisted` counts the rest.
- queue_cancel (ours, admin keys): cancel as above, for any key's job (the operator's cancel);
  the job ends `failed` with `"message": "Cancelled by the operator"` and `"cancelled": true`.
- stream: server-sent events. `progress` on every change of the job's progress (id = the
  snapshot's `seq`; data = the body fetch would return at that moment), then one `result` event
  with exactly fetch's body, then the stream closes. With `Last-Event-ID` the snapshots after that
  id are sent first (a client that reconnects misses none). A stream that would outlive
  `stream_max_seconds` (on Modal: inside the web function's limits) ends with a `reconnect` event
  carrying the last id sent and the `retry` hint; reconnecting with it goes on where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

from handlers.caller import Caller
from handlers.submit import Submitted, job_envelope
from infra.jobs.job import PRIORITIES, Job
from infra.jobs.progress import CANCELLED, deadline_message, queued_snapshot, wire
from models.errors import Conflict, NotFound
from models.requests import CancelRequest, FetchRequest, KeyOnlyRequest
from models.responses import JobResponse, QueueResponse, job_response

if TYPE_CHECKING:
    from infra.runtime import Runtime

CANCEL_WAIT_SECONDS = 10.0  # a cancel answers once the running job stopped, or after this long
STREAM_LOOK_SECONDS = 1.0  # a stream looks at its job at least this often (sooner when the store tells of a change)
RETRY_MS = 1000  # the `retry` hint of the stream
CANCELLED_BY_OPERATOR = "Cancelled by the operator"
QUEUE_LIST_LIMIT = 100  # queued jobs `queue` lists with their place (the running ones are all listed)


def fetch(req: FetchRequest, rt: Runtime, caller: Caller) -> JobResponse:
    return job_envelope(current(req.request_id, rt), rt, caller)


def current(job_id: int, rt: Runtime) -> Job:
    """The job as it is now: checked with the dispatcher, and cancelled when it is queued past its
    deadline (a worker would cancel it at its start; nothing should wait for that)."""
    job = rt.jobs.get(job_id)
    if job is None:
        raise NotFound(f"Request id not found: {job_id}", tip="Use the `id` returned by a generation request on this server.")
    job = rt.dispatcher.check(job)
    if not job.done and job.started_at is None and job.deadline_at is not None and time.time() > job.deadline_at:
        job = _cancel_queued(job, deadline_message(job), rt) or rt.jobs.get(job_id) or job
    return job


def cancel(req: CancelRequest, rt: Runtime, caller: Caller) -> Submitted:
    job = rt.jobs.get(req.request_id)
    if job is None or job.owner != caller.key_id:
        raise NotFound(f"Request id not found: {req.request_id}",
                       tip="Cancel a job with the key that submitted it, by the `id` its request returned.")
    return _cancel(job, CANCELLED, rt)


def queue_cancel(req: CancelRequest, rt: Runtime, caller: Caller) -> Submitted:
    """The operator's cancel: any key's job (the route is for admin keys)."""
    job = rt.jobs.get(req.request_id)
    if job is None:
        raise NotFound(f"Request id not found: {req.request_id}", tip="queue lists the jobs queued or running.")
    return _cancel(job, CANCELLED_BY_OPERATOR, rt)


def _cancel(job: Job, message: str, rt: Runtime) -> Submitted:
    job = rt.dispatcher.check(job)
    if job.done:
        raise _ended(job)
    if job.started_at is None:
        ended = _cancel_queued(job, message, rt)
        if ended is not None:
            return Submitted(ended, 0.0)
    outcome = rt.jobs.request_cancel(job.id, message)  # running (or it started meanwhile): its worker stops it
    latest = rt.jobs.get(job.id) or job
    if outcome == "ended" and not latest.cancelled:  # it ended on its own meanwhile
        raise _ended(latest)
    return Submitted(latest, CANCEL_WAIT_SECONDS)


def list_queue(req: KeyOnlyRequest, rt: Runtime, caller: Caller) -> QueueResponse:
    """Every job queued or running, whatever its key (see the module docstring). The running jobs
    and the QUEUE_LIST_LIMIT queued ones that come first by priority and age are listed with their
    progress and place (a place is one read of the whole queue on Modal); `unlisted` counts the
    others, which `by_key` still counts."""
    jobs = [job for job in (rt.dispatcher.check(job) for job in rt.jobs.processing()) if not job.done]
    running = [job for job in jobs if job.started_at]
    waiting = sorted((job for job in jobs if not job.started_at),
                     key=lambda job: (PRIORITIES.index(job.priority), job.created_at))
    queue_eta = max(0.5, sum(job.eta for job in jobs))  # a queued job's eta: all the work before it and its own
    entries = []
    for job in running:
        body = job_envelope(job, rt, caller)
        if body.status == "processing":  # (it may have ended just now)
            entries.append(_listed(job, body.eta, body.progress.model_dump(mode="json", exclude_none=True)
                                   if body.progress else None, None))
    for job in waiting[:QUEUE_LIST_LIMIT]:
        entries.append(_listed(job, queue_eta, wire(queued_snapshot(job)), rt.dispatcher.queue_position(job)))
    entries.sort(key=lambda e: (e["state"] != "running", e["queue_position"] or 0, e["created_at"]))
    by_key: dict[str, dict] = {}
    for job in jobs:
        counts = by_key.setdefault(job.owner, {"queued": 0, "running": 0, "high": 0, "normal": 0, "low": 0})
        counts["running" if job.started_at else "queued"] += 1
        counts[job.priority] += 1
    return QueueResponse(jobs=entries, by_key=by_key, queue_by_priority=rt.dispatcher.queue_lengths(),
                         unlisted=max(0, len(waiting) - QUEUE_LIST_LIMIT))


def _listed(job: Job, eta: float, progress: dict | None, position: int | None) -> dict:
    return {
        "id": job.id, "key_id": job.owner, "endpoint": job.endpoint,
        "model_id": getattr(job.params, "model_id", None), "priority": job.priority,
        "state": "running" if job.started_at else "queued",
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at) if job.started_at else None,
        "eta": round(eta, 2), "queue_position": position, "progress": progress,
    }


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _ended(job: Job) -> Conflict:
    return Conflict(f"Job {job.id} has already ended: {job.status}" + (" (cancelled)" if job.cancelled else ""),
                    tip="Only queued or running jobs can be cancelled.")


def _cancel_queued(job: Job, message: str, rt: Runtime) -> Job | None:
    """End a queued job as cancelled (None when a worker started it meanwhile)."""
    if rt.jobs.request_cancel(job.id, message) != "cancelled":
        return None
    rt.dispatcher.cancelled(job)
    ended = rt.jobs.get(job.id)
    rt.webhooks.job_finished(ended)
    return ended


def preview(job_id: int, rt: Runtime) -> bytes:
    """The latest preview JPEG of a running job that asked for previews."""
    data = rt.jobs.preview(job_id)
    if data is None:
        raise NotFound(f"No preview for job {job_id}", tip="Previews exist while a `preview: yes` job runs.")
    return data


# --------------------------------------------------------------------------- the event stream


def _event(name: str, data: dict, event_id: int | str | None = None) -> str:
    lines = [f"event: {name}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"


async def stream(job_id: int, rt: Runtime, caller: Caller, last_event_id: int, max_seconds: float) -> AsyncIterator[str]:
    """The job's events (see the module docstring). The job must exist (checked before the stream
    starts, so a wrong id is a 404 envelope, not a stream)."""
    deadline = time.monotonic() + max_seconds
    sent = last_event_id  # the last snapshot seq the client has (0: none)
    queued_at: int | None = None  # the queue position last sent while the job waited
    yield f"retry: {RETRY_MS}\n\n"
    while True:
        since = rt.jobs.change_count()  # before the look: a change during it is not slept through
        job = await asyncio.to_thread(current, job_id, rt)
        history = await asyncio.to_thread(rt.jobs.progress, job_id) if job.started_at or job.done else []
        missed = [snapshot for snapshot in history if snapshot.get("seq", 0) > sent]
        if missed:
            body = await asyncio.to_thread(job_envelope, job, rt, caller) if not job.done else None
            for snapshot in missed:
                yield _event("progress", _progress_body(job, snapshot, body, caller), snapshot["seq"])
                sent = snapshot["seq"]
        elif not history and not job.done:  # queued: an event whenever its place in the queue changes
            body = await asyncio.to_thread(job_envelope, job, rt, caller)
            if body.status == "processing" and body.queue_position != queued_at:
                queued_at = body.queue_position
                yield _event("progress", body.model_dump(mode="json", exclude_none=True), 0)
        if job.done:
            final = await asyncio.to_thread(job_envelope, job, rt, caller)
            yield _event("result", final.model_dump(mode="json", exclude_none=True), "result")
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            yield _event("reconnect", {"message": "This stream reached its time limit; reconnect with the "
                                       "Last-Event-ID header to go on where it stopped.", "last_event_id": max(sent, 0)},
                         max(sent, 0))
            return
        await rt.jobs.wait_change(job_id, min(STREAM_LOOK_SECONDS, remaining), since)


def _progress_body(job: Job, snapshot: dict, body, caller: Caller) -> dict:
    """What fetch would have answered when `snapshot` was the job's latest: its processing envelope
    with that snapshot's progress (the current body when it is the latest)."""
    if body is not None and body.status == "processing" and body.progress is not None \
            and body.progress.step == snapshot.get("step") and body.progress.stage == snapshot.get("stage"):
        return body.model_dump(mode="json", exclude_none=True)
    remaining = 0.5 if snapshot.get("eta") is None else max(0.5, snapshot["eta"])
    shown = job_response(replace(job, status="processing"), fetch_result=caller.fetch_url(job.id),
                         eta=remaining, progress=wire(snapshot))
    return shown.model_dump(mode="json", exclude_none=True)
