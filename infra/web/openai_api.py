"""The OpenAI images API: any OpenAI-images client works against this server with only its base URL
changed (`OpenAI(base_url="https://<server>/v1", api_key=<a key of this server>)`).

Routes (OpenAPI tag "OpenAI images"):

- `POST /v1/images/generations` (JSON): text2img. `prompt`; `n` 1..4 (ModelsLab's `samples`);
  `size` "WxH" (each a multiple of 8, 8..1024; `auto` or omitted: 512x512); `response_format`
  `url` or `b64_json` (default `url`; `b64_json` when `model` is a gpt-image-* name, whose
  clients read only that, as OpenAI always answers them in base64); `model`.
- `POST /v1/images/edits` (multipart/form-data): inpainting of `image` (also `image[]`, one image).
  The edited area is where `mask` is fully transparent (alpha 0), or with no mask where `image`
  itself is (OpenAI's rule); it becomes the engine's mask (white = repaint, black = keep), so the
  pixels outside it come back exactly as sent. A mask must have an alpha channel, the image's
  size, and at least one transparent pixel (else a 400 naming `mask`, or `image` without a mask).
  Strength `EDIT_STRENGTH` (1.0: the area is painted anew, as OpenAI's edits do); `size` omitted:
  the image's own size. The model defaults to the server's default inpainting model.
- `POST /v1/images/variations` (multipart/form-data): img2img of `image` at strength
  `VARIATION_STRENGTH` (0.6: the composition and palette stay, the details change) with the
  neutral prompt `VARIATION_PROMPT` (OpenAI's API has no prompt here; an extra `prompt` field
  is used when sent) and no prompt enhancement.
- `GET /v1/models`, `GET /v1/models/{id}`: the image models a request may name (ready pipeline
  models, and the default models still to be fetched on first use) in OpenAI's list shape;
  `created` is when the model was loaded, `owned_by` "system". An id not listed: 404
  `model_not_found`.

Decisions:

- Models: `model` omitted, one of OpenAI's own names (dall-e-*, gpt-image-*, chatgpt-image-*) or a
  placeholder id of the docs -> the server's default model (for edits: the default inpainting
  model). Any other id must be a model of this server: an unknown one is a 404 `model_not_found`
  (param `model`), as OpenAI answers, never another model's image passed off as the one asked for.
  A model of this server that is still loading (or failed) gets the ModelsLab handler's 400.
- `quality` sets the denoising steps (`QUALITY_STEPS`: low 10; auto/standard/medium 20; high/hd
  40; xhigh/max 50); `style` `natural` turns ModelsLab's prompt enhancement off, `vivid` (OpenAI's
  default) keeps it; `revised_prompt` is given only when the prompt that ran differs from the one
  sent. `user`, `moderation`, `output_compression`, `input_fidelity`, `safety_identifier` are
  accepted and ignored. Not available, a 400 naming the field: `stream: true`, `background:
  transparent`, an `output_format` other than png.
- Extras: any field of the ModelsLab request (`negative_prompt`, `seed`, `steps`,
  `guidance_scale`, `scheduler`, `strength`, `safety_checker`, `enhance_prompt`, `webhook`, ...)
  in the JSON body or the form goes to the job as in the ModelsLab API; the fields this module
  sets itself (prompt, samples, width, height, model_id, images, base64, instant_response) are
  taken from the OpenAI fields only. `Idempotency-Key` and `Cancel-After` headers work as there.
- Waiting: OpenAI clients do not poll, so a request waits for its job up to the longest this
  server holds a connection: max(sync_timeout, stream_max_seconds) -- 600 s locally (the OpenAI
  SDK's default timeout), 120 s on Modal (under its 150 s web limit) -- and never past the
  client's own read timeout (the SDK's `X-Stainless-Read-Timeout` header) less `CLIENT_MARGIN`
  seconds. A job unfinished by then is a 504 (type `timeout`, code `job_not_finished`) naming the
  job id and the ModelsLab fetch route that gives its result later with the same key; a failed
  or cancelled job is a 500 (`server_error`) with the job's message. Both carry `x-should-retry:
  false`: a retry by the SDK would queue another job.
- Answers: `{"created", "data": [{"url"} | {"b64_json"}]}` and an `x-job-id` header (the job is
  also a ModelsLab job: fetch, webhooks and usage see it); b64_json is read from the stored PNGs
  (the local files, or the job's output links on an S3 bucket).
- Errors: `{"error": {"message", "type", "param", "code"}}` under /v1/ (registered with
  `infra.web.envelopes.register_error_shape`, so every `ApiError`, 404 and 500 on these paths has
  it): 400 invalid_request_error (ModelsLab's 422 field errors too, `param` the OpenAI field:
  samples -> n, width/height -> size, model_id -> model, init_image -> image, mask_image -> mask),
  401 invalid_api_key, 404 model_not_found, 429 rate_limit_exceeded, 500 server_error. FastAPI's
  own validation errors (RequestValidationError) are this 400 under /v1/ too (FastAPI's answer
  elsewhere). The setting errors_with_http_200 (legacy ModelsLab clients) is not applied under
  /v1/ (`infra.web.envelopes` applies it to ModelsLab's shape only): OpenAI's SDKs read the status.
- Auth: `Authorization: Bearer <key>` (`infra.web.auth.check_key`), the key's rate limit and its
  usage metered under `openai/images/generations`, `.../edits`, `.../variations`, `openai/models`.
"""

