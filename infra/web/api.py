"""The HTTP surface: one routing table, served under every path prefix clients use.

Each route reads the JSON body (leniently: a missing Content-Type is fine), gets its `Caller`
from the auth dependency (`infra.web.auth`: key, admin role, rate limit, usage), validates the
body into the endpoint's request model and calls its handler (request, runtime, caller) in the
thread pool. Every failure becomes the ModelsLab error envelope (`infra.web.envelopes`).
"""
# (no `from __future__ import annotations` here: FastAPI reads each route's Annotated dependency,
# which names a per-route closure, from the live annotations)

from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from handlers import catalog, generation, media, queue, server, system, video
from handlers.caller import Caller
from handlers.submit import Submitted, job_envelope
from infra.catalog.weights import validate_model_id
from infra.limits import RateLimiter
from infra.storage.base import content_type
from infra.storage.links import ARCHIVE_ROUTE, PREVIEW_ROUTE, check_signature, link_secret
from infra.web import openai_api
from infra.web.auth import Body, authorize, read_body
from infra.web.envelopes import install_error_handlers, invalid_fields
from infra.web.generations import ROUTES, Route
from infra.web.headers import job_headers
from infra.web.openapi import ERROR_RESPONSES, openapi_schema, route_extra, stream_extra
from infra.web.page import add_page
from models import requests as rq
from models.errors import ApiError, NotFound
from models.responses import (
    JobResponse,
    MessageResponse,
    ModelListResponse,
    NsfwCheckResponse,
    QueueResponse,
    SchedulersListResponse,
    SystemDetailsResponse,
    UploadImageResponse,
    UsageResponse,
)

if TYPE_CHECKING:
    from infra.runtime import Runtime

@dataclass(frozen=True)
class Endpoint:
    request: type[rq.WireModel]
    handler: Callable[[Any, Any, Caller], BaseModel]  # (request model, runtime, caller) -> response model
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
    "img2video": Endpoint(rq.Img2VideoRequest, video.img2video, JobResponse, "Image to video (Stable Video Diffusion)"),
    "super_resolution": Endpoint(
        rq.SuperResolutionRequest, media.super_resolution, JobResponse, "Upscale an image (output: one URL string)"
    ),
    "outpaint": Endpoint(rq.OutpaintRequest, media.outpaint, JobResponse, "Extend an image onto a larger canvas (inpaint)"),
    "object_removal": Endpoint(rq.ObjectRemovalRequest, media.object_removal, JobResponse, "Remove the masked object"),
    "mask_creator": Endpoint(rq.MaskCreatorRequest, media.mask_creator, JobResponse, "A mask of an object named in words"),
    "magic_mix": Endpoint(rq.MagicMixRequest, media.magic_mix, JobResponse, "An image's layout with a prompt's content (MagicMix)"),
    "removebg_mask": Endpoint(rq.RemoveBgMaskRequest, media.removebg_mask, JobResponse,
                              "Remove the background (a transparent PNG) or answer its mask"),
    "upload_image": Endpoint(rq.UploadImageRequest, media.upload_image, UploadImageResponse, "Store a base64 image"),
    "nsfw_image_check": Endpoint(
        rq.NsfwImageCheckRequest, media.nsfw_image_check, NsfwCheckResponse, "Is an image NSFW?"
    ),
    "fetch": Endpoint(rq.FetchRequest, queue.fetch, JobResponse, "Result of a queued job (also POST fetch/{id})"),
    "cancel": Endpoint(rq.CancelRequest, queue.cancel, JobResponse, "Cancel a queued or running job (ours; also cancel/{id})"),
    "queue": Endpoint(rq.KeyOnlyRequest, queue.list_queue, QueueResponse, "Jobs queued or running, of every key (ours)", True),
    "queue_cancel": Endpoint(
        rq.CancelRequest, queue.queue_cancel, JobResponse, "Cancel any key's queued or running job (ours)", True
    ),
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

