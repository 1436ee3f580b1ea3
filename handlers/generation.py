"""text2img, img2img and inpaint.

A handler checks everything a client could get wrong *before* a job exists (model id, sizes,
scheduler, input images), resolves the effective parameters (seed, size, enhanced prompt),
creates the job with its output links fixed, hands it to the dispatcher and waits up to the
sync budget: `success` if it finished, `processing` with `fetch_result` if not.
"""

from __future__ import annotations

import secrets
import uuid

from handlers.queue import job_envelope
from infra.engine.schedulers import SchedulerError, resolve_algorithm, resolve_name
from infra.inputs import encode_png, load_image
from infra.jobs import Job
from infra.weights import PIPELINE_CATEGORIES, READY, validate_model_id
from models.errors import ApiError, BadInput, NotAvailable, NotFound
from models.requests import GenerationRequest, Img2ImgRequest, InpaintRequest, Text2ImgRequest
from models.responses import JobResponse

DEFAULT_SIZE = 512
MAX_SIZE = 1024
MASK_ASPECT_TOLERANCE = 0.02

# documented fields whose feature later work adds; asking for them is an error, not a no-op
_NOT_YET = {
    "safety_checker": "the NSFW safety checker",
    "lora_model": "LoRA models",
    "vae": "custom VAEs",
    "embeddings_model": "textual-inversion embeddings",
    "upscale": "upscaling",
    "highres_fix": "highres_fix",
    "panorama": "panorama generation",
    "self_attention": "self-attention guidance",
    "multi_lingual": "prompt translation",
    "base64": "base64 output",
    "temp": "temporary links",
    "ip_adapter_id": "IP-Adapter",
    "ip_adapter_image": "IP-Adapter",
}


def text2img(req: Text2ImgRequest, rt) -> JobResponse:
    return _generate("text2img", req, rt, images={})


def img2img(req: Img2ImgRequest, rt) -> JobResponse:
    init = load_image(req.init_image, "init_image", rt.settings)
    return _generate("img2img", req, rt, images={"init_image": init})


def inpaint(req: InpaintRequest, rt) -> JobResponse:
    init = load_image(req.init_image, "init_image", rt.settings)
    mask = load_image(req.mask_image, "mask_image", rt.settings)
    init_ratio, mask_ratio = init.width / init.height, mask.width / mask.height
    if abs(mask_ratio - init_ratio) > MASK_ASPECT_TOLERANCE * init_ratio:
        raise BadInput(
            f"mask_image is {mask.width}x{mask.height} but init_image is {init.width}x{init.height}: "
            "they must have the same aspect ratio",
            tip="Send a mask of the same size as init_image (white = repaint, black = keep).",
        )
    return _generate("inpaint", req, rt, images={"init_image": init, "mask_image": mask.convert("L")})


# --------------------------------------------------------------------------- shared steps


def _generate(task: str, req: GenerationRequest, rt, images: dict) -> JobResponse:
    _reject_unavailable(req)
    model_id = resolve_model(task, req.model_id, rt)
    scheduler, algorithm = _resolve_scheduler(req, model_id, rt)
    width, height = _output_size(req, images.get("init_image"))
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    seeds = [(seed + i) % 2**32 for i in range(req.samples)]
    prompt = enhance_prompt(req.prompt, rt.settings.enhance_prompt_suffix) if req.enhance_prompt else req.prompt
    strength = getattr(req, "strength", None)
    file_prefix = str(uuid.uuid4())
    output_keys = [f"generations/{file_prefix}-{i}.png" for i in range(req.samples)]

    params = {
        "model_id": model_id,
        "prompt": prompt,
        "negative_prompt": req.negative_prompt,
        "width": width,
        "height": height,
        "samples": req.samples,
        "steps": req.num_inference_steps,
        "guidance_scale": req.guidance_scale,
        "seeds": seeds,
        "scheduler": scheduler,
        "use_karras_sigmas": req.use_karras_sigmas,
        "algorithm": algorithm,
        "clip_skip": req.clip_skip,
    }
    if strength is not None:
        params["strength"] = strength
    meta = _meta(req, params, seed, file_prefix)

    inputs = {name: encode_png(_fit(image, width, height)) for name, image in images.items()}
    job = Job(
        id=0,
        endpoint=task,
        params=params,
        meta=meta,
        output_keys=output_keys,
        future_links=[rt.storage.url(key, rt.base_url) for key in output_keys],
        eta=rt.dispatcher.estimate(params),
        webhook=req.webhook,
        track_id=req.track_id,
    )
    job = rt.jobs.create(job, inputs)
    rt.dispatcher.submit(job.id)
    budget = 0.0 if req.instant_response else rt.settings.sync_timeout
    return job_envelope(rt.jobs.wait(job.id, budget), rt)