# (no `from __future__ import annotations`: FastAPI reads each route's Annotated dependency, which names a
# per-route closure, from the live annotations)

import base64
import hmac
import io
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import AliasChoices, BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from handlers import generation
from handlers.caller import Caller
from infra.catalog.weights import PIPELINE_CATEGORIES, READY
from infra.limits import RateLimiter, key_id
from infra.storage.base import LOCAL
from infra.web.auth import check_key, read_body
from infra.web.envelopes import register_error_shape
from infra.web.headers import job_headers
from models import requests as rq
from models.errors import ApiError, PayloadTooLarge
from models.openai import (
    MAX_IMAGES,
    SIZE_PATTERN,
    ErrorBody,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    ModelList,
    ModelObject,
    OpenAIImageRequest,
)

if TYPE_CHECKING:
    from infra.runtime import Runtime

PREFIX = "/v1"
TAG = "OpenAI images"
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")  # OpenAI's names: the server's default model
VARIATION_STRENGTH = 0.6
VARIATION_PROMPT = "a detailed, high quality image"
EDIT_STRENGTH = 1.0  # the edited area is painted anew, as OpenAI's edits do (an extra `strength` wins)
QUALITY_STEPS = {"low": 10, "auto": 20, "standard": 20, "medium": 20, "high": 40, "hd": 40, "xhigh": 50, "max": 50}
CLIENT_MARGIN = 5.0  # seconds left to the client between our answer and its own read timeout
MAX_FORM_FILES = 4
# the ModelsLab fields this module sets from the OpenAI ones (never taken from extras)
RESERVED = {"key", "prompt", "samples", "width", "height", "model_id", "base64", "init_image", "mask_image",
            "instant_response"}
# ModelsLab field -> the OpenAI field a client sent it as (error `param`)
OPENAI_PARAM = {"samples": "n", "width": "size", "height": "size", "model_id": "model", "init_image": "image",
                "mask_image": "mask", "prompt": "prompt"}
ERROR_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "requests", 504: "timeout"}
ERROR_CODES = {401: "invalid_api_key", 413: "payload_too_large", 429: "rate_limit_exceeded"}
NO_RETRY = {"x-should-retry": "false"}


class OpenAIError(ApiError):
    """An error with OpenAI's `param`, `code` and `type` (and response headers) spelled out."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message, status_code=status_code)
        self.param, self.code, self.type, self.headers = param, code, type, headers or {}


# --------------------------------------------------------------------------- errors


def error_body(message: Any, status_code: int, param: str | None = None, code: str | None = None,
               type: str | None = None, tip: str | None = None) -> tuple[dict, int]:
    if isinstance(message, dict):  # field -> messages (validation errors)
        fields = list(message)
        param = param or (OPENAI_PARAM.get(fields[0], fields[0]) if fields else None)
        message = " ".join(text for texts in message.values() for text in (texts if isinstance(texts, list) else [texts]))
    text = str(message)
    if status_code == 422:  # OpenAI answers invalid fields with a 400
        status_code = 400
    if status_code == 401:
        text = "Incorrect API key provided. Send a key of this server as `Authorization: Bearer <key>`."
    elif tip:
        text = f"{text.rstrip('. ')}. {tip}"
    if code is None:
        code = "model_not_found" if status_code == 404 and param == "model" else ERROR_CODES.get(status_code)
    if type is None:
        type = ERROR_TYPES.get(status_code) or ("server_error" if status_code >= 500 else "invalid_request_error")
    return {"error": {"message": text, "type": type, "param": param, "code": code}}, status_code


def openai_error_shape(message, tip: str | None, status_code: int) -> tuple[dict, int]:
    """The error shape of every path under /v1/ (`infra.web.envelopes` picks it by prefix)."""
    return error_body(message, status_code, tip=tip)


def validation_error(exc: ValidationError, names: dict[str, str] | None = None) -> OpenAIError:
    """A request model's first problem as OpenAI's 400, `param` the field as the client sent it."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or None
    param = (names or OPENAI_PARAM).get(field, field) if field else None
    if error["type"] == "missing":
        text = f"Missing required parameter: '{param}'."
    elif error["type"] == "value_error":
        text = f"Invalid '{param}': {error['ctx']['error']}."
    else:
        text = f"Invalid '{param}': {error['msg']}."
    return OpenAIError(text, 400, param=param)


