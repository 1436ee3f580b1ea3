"""The model catalog: load_model, load_model_v2, load_vae, verify_model, get_all_models,
delete_model and sync_models, on the weights store.

A load is claimed at once (a `loading` manifest, so a duplicate id is refused and verify_model
answers "still loading") and runs in the background on the engine side; its outcome shows in
verify_model / get_all_models and is posted to `webhook` when one is given.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import httpx

from handlers.caller import Caller
from infra.catalog.known import BUILTIN_MODELS, CONTROLNET_11_IDS
from infra.catalog.loader import source_kind
from infra.catalog.weights import FAILED, LOADING, PIPELINE_CATEGORIES, READY, LoadRequest, validate_model_id
from infra.net import fetcher
from infra.storage.links import archive_path
from models.errors import BadInput, Conflict, NotFound
from models.requests import (
    KeyOnlyRequest,
    LoadModelRequest,
    LoadModelV2Request,
    LoadVaeRequest,
    ModelIdRequest,
    SyncModelsRequest,
)
from models.responses import MessageResponse, ModelListResponse

if TYPE_CHECKING:
    from infra.runtime import Runtime

# load_model's model_type -> store category (None: a Stable Diffusion pipeline, family detected)
MODEL_TYPE_CATEGORY = {
    "huggingface": None,
    "api_trained": None,
    "custom_ckpt": None,
    "lora": "lora",
    "controlnet": "controlnet",
    "embeddings": "embeddings",
    "vae": "vae",
}


def load_model(req: LoadModelRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    category = MODEL_TYPE_CATEGORY[req.model_type]
    model_id = req.model_id
    if model_id is None and category == "controlnet":
        model_id = CONTROLNET_11_IDS.get(req.url.removeprefix("https://huggingface.co/").strip("/"))
    if model_id is None:
        # a 400, not a field error: whether the id may be left out depends on the url (a rule no schema can say)
        raise BadInput("load_model needs a model_id: only a ControlNet 1.1 repo's id can be left out",
                       tip="Name the model: model_id.")
    request = LoadRequest(model_id, req.url, category, req.revision, req.upcast_attention, req.webhook,
                          _base_model(req.base_model, category, rt))
    return _start_load(request, rt, "model load started")


def load_model_v2(req: LoadModelV2Request, rt: Runtime, caller: Caller) -> MessageResponse:
    """model_category, or (as the docs' older examples send) load_model's model_type; the format is
    read from the file either way."""
    if req.model_category is not None:
        category = None if req.model_category == "stable_diffusion" else req.model_category
    else:
        category = MODEL_TYPE_CATEGORY[req.model_type]
    request = LoadRequest(req.model_id, req.url, category, req.revision, req.upcast_attention, req.webhook,
                          _base_model(req.base_model, category, rt))
    return _start_load(request, rt, "model load started")


# a single file of these categories may lack the rest of its pipeline: it comes from a base model of the family
BASE_FAMILIES = {"flux": "flux", "flux_kontext": "flux", "flux_fill": "flux", "sd3": "sd3"}


def _base_model(requested: str | None, category: str | None, rt: Runtime) -> str | None:
    """The model a Flux.1 / SD3 single file takes its text encoders, tokenizers, VAE and scheduler
    from: the one named (a ready pipeline, checked now), else for a claimed Flux / SD3 category the
    first loaded model of that family (None: the file must carry them, or its load fails saying so)."""
    if requested:
        entry = rt.weights.require(requested, PIPELINE_CATEGORIES, "base_model")
        if category in BASE_FAMILIES and entry.family != BASE_FAMILIES[category]:
            raise BadInput(f"base_model {requested} is not a {BASE_FAMILIES[category]} model (it is {entry.family or entry.category})",
                           tip=f"Name a loaded {BASE_FAMILIES[category]} model, or leave base_model out.")
        return requested
    family = BASE_FAMILIES.get(category or "")
    base = rt.weights.first_ready(PIPELINE_CATEGORIES, family) if family else None
    return base.model_id if base else None


def load_vae(req: LoadVaeRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    request = LoadRequest(req.vae_id, req.vae_url, "vae", req.revision, False, req.webhook)
    return _start_load(request, rt, "VAE load started")


def _start_load(request: LoadRequest, rt: Runtime, message: str) -> MessageResponse:
    validate_model_id(request.model_id)
    # a bad source, or a URL or webhook on a private address, is refused now, not in the background
    allowlist = rt.settings.fetch_allowlist
    if source_kind(request.source, rt.settings.allow_local_model_paths) == "url":
        fetcher.check_url(request.source, "url", allowlist)
    if request.webhook:
        fetcher.check_url(request.webhook, "webhook", allowlist)
    rt.weights.begin(request.entry())
    rt.dispatcher.load(request)
    return MessageResponse(
        message=message,
        model_id=request.model_id,
        tip="verify_model tells when it is ready (or why it failed); get_all_models lists it.",
    )


def verify_model(req: ModelIdRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    entry = rt.weights.get(validate_model_id(req.model_id))
    if entry is None:
        raise NotFound(f"Model id not found: {req.model_id}", tip="get_all_models lists the models on this server.")
    if entry.status == LOADING:
        return MessageResponse(status="processing", message="Model is still loading", model_id=entry.model_id)
    if entry.status == FAILED:
        raise BadInput(
            f"Model {req.model_id} failed to load: {entry.message}",
            tip="Fix the source and load it again (delete_model frees the id).",
        )
    return MessageResponse(message="Model exists on server", model_id=entry.model_id, category=entry.category)


def get_all_models(req: KeyOnlyRequest, rt: Runtime, caller: Caller) -> ModelListResponse:
    models = []
    for entry in rt.weights.list():
        item = {
            "model_id": entry.model_id,
            "load_data": time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(entry.loaded_at)),
            "category": entry.category,
            "status": entry.status,
        }
        if entry.family:  # the model family a pipeline is, or a LoRA / ControlNet was made for
            item["family"] = entry.family
        if entry.status == FAILED:
            item["message"] = entry.message
        models.append(item)
    return ModelListResponse(models=models)


def delete_model(req: ModelIdRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    model_id = validate_model_id(req.model_id)
    entry = rt.weights.get(model_id)
    if entry is None:
        raise NotFound(f"Model id not found: {model_id}", tip="get_all_models lists the models on this server.")
    if entry.status == LOADING:
        raise Conflict(f"Model {model_id} is still loading", tip="Delete it when verify_model says it is ready or failed.")
    if model_id in (rt.settings.default_model_id, rt.settings.default_inpaint_model_id):
        raise Conflict(
            f"Model {model_id} is this server's default model",
            tip="Set SDAPI_DEFAULT_MODEL_ID / SDAPI_DEFAULT_INPAINT_MODEL_ID to another model first.",
        )
    busy = [job.id for job in rt.jobs.processing() if model_id in job.models_used()]
    if busy:
        raise Conflict(
            f"Model {model_id} is in use by {len(busy)} queued or running job(s): {', '.join(map(str, busy[:5]))}",
            tip="Delete it when they have finished (fetch shows their status).",
        )
    rt.dispatcher.evict(model_id)
    rt.weights.delete(model_id)
    return MessageResponse(message="Model deleted on server", model_id=model_id)


def sync_models(req: SyncModelsRequest, rt: Runtime, caller: Caller) -> MessageResponse:
    """Ask another deployment of this server to load every ready model of this one, from signed
    archive links served here (see `infra.web.api` `model_archive`). The target loads in the
    background, like any load_model; ids it already has are skipped."""
    target = (req.sync_url or rt.settings.sync_url or "").rstrip("/")
    if not target.startswith(("http://", "https://")):
        raise BadInput(
            "sync_url is required: the base URL of the deployment to copy the models to",
            tip="Send sync_url (e.g. https://other.example) or set SDAPI_SYNC_URL on this server.",
        )
    try:  # a client-given URL: refused at once when it points into a private network
        parsed = httpx.URL(target)
        fetcher.resolve(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80), rt.settings.fetch_allowlist)
    except httpx.HTTPError as exc:  # InvalidURL, or a host that does not resolve
        raise BadInput(f"cannot reach the sync target {target}: {exc}") from None
    synced, skipped, failed = [], [], {}
    for entry in rt.weights.list():
        if entry.status != READY or entry.model_id in BUILTIN_MODELS:
            continue
        body = {
            "key": req.sync_key,
            "url": caller.url(archive_path(entry.model_id, rt.settings)),
            "model_id": entry.model_id,
            "model_category": entry.category,
            "model_format": "archive",
            "revision": entry.precision,
        }
        response = _post_json(f"{target}/api/v1/enterprise/load_model_v2", body, rt.settings.fetch_allowlist, target)
        if response.status_code == 401:
            raise BadInput("the sync target rejected sync_key", tip="Send the enterprise key of the target server.")
        if response.status_code == 409:
            skipped.append(entry.model_id)
        elif response.is_success:
            synced.append(entry.model_id)
        else:
            failed[entry.model_id] = _message(response)
    return MessageResponse(
        message=f"{len(synced)} Models synced successfully",
        model_list=synced,
        skipped=skipped,
        failed=failed,
    )


def _post_json(url: str, body: dict, allowlist: list[str], target: str) -> httpx.Response:
    """POST through the SSRF-safe fetcher (the target is a client-given URL), response read."""
    try:
        with fetcher.stream("POST", url, allowlist=allowlist, timeout=30.0, follow_redirects=False,
                            headers={"Content-Type": "application/json"}, content=json.dumps(body).encode()) as response:
            response.read()
            return response
    except httpx.HTTPError as exc:
        raise BadInput(f"cannot reach the sync target {target}: {type(exc).__name__}") from None


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message"))
    except ValueError:
        return f"HTTP {response.status_code}"
