"""text2img, img2img, inpaint and controlnet.

A handler checks everything a client could get wrong *before* a job exists (model id, sizes,
scheduler, input images), resolves the effective parameters (seed, size, enhanced prompt),
creates the job with its output links fixed, hands it to the dispatcher and waits up to the
sync budget: `success` if it finished, `processing` with `fetch_result` if not.
"""

from __future__ import annotations

import secrets
import uuid

from handlers.ondemand import require_model
from handlers.queue import check_output_size, expiry, output_key, submit_job, yes_no
from infra.engine.schedulers import SchedulerError, resolve_algorithm, resolve_name
from infra.net.inputs import encode_input
from infra.catalog.known import CONTROLNET_11_IDS
from infra.catalog.weights import PIPELINE_CATEGORIES, READY, ModelEntry, validate_model_id
from models.errors import ApiError, BadInput, NotAvailable, NotFound
from models.requests import ControlnetRequest, GenerationRequest, Img2ImgRequest, InpaintRequest, Text2ImgRequest
from models.responses import JobResponse

DEFAULT_SIZE = 512
MAX_SIZE = 1024
MASK_ASPECT_TOLERANCE = 0.02

# documented fields whose feature this server does not have; asking for them is an error, not a no-op
_NOT_YET = {
    "multi_lingual": "prompt translation",
    "ip_adapter_id": "IP-Adapter",
    "ip_adapter_image": "IP-Adapter",
}

# auto_hint preprocessors this server has (see infra/engine/hints.py): these need no weights...
AUTO_HINTS = ("canny", "tile", "ip2p", "qrcode", "inpaint")
# ...these run a network loaded into the store under this id (model_category "preprocessor")
PREPROCESSOR_IDS = {"depth": "depth-preprocessor"}

# text-embedding width -> the model family it means, for messages
FAMILY_BY_CONTEXT_DIM = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def text2img(req: Text2ImgRequest, rt) -> JobResponse:
    if req.panorama and req.self_attention:
        raise BadInput("panorama and self_attention cannot be combined", tip="Send one of them as \"yes\".")
    return _generate("text2img", req, rt, images={})


def img2img(req: Img2ImgRequest, rt) -> JobResponse:
    init = rt.load_image(req.init_image, "init_image")
    return _generate("img2img", req, rt, images={"init_image": init})


def inpaint(req: InpaintRequest, rt) -> JobResponse:
    init = rt.load_image(req.init_image, "init_image")
    mask = rt.load_image(req.mask_image, "mask_image")
    _check_mask(init, mask)
    return _generate("inpaint", req, rt, images={"init_image": init, "mask_image": mask.convert("L")})


def controlnet(req: ControlnetRequest, rt) -> JobResponse:
    """ControlNet generation: text2img with a hint, img2img with a hint when init_image is given,
    inpainting with a hint when mask_image is given too. The hint is control_image (one shared
    by all ControlNets, or a list with one per ControlNet), else init_image; with auto_hint it is
    first turned into the ControlNet's kind of hint (canny edges...)."""
    images = {}
    if req.init_image is not None:
        images["init_image"] = rt.load_image(req.init_image, "init_image")
    if req.mask_image is not None:
        if "init_image" not in images:
            raise BadInput("mask_image needs init_image: ControlNet inpainting repaints the init_image")
        mask = rt.load_image(req.mask_image, "mask_image")
        _check_mask(images["init_image"], mask)
        images["mask_image"] = mask.convert("L")
    hints = req.control_image or []
    if len(hints) not in (0, 1, len(req.controlnet_model)):
        raise BadInput(
            f"control_image has {len(hints)} images for {len(req.controlnet_model)} ControlNets",
            tip="Send one control_image for all ControlNets, or a list with one per ControlNet.",
        )
    for i, ref in enumerate(hints):
        images[f"control_image_{i}"] = rt.load_image(ref, "control_image")
    if not hints and "init_image" not in images:
        raise BadInput("controlnet needs a control_image (the hint) or an init_image", tip="Send control_image.")
    return _generate("controlnet", req, rt, images)