# --------------------------------------------------------------------------- auth


def _authorized(usage_name: str, limiter: RateLimiter) -> Callable:
    """`infra.web.auth.authorize` for these routes: the key (a Bearer token), its rate limit, the
    request metered; the body is read by the route (JSON or multipart)."""

    async def caller(request: Request) -> AsyncIterator[Caller]:
        runtime = request.app.state.runtime
        settings = runtime.settings
        key = check_key({}, request, settings, usage_name, False)
        caller_id = key_id(key)
        admin = not settings.admin_api_keys or any(hmac.compare_digest(key.encode(), k.encode())
                                                   for k in settings.admin_api_keys)
        failed = True
        try:
            limiter.check(caller_id)
            yield Caller(key_id=caller_id, base_url=(settings.public_url or str(request.base_url)).rstrip("/"),
                         admin=admin)
            failed = False
        finally:
            runtime.usage.request(caller_id, usage_name, failed)

    return caller


# --------------------------------------------------------------------------- the OpenAI fields


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """"WxH" -> (W, H), each a multiple of 8 from 8 to 1024; `auto` or nothing -> (None, None)."""
    if size is None:
        return None, None
    found = re.fullmatch(SIZE_PATTERN, size)
    if found is None:
        if re.fullmatch(r"[ \t]*[0-9]+[ \t]*[Xx][ \t]*[0-9]+[ \t]*", size):
            raise OpenAIError(f"Invalid size '{size}': width and height must be multiples of 8 from 8 to 1024 "
                              "(e.g. 512x512, 768x512, 1024x1024).", param="size")
        raise OpenAIError(f"Invalid size '{size}': send WIDTHxHEIGHT, e.g. 512x512.", param="size")
    if found.group(1) is None:  # auto, or blank
        return None, None
    return int(found.group(1)), int(found.group(2))


def _check_unavailable(req: OpenAIImageRequest) -> None:
    if getattr(req, "stream", None):
        raise OpenAIError("Streaming is not available on this server: send stream false or leave it out.", param="stream")
    if (getattr(req, "background", None) or "").lower() == "transparent":
        raise OpenAIError("Transparent backgrounds are not available on this server: send background auto or opaque.",
                          param="background")
    if req.output_format and req.output_format.lower() != "png":
        raise OpenAIError(f"output_format {req.output_format!r} is not available: this server makes PNG images.",
                          param="output_format")


def _is_openai_name(model: str) -> bool:
    return model.lower().startswith(OPENAI_MODEL_PREFIXES)


def resolve_model(requested: str | None, rt: "Runtime", inpaint: bool = False) -> str | None:
    """The ModelsLab `model_id` for `model`: None (the handler's default) for none, OpenAI's names,
    placeholders and the default model's own id; a model of this server as it is; else 404."""
    settings = rt.settings
    if requested is None or not requested.strip():
        return None
    model = requested.strip()
    default = settings.default_inpaint_model_id if inpaint else settings.default_model_id
    if _is_openai_name(model) or model in settings.placeholder_model_ids or model == default:
        return None
    try:
        entry = rt.weights.get(model)
    except ApiError:  # not even a valid model id
        entry = None
    if entry is None or entry.category not in PIPELINE_CATEGORIES:
        raise OpenAIError(f"The model '{model}' does not exist on this server (GET /v1/models lists its models).",
                          404, param="model", code="model_not_found")
    return model  # one still loading (or failed): the handler says so


