"""The job record: one generation (or video, or upscale) from submission to its end.

A job is created `processing` with its output keys fixed up front (so `future_links` can be
given before it runs) and ends `success` or `failed`. Ids are random integers below 2**53:
unique, JSON-safe, and not guessable from another customer's id. Besides its typed parameters
(`infra.jobs.params`) a job knows where its outputs go (`storage_id`: the storage it was submitted
under, even if update_s3 switches storage while it is queued), when they expire (`expires_at`,
`temp: yes`) and which models it waits for (`await_models`: fetched on first use, still loading
when it was queued), and how its client asked it to be run: `priority` (high / normal / low: the
start order), `deadline_at` (it is cancelled past it), `webhook_events` (which of queued, started,
progress, completed its webhook receives; empty = ModelsLab's only one, the end, without an `event`
field), `preview` (progress previews wanted). `cancelled` is set when it ended by a cancel or its
deadline.

Stores keep `to_record()`, plain primitives only, with `schema_version`. `from_record()` reads
every version ever written: a job queued by an older release still runs after an upgrade.
    1  (no version field) params were a dict that also held `storage`, `expires_at` and
       `await_models`; LoRAs were [id, strength] pairs; samples and the output size were spelled out
    2  params are `JobParams.model_dump()`; storage_id, expires_at, await_models are job fields
    3  adds priority, deadline_at, webhook_events, preview, cancelled (older records: their defaults)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from infra.jobs.params import PARAMS, JobParams
from infra.storage.base import LOCAL

PROCESSING, SUCCESS, FAILED = "processing", "success", "failed"
TERMINAL = (SUCCESS, FAILED)
MIN_ID, MAX_ID = 10_000_000, 2**53 - 1
SCHEMA_VERSION = 3
PRIORITIES = ("high", "normal", "low")  # start order, first to last
WEBHOOK_EVENTS = ("queued", "started", "progress", "completed")
IDEMPOTENCY_SECONDS = 24 * 3600  # how long an Idempotency-Key names the job its first request made


@dataclass
class Job:
    id: int
    endpoint: str
    params: JobParams
    meta: dict[str, Any]
    output_keys: list[str]
    future_links: list[str]
    status: str = PROCESSING
    message: str | None = None
    eta: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    generation_time: float | None = None
    webhook: str | None = None
    track_id: str | None = None
    webhook_status: str = ""
    attempts: int = 0  # times a worker has started it (a worker that died mid-job leaves it started)
    owner: str = ""  # the key that submitted it, as `infra.limits.key_id` (never the key itself)
    runner: str = ""  # what started the current attempt (on Modal the input id: a re-delivered input may go on)
    storage_id: str = LOCAL
    expires_at: float | None = None
    await_models: list[str] = field(default_factory=list)
    priority: str = "normal"
    deadline_at: float | None = None
    webhook_events: list[str] = field(default_factory=list)
    preview: bool = False
    cancelled: bool = False
    schema_version: int = SCHEMA_VERSION

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def wants_event(self, event: str) -> bool:
        """Whether the job's webhook receives `event` (the end always, unless webhook_events left it out)."""
        return event in self.webhook_events if self.webhook_events else event == "completed"

    def models_used(self) -> set[str]:
        """Every model id the job refers to (delete_model refuses to delete these while it is queued)."""
        return self.params.models_used() | set(self.await_models)

    def to_record(self) -> dict[str, Any]:
        """The job as plain primitives (JSON- and pickle-safe across releases)."""
        record = asdict(self)
        record["params"] = self.params.model_dump(mode="json")
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        """A job from a stored record of any schema version (see the module docstring)."""
        if record.get("schema_version") in (None, 1):
            record = _from_version_1(record)
        record = {**record, "schema_version": SCHEMA_VERSION}  # version 2 differs only by the fields added in 3
        values = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        values["params"] = PARAMS.validate_python(record["params"])
        return cls(**values)


JOB_FIELDS = tuple(f.name for f in fields(Job))


def _from_version_1(record: dict[str, Any]) -> dict[str, Any]:
    params = dict(record["params"])
    storage_id = params.pop("storage", None) or LOCAL
    expires_at = params.pop("expires_at", None)
    await_models = list(params.pop("await_models", None) or [])
    endpoint = record["endpoint"]
    if endpoint == "text2video":
        params.pop("samples", None)
        params["kind"] = "video"
    elif endpoint == "super_resolution":
        params["kind"] = "upscale"
    else:
        for derived in ("samples", "output_width", "output_height"):
            params.pop(derived, None)
        params["loras"] = [{"model_id": lora_id, "strength": strength} for lora_id, strength in params.get("loras", [])]
        params.update(kind="generation", task=endpoint)
    return {**record, "params": params, "storage_id": storage_id, "expires_at": expires_at,
            "await_models": await_models, "schema_version": SCHEMA_VERSION}


def wait_until_done(get, job_id: int, timeout: float, pause) -> Job | None:
    """`get(job_id)` until the job is terminal or `timeout` seconds pass, calling `pause(remaining)`
    in between (each store waits its own way); the latest record."""
    deadline = time.monotonic() + timeout
    job = get(job_id)
    while job is not None and not job.done:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        pause(remaining)
        job = get(job_id)
    return job
