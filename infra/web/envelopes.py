"""Every failure as the ModelsLab error envelope `{"status": "error", "message": ..., "tip": ...}`
with the HTTP status of its `models.errors.ApiError` (or HTTP 200 with the setting
errors_with_http_200, for legacy clients) — never a stack trace. Validation errors become a
message object: field -> the messages that say what to fix."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from models.errors import ApiError
from models.responses import ErrorResponse

log = logging.getLogger(__name__)

# The error body of each API generation whose shape differs from ModelsLab's v1 envelope, by path
# prefix: (message, tip, HTTP status) -> (body, HTTP status). The longest matching prefix wins.
ErrorShape = Callable[[Any, str | None, int], tuple[dict, int]]
ERROR_SHAPES: dict[str, ErrorShape] = {}


def register_error_shape(prefix: str, shape: ErrorShape) -> None:
    ERROR_SHAPES[prefix] = shape


def modelslab_error(message, tip: str | None, status_code: int) -> tuple[dict, int]:
    return ErrorResponse(message=message, tip=tip).model_dump(exclude_none=True), status_code


def shape_for(path: str) -> ErrorShape:
    matches = [prefix for prefix in ERROR_SHAPES if path.startswith(prefix)]
    return ERROR_SHAPES[max(matches, key=len)] if matches else modelslab_error


def install_error_handlers(app: FastAPI, settings) -> None:
    def envelope(request: Request, message, tip, status_code: int, headers: dict | None = None) -> JSONResponse:
        shape = shape_for(request.url.path)
        body, status_code = shape(message, tip, status_code)
        # errors_with_http_200 is for legacy ModelsLab clients; other APIs' clients read the status
        legacy = settings.errors_with_http_200 and shape is modelslab_error
        return JSONResponse(body, status_code=200 if legacy else status_code, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return envelope(request, exc.message, exc.tip, exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return envelope(request, f"Not found: {request.method} {request.url.path}", "See /docs for the endpoints.", 404)
        if exc.status_code == 405:
            allowed = _allowed_methods(request) or (exc.headers or {}).get("Allow") or "POST"
            return envelope(request, f"{request.method} is not allowed on {request.url.path}; use {allowed}",
                            None, 405, headers={"Allow": allowed})
        return envelope(request, str(exc.detail), None, exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return envelope(request, "Internal server error; the request was logged", "Try again; report it if it persists.",
                        500)


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path takes (Starlette's 405 names only the first route's:
    each method of a path is a route of its own here)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


def invalid_fields(exc: ValidationError) -> ApiError:
    """A request model's validation errors as a 422: field -> messages."""
    messages: dict[str, list[str]] = {}
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "body"
        if error["type"] == "missing":
            text = f"The {field} field is required."
        elif error["type"] == "value_error":
            text = f"The {field} {error['ctx']['error']}."
        else:
            text = f"The {field} field is invalid: {error['msg']}."
        messages.setdefault(field, []).append(text)
    return ApiError(messages, tip="Fix the fields named in `message`.", status_code=422)