def _check_mask(init, mask) -> None:
    init_ratio, mask_ratio = init.width / init.height, mask.width / mask.height
    if abs(mask_ratio - init_ratio) > MASK_ASPECT_TOLERANCE * init_ratio:
        raise BadInput(
            f"mask_image is {mask.width}x{mask.height} but init_image is {init.width}x{init.height}: "
            "they must have the same aspect ratio",
            tip="Send a mask of the same size as init_image (white = repaint, black = keep).",
        )


# --------------------------------------------------------------------------- shared steps


def _generate(task: str, req: GenerationRequest, rt, images: dict) -> JobResponse:
    _reject_unavailable(req)
    model = resolve_model(task, req.model_id, rt, inpainting="mask_image" in images)
    scheduler, algorithm = _resolve_scheduler(req, model.model_id, rt)
    width, height = _output_size(req, images.get("init_image") or images.get("control_image_0"))
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    seeds = [(seed + i) % 2**32 for i in range(req.samples)]
    prompt = req.prompt or ""
    if prompt and req.enhance_prompt:
        prompt = enhance_prompt(prompt, rt.settings.enhance_prompt_suffix)
    strength = getattr(req, "strength", None)
    file_prefix = str(uuid.uuid4())
    output_keys = [output_key(f"{file_prefix}-{i}", req.base64) for i in range(req.samples)]

    params = {
        "model_id": model.model_id,
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
        "tomesd": req.tomesd,
        **_adapter_params(req, model, rt),
        **_output_params(req, width, height, rt),
    }
    if task == "text2img":
        params.update(panorama=req.panorama, self_attention=req.self_attention)
        if model.family == "sdxl" and (req.panorama or req.self_attention):
            feature = "panorama" if req.panorama else "self_attention"
            raise BadInput(f"{feature} is available for SD 1.x/2.x models only; {model.model_id} is SDXL")
    if task == "controlnet":
        params.update(_controlnet_params(req, model, rt), auto_hint=req.auto_hint, guess_mode=req.guess_mode)
        if "init_image" not in images:
            strength = None  # a hint only: there is no image to keep
    if strength is not None:
        params["strength"] = strength
    meta = _meta(req, params, seed, file_prefix)

    inputs = {name: encode_input(_fit(image, width, height)) for name, image in images.items()}
    return submit_job(task, params, meta, output_keys, inputs, req, rt)


