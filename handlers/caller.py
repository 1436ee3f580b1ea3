"""Who is calling: the per-request context a handler gets beside the runtime (the FastAPI
dependency in `infra.web.auth` makes it once the key is checked)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    key_id: str  # `infra.limits.key_id` of the request's key: what jobs, limits and usage record
    base_url: str  # what clients reach this server at (the setting public_url, else the request's own)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"