def resolve_model(task: str, requested: str | None, rt) -> str:
    """The model id a request runs on, checked to exist, be ready and suit the task."""
    settings = rt.settings
    if requested is None or requested in settings.placeholder_model_ids:
        requested = settings.default_inpaint_model_id if task == "inpaint" else settings.default_model_id
    entry = rt.weights.get(validate_model_id(requested))
    if entry is None:
        raise NotFound(
            f"Model id not found: {requested}",
            tip="get_all_models lists the models on this server; load_model adds one.",
        )
    if entry.status != READY:
        raise BadInput(f"Model {requested} is not ready ({entry.status}); check it with verify_model")
    if entry.category not in PIPELINE_CATEGORIES:
        raise BadInput(f"Model {requested} is a {entry.category} model, not one that can generate images on its own")
    if entry.category == "inpaint" and task != "inpaint":
        raise BadInput(
            f"Model {requested} is an inpainting model; use it with the inpaint endpoint",
            tip=f"Pick a text-to-image model for {task} (get_all_models lists them).",
        )
    return requested


def enhance_prompt(prompt: str, suffix: str) -> str:
    """Deterministic prompt enhancement: append the quality terms of `suffix` the prompt lacks."""
    have = prompt.lower()
    missing = [term.strip() for term in suffix.split(",") if term.strip() and term.strip().lower() not in have]
    return ", ".join([prompt.rstrip(" ,"), *missing]) if missing else prompt


def _reject_unavailable(req: GenerationRequest) -> None:
    for field, feature in _NOT_YET.items():
        if getattr(req, field, None):
            raise NotAvailable(
                f"{field}: {feature} is not available on this server yet",
                tip=f"Leave {field} out (or send null / \"no\").",
            )


def _resolve_scheduler(req: GenerationRequest, model_id: str, rt) -> tuple[str, str | None]:
    """(scheduler class name, diffusers algorithm_type or None); default: the model's own scheduler."""
    try:
        name = resolve_name(req.scheduler) if req.scheduler else rt.weights.default_scheduler(model_id)
        algorithm = resolve_algorithm(name, req.algorithm_type)
    except SchedulerError as exc:
        field = "algorithm_type" if "algorithm_type" in str(exc) else "scheduler"
        raise ApiError({field: [str(exc)]}, status_code=422) from None
    return name, algorithm


def _output_size(req: GenerationRequest, init) -> tuple[int, int]:
    """Requested size; else the init image's size (scaled to fit 1024, multiple of 8); else 512."""
    if init is None:
        return req.width or DEFAULT_SIZE, req.height or DEFAULT_SIZE
    scale = min(1.0, MAX_SIZE / max(init.width, init.height))
    fitted_w = max(8, int(init.width * scale) // 8 * 8)
    fitted_h = max(8, int(init.height * scale) // 8 * 8)
    return req.width or fitted_w, req.height or fitted_h


def _fit(image, width: int, height: int):
    """Resize to the output size. Masks use a box filter: an output pixel stays exactly as it was
    when its whole footprint in the sent mask is black (no ringing from the white area)."""
    from PIL import Image

    if image.size == (width, height):
        return image
    resample = Image.Resampling.BOX if image.mode == "L" else Image.Resampling.LANCZOS
    return image.resize((width, height), resample)


def _meta(req: GenerationRequest, params: dict, seed: int, file_prefix: str) -> dict:
    """The effective parameters, with the ModelsLab meta keys."""
    yes_no = lambda flag: "yes" if flag else "no"  # noqa: E731
    meta = {
        "prompt": params["prompt"],
        "model_id": params["model_id"],
        "negative_prompt": params["negative_prompt"] or "",
        "scheduler": params["scheduler"],
        "safetychecker": "no",
        "safety_checker_type": req.safety_checker_type,
        "W": params["width"],
        "H": params["height"],
        "guidance_scale": params["guidance_scale"],
        "seed": seed,
        "seeds": params["seeds"],
        "steps": params["steps"],
        "n_samples": params["samples"],
        "enhance_prompt": yes_no(req.enhance_prompt),
        "use_karras_sigmas": yes_no(req.use_karras_sigmas),
        "algorithm_type": req.algorithm_type,
        "clip_skip": req.clip_skip,
        "tomesd": "no",
        "upscale": "no",
        "multi_lingual": "no",
        "panorama": "no",
        "self_attention": "no",
        "embeddings": None,
        "lora": None,
        "lora_strength": None,
        "vae": None,
        "full_url": "no",
        "base64": "no",
        "temp": "no",
        "instant_response": yes_no(req.instant_response),
        "outdir": "out",
        "file_prefix": file_prefix,
        "webhook": req.webhook,
        "track_id": req.track_id,
    }
    if "strength" in params:
        meta["strength"] = params["strength"]
    for field in ("init_image", "mask_image"):
        ref = getattr(req, field, None)
        if ref is not None:
            meta[field] = ref if ref.lower().startswith(("http://", "https://")) else "(base64 image)"
    return meta