ENDPOINT_NAMES = {**ALIASES, "fetch_by_path": "fetch", "video_fetch": "fetch", "cancel_by_path": "cancel"}

PREFIXES = ("/api/v1/enterprise", "/api/v1/enterprise/images", "/api/v1/enterprise/txt2img")


def create_app(runtime: "Runtime", manage_runtime: bool = True, on_started: Callable[[], None] | None = None) -> FastAPI:
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
        + ", `fetch/{id}`, `video/fetch/{id}`. The other generations of ModelsLab's API (v6, v7, v3) and the "
        "enterprise families (`video/`, `image_editing/`, `super_resolution/`) are the same endpoints under their own "
        "paths and tags. Auth: `key` in the body or the query, `Authorization: Bearer <key>`, or a `key` / `X-API-Key` "
        "header.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime

    limiter = RateLimiter(runtime.settings)
    for prefix in PREFIXES:
        documented = prefix == PREFIXES[0]
        for name, endpoint in ENDPOINTS.items():
            _add_route(app, f"{prefix}/{name}", name, endpoint, runtime, documented, limiter)
        for alias, name in ALIASES.items():
            if prefix == PREFIXES[0] and alias.startswith("video/"):
                continue  # the video family's own route (infra/web/generations.py)
            _add_route(app, f"{prefix}/{alias}", alias, ENDPOINTS[name], runtime, False, limiter)
        _add_route(app, f"{prefix}/fetch/{{request_id}}", "fetch_by_path", ENDPOINTS["fetch"], runtime, documented, limiter)
        _add_route(app, f"{prefix}/cancel/{{request_id}}", "cancel_by_path", ENDPOINTS["cancel"], runtime, documented, limiter)
        _add_stream_route(app, f"{prefix}/stream/{{request_id}}", runtime, documented, limiter)
    for face in ROUTES:  # the other API generations' paths (infra/web/generations.py)
        _add_route(app, face.path, face.endpoint, ENDPOINTS[face.endpoint], runtime, True, limiter, face)
    for prefix in PREFIXES[1:]:  # the G3 video server's fetch path under the older prefixes
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

    @app.get(PREVIEW_ROUTE + "/{job_id}.jpg", include_in_schema=False)
    def job_preview(request: Request, job_id: int, expires: str = "", signature: str = ""):
        """A running `preview: yes` job's latest preview: authorised by the signed link, not a key."""
        if not check_signature(request.url.path, expires, signature, link_secret(runtime.settings)):
            raise ApiError("This preview link is invalid or has expired", status_code=403)
        data = queue.preview(job_id, runtime)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.api_route(runtime.storage.url_prefix + "/{key:path}", methods=["GET", "HEAD"], include_in_schema=False)
    def stored_file(key: str):
        """Outputs and uploads, until they expire (`temp: yes`, upload_image)."""
        path = runtime.storage.open_path(key)
        if path is None:
            raise NotFound(f"No such file: {key} (it may have expired)", tip="Temporary links live 24 hours.")
        return FileResponse(path, media_type=content_type(key))
    openai_api.add_routes(app, runtime, limiter)
    add_page(app, runtime)  # the playground and console at `/` (infra/web/page.py)
    install_error_handlers(app, runtime.settings)
    wire_models = [endpoint.request for endpoint in ENDPOINTS.values()] + [face.request for face in ROUTES if face.request]
    app.openapi = lambda: openapi_schema(app, wire_models)
    return app


# --------------------------------------------------------------------------- routes


