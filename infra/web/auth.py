"""Who may call, as a FastAPI dependency: the JSON body read once (size-capped), the key checked
(`key` in the body or the query, `Authorization: Bearer`, a `key` or `X-API-Key` header, compared in
constant time; admin keys for the catalog and server endpoints when the server has separate ones),
the key's rate limit, and the request metered for the key's usage. Yields the `Caller` the handler gets.

A body that is not a JSON object is reported after the key check (an anonymous client learns
nothing about the API from it); a body over the size cap is refused before it is read.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from handlers.caller import Caller
from infra.limits import RateLimiter, key_id
from models.errors import ApiError, Forbidden, InvalidKey, PayloadTooLarge


@dataclass(frozen=True)
class Body:
    data: dict  # the JSON object sent ({} when there was none, or a broken one)
    problem: ApiError | None  # what is wrong with it, raised once the key is checked


async def read_body(request: Request) -> Body:
    """The request's JSON object, read once per request (FastAPI caches a dependency's result)."""
    limit = request.app.state.runtime.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit // (1024 * 1024)} MiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit // (1024 * 1024)} MiB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():  # a GET (stream/{id}) may name its key in the query: EventSource sends no headers
        return Body({"key": request.query_params["key"]} if "key" in request.query_params else {}, None)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Body({}, ApiError(f"The request body is not valid JSON: {exc}", tip="Send a JSON object."))
    if not isinstance(data, dict):
        return Body({}, ApiError("The request body must be a JSON object", tip='Send {"key": "...", ...}.'))
    return Body(data, None)


def authorize(name: str, usage_name: str, admin_only: bool, limiter: RateLimiter) -> Callable:
    """The dependency of one route: `name` is the path's endpoint name (for messages), `usage_name`
    the endpoint it is metered under (aliases count under the endpoint they stand for)."""

    async def caller(request: Request, body: Annotated[Body, Depends(read_body)]) -> AsyncIterator[Caller]:
        runtime = request.app.state.runtime
        settings = runtime.settings
        key = check_key(body.data, request, settings, name, admin_only)
        caller_id = key_id(key)
        admin = not settings.admin_api_keys or any(_same(key, k) for k in settings.admin_api_keys)
        failed = True
        try:
            limiter.check(caller_id)
            if body.problem:
                raise body.problem
            yield Caller(key_id=caller_id, base_url=(settings.public_url or str(request.base_url)).rstrip("/"), admin=admin)
            failed = False
        finally:
            runtime.usage.request(caller_id, usage_name, failed)

    return caller


def check_key(data: dict, request: Request, settings, name: str, admin_only: bool) -> str:
    """A valid key, compared in constant time, in any spelling some generation of ModelsLab's API
    uses: `key` in the body, `Authorization: Bearer`, a `key` header (v7), `X-API-Key`, or `key` in
    the query string (v3, v7's GET models); for the
    catalog and server endpoints an admin key when the server has separate admin keys."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    sent = (data.get("key"), token if scheme.lower() == "bearer" else None, request.headers.get("key"),
            request.headers.get("x-api-key"), request.query_params.get("key"))
    candidates = [k for k in sent if isinstance(k, str) and k]
    admins = settings.admin_api_keys
    valid = [*settings.api_keys, *admins]
    if not any(_same(c, k) for c in candidates for k in valid):
        raise InvalidKey()
    if admin_only and admins and not any(_same(c, k) for c in candidates for k in admins):
        raise Forbidden(
            f"This key may not use {name}: it is a generation key",
            tip="Catalog and server endpoints need an admin key (SDAPI_ADMIN_API_KEYS).",
        )
    return next(c for c in candidates if any(_same(c, k) for k in valid))


def _same(candidate: str, key: str) -> bool:
    return hmac.compare_digest(candidate.encode(), key.encode())
