"""The job headers every job route takes, whatever its API generation: `Cancel-After` and
`Idempotency-Key` (README "Following a job"), turned into what the handlers read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from fastapi import Request

from handlers.caller import Caller
from models.errors import BadInput
from models.fields import is_unset, parse_duration
from models.requests import MAX_DEADLINE, MIN_DEADLINE


def job_headers(request: Request, data: dict, caller: Caller, endpoint: str) -> tuple[dict, Caller]:
    """The job headers, as their body fields: `Cancel-After` (a duration) is `deadline_seconds`
    unless the body gives one (null and blank give none); `Idempotency-Key` (or the body's `idempotency_key`) goes on the caller
    with the digest of what it must name again: the endpoint and the body, less the key."""
    cancel_after = request.headers.get("cancel-after", "").strip(" \t")  # blank: not sent
    if cancel_after:  # checked even when the body's deadline_seconds wins
        try:
            seconds = parse_duration(cancel_after)
        except ValueError as exc:
            raise BadInput(f"Cancel-After: {exc}", tip="Send seconds (30) or a duration like 30s, 5m or 1h30m.") from None
        # (a 400 like the syntax's: a range over durations is a rule the header's schema cannot state)
        if not MIN_DEADLINE <= seconds <= MAX_DEADLINE:
            raise BadInput(f"Cancel-After must be between 1s and 168h (7 days), got {cancel_after!r}")
        if is_unset(data.get("deadline_seconds")):
            data = {**data, "deadline_seconds": seconds}
    idempotency = request.headers.get("idempotency-key") or data.get("idempotency_key")
    if idempotency:
        if not isinstance(idempotency, str | int) or len(str(idempotency)) > 255:
            raise BadInput("Idempotency-Key must be a string of at most 255 characters")
        compared = {k: v for k, v in data.items() if k not in ("key", "idempotency_key")}
        digest = hashlib.sha256(json.dumps([endpoint, compared], sort_keys=True, default=str).encode()).hexdigest()
        caller = replace(caller, idempotency_key=str(idempotency), body_digest=digest)
    return data, caller
