"""The HTTP surface: one routing table, served under every path prefix clients use.

Each route reads the JSON body (leniently: a missing Content-Type is fine), checks the key
(`key` in the body or `Authorization: Bearer`), validates the body into the endpoint's request
model and calls its handler. Every failure becomes the ModelsLab error envelope
`{"status": "error", "message": ..., "tip": ...}` — never a stack trace.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from handlers import catalog, generation, media, queue, server, system, video
from infra.limits import RateLimiter, key_id
from infra.storage.links import ARCHIVE_ROUTE, check_signature, link_secret
from infra.storage.base import content_type
from infra.catalog.weights import validate_model_id
from models import requests as rq
from models.errors import ApiError, Forbidden, InvalidKey, NotFound, PayloadTooLarge
from models.responses import (
    ErrorResponse,
    JobResponse,
    MessageResponse,
    ModelListResponse,
    NsfwCheckResponse,
    SchedulersListResponse,
    SystemDetailsResponse,
    UploadImageResponse,
    UsageResponse,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    request: type[rq.WireModel]
    handler: Callable[[Any, Any], BaseModel]
    response: Any
    summary: str
    admin: bool = False  # catalog and server endpoints: admin keys only, when the server has separate ones


# The whole API. name -> (request model, handler, response model, summary, admin-only)
ENDPOINTS: dict[str, Endpoint] = {
    # generation
    "text2img": Endpoint(rq.Text2ImgRequest, generation.text2img, JobResponse, "Text to image"),
    "img2img": Endpoint(rq.Img2ImgRequest, generation.img2img, JobResponse, "Image to image"),
    "inpaint": Endpoint(rq.InpaintRequest, generation.inpaint, JobResponse, "Inpainting: repaint the white area of mask_image"),
    "controlnet": Endpoint(rq.ControlnetRequest, generation.controlnet, JobResponse, "ControlNet generation"),
    "text2video": Endpoint(rq.Text2VideoRequest, video.text2video, JobResponse, "Text to video (AnimateDiff; mp4 or gif)"),
    "super_resolution": Endpoint(
        rq.SuperResolutionRequest, media.super_resolution, JobResponse, "Upscale an image (output: one URL string)"
    ),
    "upload_image": Endpoint(rq.UploadImageRequest, media.upload_image, UploadImageResponse, "Store a base64 image"),
    "nsfw_image_check": Endpoint(
        rq.NsfwImageCheckRequest, media.nsfw_image_check, NsfwCheckResponse, "Is an image NSFW?"
    ),
    "fetch": Endpoint(rq.FetchRequest, queue.fetch, JobResponse, "Result of a queued job (also POST fetch/{id})"),
    # model catalog
    "load_model": Endpoint(rq.LoadModelRequest, catalog.load_model, MessageResponse, "Load a model", True),
    "load_model_v2": Endpoint(
        rq.LoadModelV2Request, catalog.load_model_v2, MessageResponse, "Load a model (v2)", True
    ),
    "load_vae": Endpoint(rq.LoadVaeRequest, catalog.load_vae, MessageResponse, "Load a VAE", True),
    "verify_model": Endpoint(rq.ModelIdRequest, catalog.verify_model, MessageResponse, "Is a model on this server?"),
    "get_all_models": Endpoint(rq.KeyOnlyRequest, catalog.get_all_models, ModelListResponse, "Models on this server"),
    "delete_model": Endpoint(
        rq.ModelIdRequest, catalog.delete_model, MessageResponse, "Delete a model", True
    ),
    "sync_models": Endpoint(
        rq.SyncModelsRequest, catalog.sync_models, MessageResponse, "Copy models to another server", True
    ),
    # server
    "system_details": Endpoint(rq.KeyOnlyRequest, system.system_details, SystemDetailsResponse, "Server and queue state"),
    "schedulers_list": Endpoint(rq.KeyOnlyRequest, system.schedulers_list, SchedulersListResponse, "Usable scheduler names"),
    "usage": Endpoint(rq.UsageRequest, system.usage, UsageResponse, "Per-key usage for billing (ours)", True),
    "restart_server": Endpoint(rq.KeyOnlyRequest, server.restart_server, MessageResponse, "Restart the engine", True),
    "update_server": Endpoint(
        rq.KeyOnlyRequest, server.update_server, MessageResponse, "Reload settings; report the version", True
    ),
    "update_s3": Endpoint(rq.UpdateS3Request, server.update_s3, MessageResponse, "Store outputs in an S3 bucket", True),
    "reset_s3": Endpoint(rq.ResetS3Request, server.reset_s3, MessageResponse, "Back to the default storage", True),
    "clear_cache": Endpoint(rq.KeyOnlyRequest, server.clear_cache, MessageResponse, "Unload models, clean caches", True),
    "clear_queue": Endpoint(rq.KeyOnlyRequest, server.clear_queue, MessageResponse, "Cancel queued jobs", True),
}

# other names clients use for the same endpoints
ALIASES = {
    "update": "update_server",  # the official SDKs
    "sync_image": "sync_models",  # the docs' endpoint index
    "fetch_queue_image": "fetch",  # the docs' endpoint index
    "video/text2video": "text2video",  # G3 video server path
}

ENDPOINT_NAMES = {**ALIASES, "fetch_by_path": "fetch", "video_fetch": "fetch"}

PREFIXES = ("/api/v1/enterprise", "/api/v1/enterprise/images", "/api/v1/enterprise/txt2img")


def create_app(runtime, manage_runtime: bool = True, on_started: Callable[[], None] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_runtime:
            await run_in_threadpool(runtime.start)
        if on_started:
            on_started()
        yield
        if manage_runtime:
            await run_in_threadpool(runtime.stop)

    app = FastAPI(
        title="Stable Diffusion Enterprise API (ModelsLab-compatible)",
        version=runtime.version,
        description="Every endpoint is a POST with a JSON body, under "
        + ", ".join(f"`{p}/{{name}}`" for p in PREFIXES)
        + ". Aliases: "
        + ", ".join(f"`{a}` = `{n}`" for a, n in ALIASES.items())
        + ", `fetch/{id}`, `video/fetch/{id}`. Auth: `key` in the body or `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime

    limiter = RateLimiter(runtime.settings)
    for prefix in PREFIXES:
        documented = prefix == PREFIXES[0]
        for name, endpoint in ENDPOINTS.items():
            _add_route(app, f"{prefix}/{name}", name, endpoint, runtime, documented, limiter)
        for alias, name in ALIASES.items():
            _add_route(app, f"{prefix}/{alias}", alias, ENDPOINTS[name], runtime, False, limiter)
        _add_route(app, f"{prefix}/fetch/{{request_id}}", "fetch_by_path", ENDPOINTS["fetch"], runtime, documented, limiter)
        # the G3 video server's fetch path
        _add_route(app, f"{prefix}/video/fetch/{{request_id}}", "video_fetch", ENDPOINTS["fetch"], runtime, False, limiter)

    @app.get("/health", include_in_schema=False)
    def health():
        return {"status": "ok"}

    @app.get(ARCHIVE_ROUTE + "/{model_id}.tar", include_in_schema=False)
    def model_archive(request: Request, model_id: str, expires: str = "", signature: str = ""):
        """A model's files for sync_models' target: authorised by the signed link, not a key."""
        if not check_signature(request.url.path, expires, signature, link_secret(runtime.settings)):
            raise ApiError("This archive link is invalid or has expired", status_code=403)
        entry = runtime.weights.get(validate_model_id(model_id))
        if entry is None or entry.status != "ready":
            raise NotFound(f"Model id not found: {model_id}")
        return StreamingResponse(runtime.weights.archive(model_id), media_type="application/x-tar")

    @app.api_route(runtime.storage.url_prefix + "/{key:path}", methods=["GET", "HEAD"], include_in_schema=False)
    def stored_file(key: str):
        """Outputs and uploads, until they expire (`temp: yes`, upload_image)."""
        path = runtime.storage.open_path(key)
        if path is None:
            raise NotFound(f"No such file: {key} (it may have expired)", tip="Temporary links live 24 hours.")
        return FileResponse(path, media_type=content_type(key))
    _install_error_handlers(app, runtime.settings)
    app.openapi = lambda: _openapi(app)
    return app


# --------------------------------------------------------------------------- routes


def _add_route(app: FastAPI, path: str, name: str, endpoint: Endpoint, runtime, documented: bool, limiter) -> None:
    usage_name = ENDPOINT_NAMES.get(name, name)  # aliases are metered under the endpoint they stand for

    async def route(request: Request):
        data, problem = await _read_body(request, runtime.settings.max_body_bytes)
        caller = key_id(_check_key(data, request, runtime.settings, name, endpoint.admin))
        failed = True
        try:
            limiter.check(caller)
            if problem:
                raise problem
            if "request_id" in request.path_params:
                data["request_id"] = request.path_params["request_id"]
            try:
                parsed = endpoint.request.model_validate(data)
            except ValidationError as exc:
                raise ApiError(
                    _validation_messages(exc), tip="Fix the fields named in `message`.", status_code=422
                ) from None
            rt = runtime.for_request(str(request.base_url), caller)
            result = await run_in_threadpool(endpoint.handler, parsed, rt)
            failed = False
            return JSONResponse(result.model_dump(mode="json", exclude_none=True))
        finally:
            runtime.usage.request(caller, usage_name, failed)

    app.add_api_route(
        path,
        route,
        methods=["POST"],
        name=f"{name}:{path}",
        summary=endpoint.summary,
        include_in_schema=documented,
        operation_id=name if path.startswith(PREFIXES[0] + "/") and documented else None,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{endpoint.request.__name__}"}}},
            },
            **({"parameters": [REQUEST_ID_PARAMETER]} if "{request_id}" in path else {}),
        },
        responses={200: {"model": endpoint.response}, **ERROR_RESPONSES},
    )


# every error status a route answers, each with the error envelope (documented, so clients and the
# schema fuzz in tests/test_fuzz.py can hold the API to it)
ERROR_RESPONSES: dict[int, dict] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in {
        400: "Unusable input (image, model, ...), or a documented feature this server does not offer",
        401: "Invalid Api Key",
        403: "An admin endpoint called with a generation key",
        404: "Unknown model, job or file",
        409: "Clashes with the server's state (a model id that exists, is loading or in use)",
        413: "Request body too large",
        422: "Invalid fields (message: field -> messages)",
        429: "Rate limit exceeded",
    }.items()
}
REQUEST_ID_PARAMETER = {
    "name": "request_id",
    "in": "path",
    "required": True,
    "description": "The `id` of a generation response (overrides `request_id` in the body).",
    "schema": {"type": "integer", "minimum": 0},
}


async def _read_body(request: Request, limit: int) -> tuple[dict, ApiError | None]:
    """The JSON object in the body, and the problem with it if any (reported after auth)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit // (1024 * 1024)} MiB")
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit // (1024 * 1024)} MiB")
        body.append(chunk)
    raw = b"".join(body)
    if not raw.strip():
        return {}, None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, ApiError(f"The request body is not valid JSON: {exc}", tip="Send a JSON object.")
    if not isinstance(data, dict):
        return {}, ApiError("The request body must be a JSON object", tip='Send {"key": "...", ...}.')
    return data, None


def _check_key(data: dict, request: Request, settings, name: str, admin_only: bool) -> str:
    """A valid key (body `key` or `Authorization: Bearer`), compared in constant time; for the
    catalog and server endpoints an admin key when the server has separate admin keys."""
    key = data.get("key")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    candidates = [k for k in (key, token if scheme.lower() == "bearer" else None) if isinstance(k, str) and k]
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


def _validation_messages(exc: ValidationError) -> dict[str, list[str]]:
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
    return messages


# --------------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI, settings) -> None:
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


# --------------------------------------------------------------------------- OpenAPI


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus every request model under components (routes reference them)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for endpoint in ENDPOINTS.values():
        model = endpoint.request
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
    app.openapi_schema = schema
    return schema