def response_format(req: OpenAIImageRequest) -> str:
    """As sent; else `url`, or `b64_json` for a GPT Image model name (OpenAI answers those in base64 only,
    so their clients read `b64_json`)."""
    if req.response_format:
        return req.response_format
    model = (req.model or "").strip().lower()
    return "b64_json" if model.startswith(("gpt-image", "chatgpt-image")) else "url"


def _extras(req: OpenAIImageRequest, target: type[BaseModel]) -> dict:
    """The fields of the ModelsLab request `target` the client sent beside the OpenAI ones."""
    names = set()
    for name, field in target.model_fields.items():
        names.add(name)
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias)
    sent = {**(req.model_extra or {})}
    for name in ("negative_prompt", "seed"):
        if getattr(req, name, None) is not None:
            sent[name] = getattr(req, name)
    return {k: v for k, v in sent.items() if k in names and k not in RESERVED}


def _steps(quality: str | None) -> dict:
    steps = QUALITY_STEPS.get((quality or "").strip().lower())
    return {"num_inference_steps": steps} if steps else {}


def _modelslab_request(target: type[rq.GenerationRequest], fields: dict, extras: dict,
                       request: Request, caller: Caller, endpoint: str) -> tuple[rq.GenerationRequest, Caller]:
    """The ModelsLab request of the job (extras win over the mapped defaults, never over the fields
    this module sets), with the job headers (Idempotency-Key, Cancel-After) applied."""

    data = {**{k: v for k, v in fields.items() if k not in RESERVED}, **extras,
            **{k: v for k, v in fields.items() if k in RESERVED}}
    data = {k: v for k, v in data.items() if v is not None}
    data, caller = job_headers(request, data, caller, endpoint)
    try:
        return target.model_validate(data), caller
    except ValidationError as exc:
        raise validation_error(exc) from None


# --------------------------------------------------------------------------- uploads


async def _read_form(request: Request, settings):
    """The multipart form, the body capped at max_body_bytes as JSON bodies are."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise OpenAIError("Send this request as multipart/form-data (the image as a file field).")
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    too_big = PayloadTooLarge(f"The request body is larger than {limit // (1024 * 1024)} MiB")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)

    async def body():
        yield b"".join(chunks)

    try:
        return await MultiPartParser(request.headers, body(), max_files=MAX_FORM_FILES, max_fields=200,
                                     max_part_size=1024 * 1024).parse()
    except MultiPartException as exc:
        raise OpenAIError(f"The multipart form could not be read: {exc.message}") from None


def _form_fields(form) -> dict:
    return {name: value for name, value in form.multi_items() if isinstance(value, str)}


async def _one_file(form, field: str, required: bool = True) -> bytes | None:
    files = [v for name, v in form.multi_items() if name in (field, f"{field}[]") and isinstance(v, UploadFile)]
    if not files:
        if any(name in (field, f"{field}[]") for name, _ in form.multi_items()):
            raise OpenAIError(f"'{field}' must be a file (an image), not a text field.", param=field)
        if required:
            raise OpenAIError(f"Missing required parameter: '{field}'.", param=field)
        return None
    if len(files) > 1:
        raise OpenAIError(f"Send one '{field}': this server edits one image per request.", param=field)
    return await files[0].read()


def _open_image(data: bytes, field: str, settings) -> Image.Image:
    """An uploaded image, its mode (and alpha) kept; a 400 naming `field` when it is unusable."""
    if len(data) > settings.max_input_image_bytes:
        raise OpenAIError(f"'{field}' is larger than {settings.max_input_image_bytes // (1024 * 1024)} MiB.", param=field)
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > settings.max_input_image_pixels:
            raise OpenAIError(f"'{field}' is {image.width}x{image.height} pixels, more than the "
                              f"{settings.max_input_image_pixels} pixels this server accepts.", param=field)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise OpenAIError(f"'{field}' is not a readable image: send a PNG (or JPEG / WebP).", param=field) from None
    return ImageOps.exif_transpose(image)


def edit_area(image: Image.Image, field: str) -> Image.Image:
    """OpenAI's edit area (the fully transparent pixels of `image`) as the engine's mask: an L image,
    white (255) = repaint, black (0) = keep."""
    if image.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in image.info:
        raise OpenAIError(
            f"'{field}' has no alpha channel: the area to edit is where it is fully transparent "
            + ("(send a PNG mask with transparency)." if field == "mask" else "(send a mask, or an image with "
               "transparent pixels)."), param=field)
    alpha = image.convert("RGBA").getchannel("A")
    area = alpha.point(lambda a: 255 if a == 0 else 0)
    if area.getbbox() is None:
        raise OpenAIError(f"'{field}' has no fully transparent pixels: there is nothing to edit.", param=field)
    return area


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# --------------------------------------------------------------------------- the job and its answer


def wait_budget(request: Request, settings) -> float:
    """How long the request waits for its job: the longest this server holds a connection, and
    never past the client's own read timeout (less a margin) when it says it."""
    budget = max(settings.sync_timeout, settings.stream_max_seconds)
    told = request.headers.get("x-stainless-read-timeout", "")
    try:
        client = float(told)
    except ValueError:
        client = 0.0
    if client > 0:
        budget = min(budget, max(client - CLIENT_MARGIN, client / 2))
    return max(0.0, budget)