def _add_stream_route(app: FastAPI, path: str, runtime: "Runtime", documented: bool, limiter: RateLimiter) -> None:
    """stream/{id}: GET (the key as `Authorization: Bearer`, or `?key=` for EventSource, which sends
    no headers) or POST (the key in the body, as elsewhere)."""
    authorized = authorize("stream", "stream", False, limiter)

    async def stream_route(request: Request, body: Annotated[Body, Depends(read_body)],
                           caller: Annotated[Caller, Depends(authorized)]):
        try:
            parsed = rq.StreamRequest.model_validate({**body.data, "request_id": request.path_params["request_id"]})
        except ValidationError as exc:
            raise invalid_fields(exc) from None
        await run_in_threadpool(queue.current, parsed.request_id, runtime)  # a wrong id: a 404 envelope, not a stream
        last = str(request.headers.get("last-event-id") or body.data.get("last_event_id") or "0").strip()
        events = queue.stream(parsed.request_id, runtime, caller, int(last) if last.isdigit() else 0,
                              runtime.settings.stream_max_seconds)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    for method in ("POST", "GET"):
        app.add_api_route(path, stream_route, methods=[method], name=f"stream:{method}:{path}",
                          include_in_schema=documented,
                          summary="Follow a job: server-sent events of its progress, then its result (ours)",
                          operation_id=(f"stream_{method.lower()}" if path.startswith(PREFIXES[0] + "/") and documented
                                        else None),
                          response_class=StreamingResponse, openapi_extra=stream_extra(method),
                          responses={200: {"content": {"text/event-stream": {}},
                                           "description": "`progress` events (id = progress seq), then one `result` "
                                           "event with fetch's body; or `reconnect` at the time limit."},
                                     **ERROR_RESPONSES})


def _add_route(app: FastAPI, path: str, name: str, endpoint: Endpoint, runtime: "Runtime", documented: bool,
               limiter: RateLimiter, face: Route | None = None) -> None:
    """One route of `endpoint`; `face` when it is another API generation's path for it (its body's
    mapping, its fetch route, its methods and OpenAPI tag: infra/web/generations.py)."""
    authorized = authorize(name, ENDPOINT_NAMES.get(name, name), endpoint.admin, limiter)

    async def route(request: Request, body: Annotated[Body, Depends(read_body)],
                    caller: Annotated[Caller, Depends(authorized)]):
        data = body.data
        if face is not None and face.query_params:  # v3: the parameters as the query string (the body wins)
            data = {**dict(request.query_params), **data}
        if "request_id" in request.path_params:
            data = {**data, "request_id": request.path_params["request_id"]}
        try:
            if face is not None:
                caller = replace(caller, fetch_path=face.fetch, model_category=face.category_of(data))
                if face.request is not None:  # the fields of its own (v7's), then v1's
                    face.request.model_validate(data)
                if face.translate is not None:
                    data = face.translate(data)
            data, caller = job_headers(request, data, caller, ENDPOINT_NAMES.get(name, name))
            parsed = endpoint.request.model_validate(data)
        except ValidationError as exc:
            raise invalid_fields(exc) from None
        result = await run_in_threadpool(endpoint.handler, parsed, runtime, caller)
        if isinstance(result, Submitted):  # a job: wait for it up to the sync budget, holding no thread
            job = await runtime.jobs.wait_async(result.job.id, result.budget)
            result = await run_in_threadpool(job_envelope, job or result.job, runtime, caller)
        return JSONResponse(result.model_dump(mode="json", exclude_none=True))

    for method in face.methods if face is not None else ("POST",):
        app.add_api_route(
            path,
            route,
            methods=[method],
            name=f"{name}:{method}:{path}",
            summary=(face.summary if face is not None and face.summary else endpoint.summary),
            tags=[face.tag if face is not None else "Enterprise v1"],
            include_in_schema=documented,
            operation_id=_operation_id(path, name, method, face) if documented else None,
            openapi_extra=route_extra((face and face.request) or endpoint.request, path, body=method == "POST"),
            responses={200: {"model": endpoint.response}, **ERROR_RESPONSES},
        )


def _operation_id(path: str, name: str, method: str, face: Route | None) -> str | None:
    if face is None:
        return name if path.startswith(PREFIXES[0] + "/") else None
    words = "_".join(part for part in path.strip("/").replace("-", "_").replace("{request_id}", "by_id").split("/")
                     if part not in ("api",))
    return f"{words}_{method.lower()}" if len(face.methods) > 1 else words