def _output_params(req: GenerationRequest, width: int, height: int, rt) -> dict:
    """What happens after the first pass: highres_fix (a second pass at a larger size), upscale
    (2x through the upscaler), the safety checker, base64 files, temporary links."""
    settings = rt.settings
    params: dict = {"highres_fix": None, "upscale": None, "safety_checker": None, "base64": req.base64}
    final_w, final_h = width, height
    if req.highres_fix:
        final_w = max(8, int(width * settings.highres_fix_scale) // 8 * 8)
        final_h = max(8, int(height * settings.highres_fix_scale) // 8 * 8)
        params["highres_fix"] = {"width": final_w, "height": final_h, "strength": settings.highres_fix_strength}
    if req.upscale:
        final_w, final_h = final_w * 2, final_h * 2
        params["upscale"] = {"model_id": settings.upscale_model_id, "scale": 2}
    check_output_size(final_w, final_h, f"{width}x{height} with highres_fix/upscale", settings)
    awaiting = require_model(settings.upscale_model_id, "upscaler", "upscale", rt) if req.upscale else []
    checker = req.safety_checker if req.safety_checker is not None else settings.safety_checker_default
    if checker:
        params["safety_checker"] = {"type": req.safety_checker_type, "threshold": settings.nsfw_threshold}
    return {**params, "output_width": final_w, "output_height": final_h, "await_models": awaiting, **expiry(req.temp, settings)}


def resolve_model(task: str, requested: str | None, rt, inpainting: bool = False) -> ModelEntry:
    """The model a request runs on, checked to exist, be ready and suit the task."""
    settings = rt.settings
    if requested is None or requested in settings.placeholder_model_ids:
        requested = settings.default_inpaint_model_id if task == "inpaint" else settings.default_model_id
    entry = _catalog_entry(requested, "model_id", PIPELINE_CATEGORIES, rt)
    if entry.category == "inpaint" and not inpainting:
        raise BadInput(
            f"Model {requested} is an inpainting model; use it with the inpaint endpoint (or controlnet with a mask_image)",
            tip=f"Pick a text-to-image model for {task} (get_all_models lists them).",
        )
    return entry


def _catalog_entry(model_id: str, field: str, categories: tuple[str, ...], rt) -> ModelEntry:
    entry = rt.weights.get(validate_model_id(model_id, field))
    if entry is None:
        raise NotFound(
            f"Model id not found: {model_id} ({field})",
            tip="get_all_models lists the models on this server; load_model adds one.",
        )
    if entry.status != READY:
        raise BadInput(f"{field}: model {model_id} is not ready ({entry.status}); check it with verify_model")
    if entry.category not in categories:
        raise BadInput(
            f"{field}: model {model_id} is a {entry.category} model, not {' or '.join(categories)}",
            tip="get_all_models shows each model's category.",
        )
    return entry


def _check_fits(adapter: ModelEntry, field: str, model: ModelEntry) -> None:
    """An adapter made for another family (text-embedding width) cannot be applied."""
    if adapter.context_dim and model.context_dim and adapter.context_dim != model.context_dim:
        def family(dim: int) -> str:
            return FAMILY_BY_CONTEXT_DIM.get(dim, f"{dim}-wide text embeddings")

        raise BadInput(
            f"{field}: {adapter.model_id} was made for a model with {family(adapter.context_dim)}; "
            f"{model.model_id} has {family(model.context_dim)}",
            tip=f"Use a {adapter.category} made for the same base model family.",
        )


def _adapter_params(req: GenerationRequest, model: ModelEntry, rt) -> dict:
    """LoRAs with their strengths, the embedding and the VAE, each checked to fit the model."""
    params = {"loras": [], "embedding": None, "vae": None}
    lora_ids = req.lora_model or []
    strengths = req.lora_strength or [1.0]
    if lora_ids:
        if len(set(lora_ids)) != len(lora_ids):
            raise BadInput("lora_model names the same LoRA twice")
        if len(strengths) not in (1, len(lora_ids)):
            raise ApiError(
                {"lora_strength": [f"give one strength, or one per LoRA ({len(lora_ids)}), got {len(strengths)}"]},
                status_code=422,
            )
        if len(strengths) == 1:
            strengths = strengths * len(lora_ids)
        for lora_id, strength in zip(lora_ids, strengths, strict=True):
            _check_fits(_catalog_entry(lora_id, "lora_model", ("lora",), rt), "lora_model", model)
            params["loras"].append([lora_id, strength])
    elif req.lora_strength:
        raise BadInput("lora_strength was given without lora_model", tip="Name the LoRAs in lora_model.")
    if req.embeddings_model:
        _check_fits(_catalog_entry(req.embeddings_model, "embeddings_model", ("embeddings",), rt), "embeddings_model", model)
        params["embedding"] = req.embeddings_model
    if req.vae:
        _catalog_entry(req.vae, "vae", ("vae",), rt)
        params["vae"] = req.vae
    return params


def _controlnet_params(req: ControlnetRequest, model: ModelEntry, rt) -> dict:
    ids = req.controlnet_model
    if len(set(ids)) != len(ids):
        raise BadInput("controlnet_model names the same ControlNet twice")
    types = req.controlnet_type or ids
    scales = req.controlnet_conditioning_scale
    for field, values in (("controlnet_type", types), ("controlnet_conditioning_scale", scales)):
        if len(values) not in (1, len(ids)):
            raise ApiError({field: [f"give one value, or one per ControlNet ({len(ids)}), got {len(values)}"]}, status_code=422)
    types = types * len(ids) if len(types) == 1 else types
    scales = scales * len(ids) if len(scales) == 1 else scales
    nets = []
    for net_id, kind, scale in zip(ids, types, scales, strict=True):
        entry = _controlnet_entry(net_id, rt)
        _check_fits(entry, "controlnet_model", model)
        net = {"model_id": net_id, "type": kind, "scale": scale}
        if req.auto_hint and kind in PREPROCESSOR_IDS:
            net["preprocessor"] = _preprocessor(kind, rt)
        elif req.auto_hint and kind not in AUTO_HINTS:
            raise BadInput(
                f"auto_hint for {kind} is not available on this server: it has no {kind} preprocessor",
                tip=f"Send the {kind} hint as control_image with auto_hint \"no\" "
                f"(auto_hint works for: {', '.join([*AUTO_HINTS, *PREPROCESSOR_IDS])}).",
            )
        if req.auto_hint and kind == "inpaint" and req.mask_image is None:
            raise BadInput("auto_hint for an inpaint ControlNet needs mask_image (the area to repaint)")
        nets.append(net)
    return {"controlnets": nets}


def _preprocessor(kind: str, rt) -> str:
    """The store id of the network auto_hint runs for `kind`, checked to be loaded."""
    model_id = PREPROCESSOR_IDS[kind]
    entry = rt.weights.get(model_id)
    if entry is None or entry.status != READY or entry.category != "preprocessor":
        raise BadInput(
            f"auto_hint for {kind} needs the {kind} preprocessor, which is not loaded on this server",
            tip=f'Load one: load_model_v2 with a depth-estimation model (e.g. url "Intel/dpt-hybrid-midas"), '
            f'model_category "preprocessor", model_id "{model_id}"; or send the {kind} map as control_image.',
        )
    return model_id


def _controlnet_entry(net_id: str, rt) -> ModelEntry:
    try:
        return _catalog_entry(net_id, "controlnet_model", ("controlnet",), rt)
    except NotFound:
        repo = next((repo for repo, known in CONTROLNET_11_IDS.items() if known == net_id), None)
        if repo is None:
            raise
        raise NotFound(
            f"controlnet_model: ControlNet {net_id} is not loaded on this server",
            tip=f'Load it first: load_model with url "{repo}", model_type "controlnet", model_id "{net_id}".',
        ) from None


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
    meta = {
        "prompt": params["prompt"],
        "model_id": params["model_id"],
        "negative_prompt": params["negative_prompt"] or "",
        "scheduler": params["scheduler"],
        "safetychecker": yes_no(params["safety_checker"]),
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
        "tomesd": yes_no(params["tomesd"]),
        "upscale": yes_no(params["upscale"]),
        "highres_fix": yes_no(params["highres_fix"]),
        "output_W": params["output_width"],
        "output_H": params["output_height"],
        "multi_lingual": "no",
        "panorama": yes_no(params.get("panorama")),
        "self_attention": yes_no(params.get("self_attention")),
        "embeddings": params["embedding"],
        "lora": ",".join(lora_id for lora_id, _ in params["loras"]) or None,
        "lora_strength": ",".join(_number(strength) for _, strength in params["loras"]) or None,
        "vae": params["vae"],
        "full_url": "no",
        "base64": yes_no(req.base64),
        "temp": yes_no(req.temp),
        "instant_response": yes_no(req.instant_response),
        "outdir": "out",
        "file_prefix": file_prefix,
        "webhook": req.webhook,
        "track_id": req.track_id,
    }
    if "strength" in params:
        meta["strength"] = params["strength"]
    if "controlnets" in params:
        nets = params["controlnets"]
        meta.update(
            controlnet_model=",".join(net["model_id"] for net in nets),
            controlnet_type=",".join(net["type"] for net in nets),
            controlnet_conditioning_scale=",".join(_number(net["scale"]) for net in nets),
            auto_hint=yes_no(params["auto_hint"]),
            guess_mode=yes_no(params["guess_mode"]),
        )
    for field in ("init_image", "mask_image"):
        ref = getattr(req, field, None)
        if ref is not None:
            meta[field] = _image_ref(ref)
    if getattr(req, "control_image", None):
        meta["control_image"] = ",".join(_image_ref(ref) for ref in req.control_image)
    return meta


def _image_ref(ref: str) -> str:
    return ref if ref.lower().startswith(("http://", "https://")) else "(base64 image)"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