async def _submit_and_answer(handler: Callable, parsed: rq.GenerationRequest, response_format: str, prompt_sent: str,
                             runtime: "Runtime", caller: Caller, budget: float) -> JSONResponse:
    submitted = await run_in_threadpool(handler, parsed, runtime, caller)
    job = await runtime.jobs.wait_async(submitted.job.id, budget) or submitted.job
    fetch = caller.url(f"/api/v1/enterprise/fetch/{job.id}")
    if not job.done:
        raise OpenAIError(
            f"Job {job.id} did not finish within the {budget:g} s this request may wait; it is still running. Get its "
            f"result later with POST {fetch} (the ModelsLab API, same key) or cancel it with POST "
            f"{caller.url(f'/api/v1/enterprise/cancel/{job.id}')}.",
            504, code="job_not_finished", type="timeout", headers={**NO_RETRY, "x-job-id": str(job.id)})
    if job.status != "success":
        cancelled = getattr(job, "cancelled", False)
        raise OpenAIError(f"Job {job.id} {'was cancelled' if cancelled else 'failed'}: {job.message or 'no reason given'}",
                          500, code="job_cancelled" if cancelled else "job_failed", type="server_error",
                          headers={**NO_RETRY, "x-job-id": str(job.id)})
    ran = (job.meta or {}).get("prompt")
    revised = ran if isinstance(ran, str) and ran != prompt_sent else None
    if response_format == "b64_json":
        outputs = await run_in_threadpool(read_outputs, job, runtime)
        data = [{"b64_json": base64.b64encode(png).decode()} for png in outputs]
    else:
        data = [{"url": link} for link in job.future_links]
    if revised:
        data = [{**item, "revised_prompt": revised} for item in data]
    return JSONResponse({"created": int(time.time()), "data": data}, headers={"x-job-id": str(job.id)})


def read_outputs(job, rt: "Runtime") -> list[bytes]:
    """The stored PNGs of a finished job: local files read directly, others fetched by their links."""
    outputs = []
    for key, link in zip(job.output_keys, job.future_links, strict=True):
        data = None
        if job.storage_id == LOCAL:
            path = rt.storage.open_path(key)
            data = path.read_bytes() if path is not None else None
        else:
            try:
                response = httpx.get(link, timeout=30, follow_redirects=True)
                data = response.content if response.status_code == 200 else None
            except httpx.HTTPError:
                data = None
        if data is None:
            raise OpenAIError(f"Job {job.id}: the output {key} could not be read back; its link is {link}", 500,
                              type="server_error")
        outputs.append(data)
    return outputs


# --------------------------------------------------------------------------- models


def list_models(rt: "Runtime") -> list[ModelObject]:
    """The models a request may name: ready pipeline models, and the default models still to be
    fetched on their first use."""
    settings = rt.settings
    models = [ModelObject(id=e.model_id, created=int(e.loaded_at), owned_by="system")
              for e in rt.weights.list() if e.category in PIPELINE_CATEGORIES and e.status == READY]
    listed = {m.id for m in models}
    for model_id, source in ((settings.default_model_id, settings.default_model_source),
                             (settings.default_inpaint_model_id, settings.default_inpaint_model_source)):
        if source and model_id not in listed:
            models.append(ModelObject(id=model_id, created=0, owned_by="system"))
            listed.add(model_id)
    return models


