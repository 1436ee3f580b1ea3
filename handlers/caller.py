"""Who is calling: the per-request context a handler gets beside the runtime (the FastAPI
dependency in `infra.web.auth` makes it once the key is checked)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    key_id: str  # `infra.limits.key_id` of the request's key: what jobs, limits and usage record
    base_url: str  # what clients reach this server at (the setting public_url, else the request's own)
    admin: bool = True  # an admin key (every key is, on a server without separate admin keys)
    idempotency_key: str | None = None  # the request's Idempotency-Key (header or body field)
    body_digest: str = ""  # SHA-256 of the request as the idempotency key compares it (endpoint + body, no key)
    fetch_path: str = "/api/v1/enterprise/fetch"  # the fetch route of the API generation called (for fetch_result)
    # an enterprise model-family route (`flux/text2img`, ...): the model category its server runs
    model_category: str | None = None

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def fetch_url(self, job_id: int) -> str:
        """Where this caller's API generation fetches the job (`fetch_result`)."""
        return self.url(f"{self.fetch_path}/{job_id}")
