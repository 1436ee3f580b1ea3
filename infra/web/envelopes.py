"""Every failure as the ModelsLab error envelope `{"status": "error", "message": ..., "tip": ...}`
with the HTTP status of its `models.errors.ApiError` (or HTTP 200 with the setting
errors_with_http_200, for legacy clients) — never a stack trace. Validation errors become a
message object: field -> the messages that say what to fix."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import ApiError
from models.responses import ErrorResponse

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI, settings) -> None:
    def envelope(message, tip, status_code: int) -> JSONResponse:
        body = ErrorResponse(message=message, tip=tip).model_dump(exclude_none=True)
        return JSONResponse(body, status_code=200 if settings.errors_with_http_200 else status_code)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return envelope(exc.message, exc.tip, exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return envelope(f"Not found: {request.method} {request.url.path}", "See /docs for the endpoints.", 404)
        if exc.status_code == 405:
            return envelope(f"{request.method} is not allowed on {request.url.path}; use POST with a JSON body", None, 405)
        return envelope(str(exc.detail), None, exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return envelope("Internal server error; the request was logged", "Try again; report it if it persists.", 500)


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