# --------------------------------------------------------------------------- routes


def _form_schema(model: type[BaseModel], files: dict[str, bool]) -> dict:
    """A multipart route's form: the model's fields (a form has no `null`: a field not sent is
    unset) and its files."""
    schema = model.model_json_schema()
    schema.pop("title", None)
    for field in schema["properties"].values():
        options = [option for option in field.pop("anyOf", []) if option.get("type") != "null"]
        if len(options) == 1:
            field.update(options[0])
        elif options:
            field["anyOf"] = options
    for name, required in files.items():
        schema["properties"] = {name: {"type": "string", "format": "binary",
                                       "description": f"The {name} file (PNG)" + ("" if required else "; optional")},
                                **schema["properties"]}
        if required:
            schema.setdefault("required", []).insert(0, name)
    return schema


def _body_extra(content_type: str, schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}


ERRORS = {status: {"model": ErrorBody, "description": description} for status, description in {
    400: "Invalid request (invalid_request_error; `param` names the field)",
    401: "Invalid API key (invalid_api_key)",
    404: "Unknown model (model_not_found)",
    413: "Request body too large",
    429: "Rate limit exceeded (rate_limit_exceeded)",
    500: "The job failed (server_error)",
    504: "The job did not finish in time (job_not_finished; the message names the job and its fetch route)",
}.items()}


def add_routes(app: FastAPI, runtime: "Runtime", limiter: RateLimiter) -> None:
    """The OpenAI routes under /v1/, their error shape, and OpenAI-shaped validation errors there."""
    register_error_shape(f"{PREFIX}/", openai_error_shape)

    async def openai_error(request: Request, exc: OpenAIError):
        body, status = error_body(exc.message, exc.status_code, exc.param, exc.code, exc.type)
        return JSONResponse(body, status_code=status, headers=exc.headers)

    async def invalid_request(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith(f"{PREFIX}/"):
            return await request_validation_exception_handler(request, exc)
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        body, status = error_body(f"Invalid '{param}': {first.get('msg', 'invalid request')}.", 400, param=param)
        return JSONResponse(body, status_code=status)

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, invalid_request)

    generations_auth = _authorized("openai/images/generations", limiter)
    edits_auth = _authorized("openai/images/edits", limiter)
    variations_auth = _authorized("openai/images/variations", limiter)
    models_auth = _authorized("openai/models", limiter)

    async def generations(request: Request, caller: Annotated[Caller, Depends(generations_auth)]):
        body = await read_body(request)
        if body.problem:
            raise OpenAIError(str(body.problem.message))
        try:
            req = ImageGenerationRequest.model_validate(body.data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        _check_unavailable(req)
        width, height = parse_size(req.size)
        fields = {"prompt": req.prompt, "samples": req.n or 1, "width": width, "height": height,
                  "model_id": await run_in_threadpool(resolve_model, req.model, runtime), "base64": False,
                  **_steps(req.quality)}
        if (req.style or "").strip().lower() == "natural":
            fields["enhance_prompt"] = False
        parsed, caller = _modelslab_request(rq.Text2ImgRequest, fields, _extras(req, rq.Text2ImgRequest), request,
                                            caller, "openai/images/generations")
        return await _submit_and_answer(generation.text2img, parsed, response_format(req), req.prompt,
                                        runtime, caller, wait_budget(request, runtime.settings))

    async def edits(request: Request, caller: Annotated[Caller, Depends(edits_auth)]):
        settings = runtime.settings
        form = await _read_form(request, settings)
        try:
            req = ImageEditRequest.model_validate(_form_fields(form))
        except ValidationError as exc:
            raise validation_error(exc) from None
        _check_unavailable(req)
        width, height = parse_size(req.size)
        image_bytes = await _one_file(form, "image")
        mask_bytes = await _one_file(form, "mask", required=False)
        image = _open_image(image_bytes, "image", settings)
        if mask_bytes is not None:
            mask = _open_image(mask_bytes, "mask", settings)
            if mask.size != image.size:
                raise OpenAIError(f"'mask' is {mask.width}x{mask.height} but 'image' is {image.width}x{image.height}: "
                                  "they must have the same size.", param="mask")
            area = edit_area(mask, "mask")
        else:
            area = edit_area(image, "image")
        fields = {"prompt": req.prompt, "samples": req.n or 1, "width": width, "height": height,
                  "model_id": await run_in_threadpool(resolve_model, req.model, runtime, True), "base64": False,
                  "init_image": _b64(image_bytes), "mask_image": _png_b64(area), "strength": EDIT_STRENGTH,
                  **_steps(req.quality)}
        parsed, caller = _modelslab_request(rq.InpaintRequest, fields, _extras(req, rq.InpaintRequest), request,
                                            caller, "openai/images/edits")
        return await _submit_and_answer(generation.inpaint, parsed, response_format(req), req.prompt,
                                        runtime, caller, wait_budget(request, settings))

    async def variations(request: Request, caller: Annotated[Caller, Depends(variations_auth)]):
        settings = runtime.settings
        form = await _read_form(request, settings)
        fields_sent = _form_fields(form)
        try:
            req = ImageVariationRequest.model_validate(fields_sent)
        except ValidationError as exc:
            raise validation_error(exc) from None
        _check_unavailable(req)
        width, height = parse_size(req.size)
        image_bytes = await _one_file(form, "image")
        _open_image(image_bytes, "image", settings)  # a readable image, or a 400 naming it
        prompt = (fields_sent.get("prompt") or "").strip() or VARIATION_PROMPT
        fields = {"prompt": prompt, "samples": req.n or 1, "width": width, "height": height,
                  "model_id": await run_in_threadpool(resolve_model, req.model, runtime), "base64": False,
                  "init_image": _b64(image_bytes), "strength": VARIATION_STRENGTH, "enhance_prompt": False}
        parsed, caller = _modelslab_request(rq.Img2ImgRequest, fields, _extras(req, rq.Img2ImgRequest), request,
                                            caller, "openai/images/variations")
        return await _submit_and_answer(generation.img2img, parsed, response_format(req), prompt,
                                        runtime, caller, wait_budget(request, settings))

    async def models(caller: Annotated[Caller, Depends(models_auth)]):
        found = await run_in_threadpool(list_models, runtime)
        return JSONResponse(ModelList(data=found).model_dump(mode="json"))

    async def model(model_id: str, caller: Annotated[Caller, Depends(models_auth)]):
        found = next((m for m in await run_in_threadpool(list_models, runtime) if m.id == model_id), None)
        if found is None:
            raise OpenAIError(f"The model '{model_id}' does not exist on this server (GET /v1/models lists its models).",
                              404, param="model", code="model_not_found")
        return JSONResponse(found.model_dump(mode="json"))

    def image_route(path: str, endpoint, summary: str, extra: dict, operation_id: str) -> None:
        app.add_api_route(f"{PREFIX}{path}", endpoint, methods=["POST"], name=f"openai:{path}", tags=[TAG],
                          summary=summary, operation_id=operation_id, openapi_extra=extra,
                          responses={200: {"model": ImagesResponse}, **ERRORS})

    generation_schema = ImageGenerationRequest.model_json_schema()
    generation_schema.pop("title", None)
    image_route("/images/generations", generations, "OpenAI: create images from a prompt (text2img)",
                _body_extra("application/json", generation_schema), "openai_images_generations")
    image_route("/images/edits", edits, "OpenAI: edit an image where it (or the mask) is transparent (inpainting)",
                _body_extra("multipart/form-data", _form_schema(ImageEditRequest, {"image": True, "mask": False})),
                "openai_images_edits")
    image_route("/images/variations", variations,
                f"OpenAI: variations of an image (img2img, strength {VARIATION_STRENGTH})",
                _body_extra("multipart/form-data", _form_schema(ImageVariationRequest, {"image": True})),
                "openai_images_variations")
    app.add_api_route(f"{PREFIX}/models", models, methods=["GET"], name="openai:models", tags=[TAG],
                      summary="OpenAI: the image models of this server", operation_id="openai_models_list",
                      responses={200: {"model": ModelList}, 401: ERRORS[401], 429: ERRORS[429]})
    app.add_api_route(f"{PREFIX}/models/{{model_id}}", model, methods=["GET"], name="openai:model", tags=[TAG],
                      summary="OpenAI: one model of this server", operation_id="openai_models_retrieve",
                      responses={200: {"model": ModelObject}, 401: ERRORS[401], 404: ERRORS[404], 429: ERRORS[429]})


__all__ = ["MAX_IMAGES", "OpenAIError", "add_routes", "edit_area", "parse_size", "resolve_model", "wait_budget"]
