"""text2img, img2img, inpaint and controlnet.

A handler checks everything a client could get wrong *before* a job exists (model id, sizes,
scheduler, input images, adapters, the second passes), resolves the effective parameters (seeds,
size, enhanced prompt) into one frozen `GenerationParams`, derives `meta` from it, and hands it to
`handlers.submit.submit_job`: nothing starts before every check has passed.
"""

from __future__ import annotations

import secrets
import uuid
from typing import TYPE_CHECKING

from handlers import ondemand
from handlers.caller import Caller
from handlers.meta import generation_meta
from handlers.submit import (
    check_output_size,
    chosen_family_model,
    enhance_prompt,
    load_image,
    output_key,
    resolve_model,
    resolve_scheduler,
    submit_job,
    text_language,
)
from infra.catalog.known import CONTROLNET_11_IDS, IP_ADAPTERS
from infra.catalog.weights import CATEGORY_TITLES, READY, ModelEntry
from infra.jobs.params import (
    ControlNetSpec,
    GenerationParams,
    HighresFix,
    IpAdapter,
    Lora,
    SafetyCheck,
    Task,
    Translation,
    Upscale,
)
from infra.net.inputs import encode_input
from models.errors import ApiError, BadInput, NotFound
from models.requests import (
    DEFAULT_SIZE,
    ControlnetRequest,
    GenerationRequest,
    Img2ImgRequest,
    InpaintRequest,
    Text2ImgRequest,
)
from models.responses import JobResponse
from models.schedulers import DISTILLED_FAMILIES, FLOW_FAMILIES

if TYPE_CHECKING:
    from infra.runtime import Runtime

MAX_SIZE = 1024
MASK_ASPECT_TOLERANCE = 0.02


# auto_hint preprocessors this server has (see infra/engine/hints.py): these need no weights...
AUTO_HINTS = ("canny", "tile", "ip2p", "qrcode", "inpaint")
# ...these run a network loaded into the store under this id (model_category "preprocessor")
PREPROCESSOR_IDS = {"depth": "depth-preprocessor"}

# text-embedding width -> the model family it means, for messages
FAMILY_BY_CONTEXT_DIM = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def text2img(req: Text2ImgRequest, rt: Runtime, caller: Caller) -> JobResponse:
    if req.panorama and req.self_attention:
        raise BadInput("panorama and self_attention cannot be combined", tip="Send one of them as \"yes\".")
    return _generate("text2img", req, rt, caller, images={})


def img2img(req: Img2ImgRequest, rt: Runtime, caller: Caller) -> JobResponse:
    images = {"init_image": load_image(req.init_image, "init_image", rt, caller)}
    if req.init_image_2 is not None:
        images["init_image_2"] = load_image(req.init_image_2, "init_image_2", rt, caller)
    for i, reference in enumerate(req.reference_images or ()):
        images[f"{REFERENCE}{i}"] = load_image(reference, "reference_images", rt, caller)
    return _generate("img2img", req, rt, caller, images=images)


def inpaint(req: InpaintRequest, rt: Runtime, caller: Caller) -> JobResponse:
    for field in ("init_image_2", "reference_images"):
        if getattr(req, field):
            raise BadInput(f"{field} is for img2img with an editing model (Flux Kontext, Qwen-Image-Edit, Flux.2)",
                           tip=f"Leave {field} out.")
    init = load_image(req.init_image, "init_image", rt, caller)
    mask = load_image(req.mask_image, "mask_image", rt, caller)
    _check_mask(init, mask)
    return _generate("inpaint", req, rt, caller, images={"init_image": init, "mask_image": mask.convert("L")})


def controlnet(req: ControlnetRequest, rt: Runtime, caller: Caller) -> JobResponse:
    """ControlNet generation: text2img with a hint, img2img with a hint when init_image is given,
    inpainting with a hint when mask_image is given too. The hint is control_image (one shared
    by all ControlNets, or a list with one per ControlNet), else init_image; with auto_hint it is
    first turned into the ControlNet's kind of hint (canny edges...)."""
    images = {}
    if req.init_image is not None:
        images["init_image"] = load_image(req.init_image, "init_image", rt, caller)
    if req.mask_image is not None:
        if "init_image" not in images:
            raise BadInput("mask_image needs init_image: ControlNet inpainting repaints the init_image")
        mask = load_image(req.mask_image, "mask_image", rt, caller)
        _check_mask(images["init_image"], mask)
        images["mask_image"] = mask.convert("L")
    hints = req.control_image or []
    if len(hints) not in (0, 1, len(req.controlnet_model)):
        raise BadInput(
            f"control_image has {len(hints)} images for {len(req.controlnet_model)} ControlNets",
            tip="Send one control_image for all ControlNets, or a list with one per ControlNet.",
        )
    for i, ref in enumerate(hints):
        images[f"control_image_{i}"] = load_image(ref, "control_image", rt, caller)
    if not hints and "init_image" not in images:
        raise BadInput("controlnet needs a control_image (the hint) or an init_image", tip="Send control_image.")
    return _generate("controlnet", req, rt, caller, images)


FAMILY_PLURALS = {"flux": "Flux models", "sd3": "SD3 models", "qwen": "Qwen-Image models", "zimage": "Z-Image models",
                  "flux2": "Flux.2 models", "flux2_klein": "Flux.2 Klein models"}
# the model categories whose img2img edits the image as the prompt says (no strength), and which take
# a second image (init_image_2, combined with the first)
EDIT_CATEGORIES = ("flux_kontext", "qwen_edit", "flux2", "flux2_klein")

# the guidance a model category runs with when a request sends none (the wire's default, 7.5, is
# classifier-free guidance for SD): Flux.1's distilled guidance 3.5 as BFL publishes it for dev, 2.5
# for Kontext, 30 for Fill (diffusers' defaults for those pipelines); Qwen-Image's true CFG 4.0;
# Z-Image Turbo's 0 (no CFG: it is distilled); Flux.2's embedded 4.0
DEFAULT_GUIDANCE = {"flux": 3.5, "flux_kontext": 2.5, "flux_fill": 30.0, "sd3": 7.0, "qwen": 4.0, "qwen_edit": 4.0,
                    "zimage": 0.0, "flux2": 4.0, "flux2_klein": 4.0}
# the steps a category runs with when a request sends none (the wire's default is 20): Z-Image Turbo's 9
DEFAULT_STEPS = {"zimage": 9}


def _check_transformer_family(task: Task, req: GenerationRequest, model) -> list[str]:
    """What a flow-matching transformer model cannot do here (a 400 naming it), and the sent fields
    it does not use (meta `notes`): Flux.1 and Flux.2 take no negative prompt (their guidance is
    distilled); none has ToMe or Karras sigmas. clip_skip works on SD3 (diffusers' SD3 pipelines take it)."""
    family = FLOW_FAMILIES[model.family]
    notes = _check_transformer_controlnet(req, model) if task == "controlnet" else []
    if task == "inpaint" and model.family == "flux2":
        raise BadInput(f"inpaint is not available for Flux.2 dev models (diffusers has no Flux.2 dev inpainting "
                       f"pipeline); {model.model_id} is {family}", tip="Use a Flux.2 Klein, Flux.1 or Qwen-Image model.")
    unavailable = {"embeddings_model": "textual-inversion embeddings are for CLIP-only models",
                   "vae": "a VAE override is for SD models"}
    if model.family in ("flux2", "flux2_klein"):
        unavailable["highres_fix"] = "its second pass is an img2img, for which diffusers has no Flux.2 pipeline"
    if model.family != "sd3":
        unavailable["clip_skip"] = "a CLIP layer setting; this model's prompt goes through its T5 / LLM text encoder"
    for field, why in unavailable.items():
        if getattr(req, field, None):
            raise BadInput(f"{field} does not apply to {FAMILY_PLURALS[model.family]} ({why}); {model.model_id} is {family}",
                           tip=f"Leave {field} out.")
    sent = req.model_fields_set
    ignored = {"tomesd": "token merging is for UNet models", "use_karras_sigmas": "flow-matching samplers have none",
               "guess_mode": "a mode of UNet ControlNets"}
    if model.family in DISTILLED_FAMILIES:
        ignored["negative_prompt"] = f"{FAMILY_PLURALS[model.family]} take no negative prompt (their guidance is distilled)"
    if model.category in EDIT_CATEGORIES and task == "img2img":
        ignored["strength"] = "an editing model edits the image as the prompt says (no partial denoising)"
    return notes + [f"{field} was not used: {why}" for field, why in ignored.items() if field in sent and getattr(req, field)]


# the transformer families' ControlNet pipelines in diffusers (the catalog's ControlNet family must match the
# model's): what each runs besides text2img with a hint
CONTROLNET_TASKS = {"flux": ("img2img", "inpaint"), "sd3": ("inpaint",), "qwen": ("inpaint",), "zimage": ("inpaint",)}
SINGLE_CONTROLNET_FAMILIES = ("zimage",)  # (no multi-ControlNet model in diffusers)
# the families whose ControlNet inpainting takes one inpainting ControlNet, which reads init_image and mask_image
MASKED_IMAGE_CONTROLNET_FAMILIES = ("sd3", "qwen")


def _check_transformer_controlnet(req: ControlnetRequest, model: ModelEntry) -> list[str]:
    """What a transformer family's ControlNet pipelines can do (`CONTROLNET_TASKS`): a base model of
    the family only (not Kontext / Fill / Edit ones), with init_image (img2img) and mask_image
    (inpaint) where diffusers has the pipeline (inpainting on SD3, Qwen-Image and Z-Image needs a
    ControlNet made for it: the engine checks its config), and one ControlNet on Z-Image and for
    SD3 / Qwen-Image inpainting. Returns the notes: SD3 / Qwen-Image inpainting ControlNets read
    init_image and mask_image, not control_image."""
    title = FLOW_FAMILIES[model.family]
    if model.family not in CONTROLNET_TASKS or model.category in EDIT_CATEGORIES or model.category == "flux_fill":
        with_nets = ", ".join(FAMILY_PLURALS[f] for f in CONTROLNET_TASKS)
        raise BadInput(f"ControlNet is not available for {model.model_id} ({CATEGORY_TITLES[model.category]}): diffusers "
                       f"has ControlNet pipelines for base {with_nets} models", tip="Use text2img, img2img or inpaint.")
    task = "inpaint" if req.mask_image is not None else "img2img" if req.init_image is not None else None
    if task is not None and task not in CONTROLNET_TASKS[model.family]:
        field = "mask_image" if task == "inpaint" else "init_image"
        can = [f for f, tasks in CONTROLNET_TASKS.items() if task in tasks]
        raise BadInput(f"ControlNet {task} is available for {' and '.join(FAMILY_PLURALS[f] for f in can)}; "
                       f"{model.model_id} is {title} (its ControlNet pipeline takes a control_image only)",
                       tip=f"Leave {field} out and send the hint as control_image.")
    masked = task == "inpaint" and model.family in MASKED_IMAGE_CONTROLNET_FAMILIES
    if (model.family in SINGLE_CONTROLNET_FAMILIES or masked) and len(req.controlnet_model) > 1:
        what = f"{FAMILY_PLURALS[model.family]} take" + (" (to inpaint)" if masked else "")
        raise BadInput(f"{what} one ControlNet at a time; {len(req.controlnet_model)} were sent",
                       tip="Send one controlnet_model.")
    if masked and req.control_image:
        return [(f"control_image was not used: a {CATEGORY_TITLES[model.category]} inpainting ControlNet reads "
                 "init_image and mask_image")]
    return []


def _check_controlnet_family(net: ModelEntry, model: ModelEntry | None) -> None:
    """A UNet ControlNet (SD / SDXL) fits no transformer model, a transformer family's ControlNet only
    models of its family (the family read from its class when it was loaded)."""
    if model is None:
        return
    unet_model = model.family not in FLOW_FAMILIES
    if (not net.family and unet_model) or net.family == model.family:
        return
    made_for = FLOW_FAMILIES.get(net.family, "a Stable Diffusion model (a UNet)")
    raise BadInput(f"controlnet_model: {net.model_id} was made for {made_for}; {model.model_id} is "
                   f"{FLOW_FAMILIES.get(model.family, 'a Stable Diffusion model (a UNet)')}",
                   tip="Use a ControlNet made for this model's family (get_all_models shows each model's family).")


REFERENCE = "reference_"  # the input names of an edit's reference images after the first: reference_0, ...
# the images one edit takes in all, by the model's family or its stored pipeline class: Flux.2 (BFL's limits, as
# ModelsLab's docs give them) and Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline: 1 to 3, its model card says)
REFERENCE_LIMITS = {"flux2": 10, "flux2_klein": 4, "QwenImageEditPlusPipeline": 3}
FLUX2_MIN_SIDE = 64


def _reference_images(model: ModelEntry, images: dict) -> None:
    """An editing model's images: Flux.2 and Qwen-Image-Edit-2509 take init_image, init_image_2 and
    reference_images as one list of references, in that order (`reference_0`, ... after init_image),
    up to its limit; the others (Kontext, the first Qwen-Image-Edit) take one picture (init_image_2 is
    combined with it later)."""
    references = [images.pop(name) for name in sorted((n for n in images if n.startswith(REFERENCE)),
                                                          key=lambda n: int(n.removeprefix(REFERENCE)))]
    limit = REFERENCE_LIMITS.get(model.pipeline) or REFERENCE_LIMITS.get(model.family)
    if limit is None:
        if references:
            plus = " (Qwen-Image-Edit-2509, a QwenImageEditPlusPipeline, takes up to 3)" if model.category == "qwen_edit" else ""
            raise BadInput(f"reference_images are for Flux.2 and Qwen-Image-Edit-2509 models; {model.model_id} is "
                           f"{CATEGORY_TITLES[model.category]} and takes one image{plus}",
                           tip="Send one image (init_image, and init_image_2 beside it).")
        return
    if "init_image_2" in images:
        references.insert(0, images.pop("init_image_2"))
    for field, image in (("init_image", images["init_image"]), *(("reference_images", r) for r in references)):
        if model.family in ("flux2", "flux2_klein") and min(image.size) < FLUX2_MIN_SIDE:  # (its pipeline refuses them)
            raise BadInput(f"{field}: an image of {image.width}x{image.height}; Flux.2 models take reference images of at "
                           f"least {FLUX2_MIN_SIDE}x{FLUX2_MIN_SIDE}", tip="Send larger reference images.")
    if 1 + len(references) > limit:
        raise BadInput(f"{1 + len(references)} reference images were sent; {model.model_id} ({CATEGORY_TITLES[model.category]}) "
                       f"takes at most {limit}", tip=f"Send at most {limit} images (init_image and reference_images).")
    images.update({f"{REFERENCE}{i}": image for i, image in enumerate(references)})


def _flux_fill_model(rt: Runtime) -> ModelEntry | None:
    """The Flux.1 Fill model that inpaints for the base Flux.1 models (setting flux_inpaint_with_fill):
    family_model_ids' flux_fill, else the first loaded; None when off or none is loaded."""
    if not rt.settings.flux_inpaint_with_fill:
        return None
    try:
        return chosen_family_model("flux_fill", rt)
    except NotFound:  # (a configured Fill model that is not loaded: the model named inpaints)
        return None


def _check_mask(init, mask) -> None:
    init_ratio, mask_ratio = init.width / init.height, mask.width / mask.height
    if abs(mask_ratio - init_ratio) > MASK_ASPECT_TOLERANCE * init_ratio:
        raise BadInput(
            f"mask_image is {mask.width}x{mask.height} but init_image is {init.width}x{init.height}: "
            "they must have the same aspect ratio",
            tip="Send a mask of the same size as init_image (white = repaint, black = keep).",
        )


# --------------------------------------------------------------------------- shared steps


def _generate(task: Task, req: GenerationRequest, rt: Runtime, caller: Caller, images: dict, *,
              endpoint: str | None = None, size: tuple[int, int] | None = None,
              extra_meta: dict | None = None) -> JobResponse:
    """Every check first (model, scheduler, sizes, adapters, second passes), then the params, the
    meta derived from them, and the job. The image-editing endpoints (handlers/media.py) run an
    inpaint job through here: `endpoint` names the job (metering), `size` is their own output size
    (outpaint's canvas, up to 1440: beyond the wire limit of `req.width`), `extra_meta` is merged
    into meta (a None value drops the key)."""
    # 1. what the request asks for: available, on a model that suits the task
    resolved = resolve_model(task, req.model_id, rt, inpainting="mask_image" in images, category=caller.model_category)
    # a default model still to be loaded (a fresh deployment): the checks that need its entry wait for the engine
    model = None if isinstance(resolved, ondemand.Pending) else resolved
    fill_note = []
    base_flux = task == "inpaint" and model is not None and model.category == "flux" and not req.lora_model
    if base_flux and (fill := _flux_fill_model(rt)) is not None:  # Flux.1 inpaints best through a Fill model
        fill_note = [(f"inpainted by the Flux.1 Fill model {fill.model_id}, not {model.model_id} "
                      "(SDAPI_FLUX_INPAINT_WITH_FILL: a loaded Fill model inpaints for the Flux.1 models)")]
        resolved = model = fill
    model_id = resolved.model_id
    if task == "text2img" and model is not None and model.family != "sd" and (req.panorama or req.self_attention):
        feature = "panorama" if req.panorama else "self_attention"
        raise BadInput(f"{feature} is available for SD 1.x/2.x models only; {model.model_id} is "
                       f"{'SDXL' if model.family == 'sdxl' else FLOW_FAMILIES.get(model.family, model.family)}")
    transformer = model is not None and model.family in FLOW_FAMILIES
    notes = fill_note + (_check_transformer_family(task, req, model) if transformer else [])
    editing = model is not None and model.category in EDIT_CATEGORIES and task == "img2img"
    if "init_image_2" in images and not editing:
        raise BadInput(f"init_image_2 is for editing models (Flux Kontext, Qwen-Image-Edit, Flux.2: it is combined "
                       f"with init_image); {model_id} is not one",
                       tip="Leave init_image_2 out, or use a model_category flux_kontext model.")
    if editing:
        _reference_images(model, images)
    elif any(name.startswith(REFERENCE) for name in images):
        raise BadInput(f"reference_images are for Flux.2 and Qwen-Image-Edit-2509 models; {model_id} is not one",
                       tip="Leave reference_images out.")
    scheduler, algorithm = resolve_scheduler(req.scheduler, req.algorithm_type, model, rt)
    # 2. the effective values a request leaves open
    width, height = size or _output_size(req, images.get("init_image") or images.get("control_image_0"))
    if transformer:  # 2x2 latent patches of an 8x VAE: multiples of 16
        width, height = max(16, width // 16 * 16), max(16, height // 16 * 16)
    if "init_image_2" in images:  # (the output's size stays the first image's)
        images["init_image"] = side_by_side(images["init_image"], images.pop("init_image_2"))
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    prompt = req.prompt or ""
    if prompt and req.enhance_prompt:
        prompt = enhance_prompt(prompt, rt.settings.enhance_prompt_suffix)
    strength = getattr(req, "strength", None)
    if task == "controlnet" and "init_image" not in images or editing:
        strength = None  # a hint only: there is no image to keep; an edit takes none
    guidance, steps = req.guidance_scale, req.num_inference_steps
    if model is not None and "guidance_scale" not in req.model_fields_set:
        guidance = DEFAULT_GUIDANCE.get(model.category, guidance)
    if model is not None and "num_inference_steps" not in req.model_fields_set:
        steps = DEFAULT_STEPS.get(model.category, steps)
    # 3. adapters, ControlNets and the passes after the first, each checked against the model
    loras, embedding, vae = _adapters(req, model, rt)
    controlnets = _controlnets(req, model, rt) if task == "controlnet" else ()
    highres, upscale, pending = _second_passes(req, width, height, rt)
    if model is None:
        pending.append(resolved)
    translation, languages = _translation(req, rt, pending)
    ip_adapter = _ip_adapter(req, model, rt, caller, images, highres is not None, pending)
    params = GenerationParams(
        task=task,
        model_id=model_id,
        prompt=prompt,
        negative_prompt=req.negative_prompt,
        width=width,
        height=height,
        seeds=tuple((seed + i) % 2**32 for i in range(req.samples)),
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        use_karras_sigmas=req.use_karras_sigmas,
        algorithm=algorithm,
        clip_skip=req.clip_skip,
        tomesd=req.tomesd,
        strength=strength,
        loras=loras,
        embedding=embedding,
        vae=vae,
        panorama=task == "text2img" and req.panorama,
        self_attention=task == "text2img" and req.self_attention,
        controlnets=controlnets,
        auto_hint=task == "controlnet" and req.auto_hint,
        guess_mode=task == "controlnet" and req.guess_mode,
        highres_fix=highres,
        upscale=upscale,
        safety_checker=safety_check(req, rt),
        base64=req.base64,
        translation=translation,
        ip_adapter=ip_adapter,
    )
    # 4. the job
    file_prefix = str(uuid.uuid4())
    output_keys = [output_key(f"{file_prefix}-{i}", req.base64) for i in range(req.samples)]
    meta = generation_meta(params, req, file_prefix)
    meta.update(languages)
    if ip_adapter is not None:
        meta.update(ip_adapter_id=ip_adapter.model_id, ip_adapter_scale=ip_adapter.scale)
    if notes:
        meta["notes"] = notes
    for key, value in (extra_meta or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    # (an editing model reads the image at its own size: the pipeline fits it to the resolutions it was trained at)
    inputs = {name: encode_input(_within(image, MAX_SIZE) if editing else _fit(image, width, height))
              for name, image in images.items()}
    return submit_job(endpoint or task, params, meta, output_keys, inputs, req, rt, caller, pending)


def safety_check(req, rt: Runtime) -> SafetyCheck | None:
    """The job's NSFW check: the request's `safety_checker` (default: the server's setting), with its
    treatment and the server's threshold; None when off."""
    checker = req.safety_checker if req.safety_checker is not None else rt.settings.safety_checker_default
    return SafetyCheck(type=req.safety_checker_type, threshold=rt.settings.nsfw_threshold) if checker else None


IP_ADAPTER_SCALE = 0.6  # ModelsLab's meta shows it when none is sent


def _ip_adapter(req: GenerationRequest, model: ModelEntry | None, rt: Runtime, caller: Caller, images: dict,
                highres: bool, pending: list) -> IpAdapter | None:
    """The job's IP-Adapter (`ip_adapter_id`, `ip_adapter_scale`, `ip_adapter_image` loaded into
    `images`), checked to fit the model: SD 1.x / 2.x and SDXL UNets only (the adapter's
    text-embedding width must be the model's); not with highres_fix (its second pass has no image).
    ModelsLab's adapter ids (`infra.catalog.known.IP_ADAPTERS`) are fetched on first use where
    fetch_known_models allows (the job waits for them, in `pending`)."""
    if not req.ip_adapter_id:
        for field in ("ip_adapter_image", "ip_adapter_scale"):
            if getattr(req, field) is not None:
                raise BadInput(f"{field} was given without ip_adapter_id", tip="Name the IP-Adapter in ip_adapter_id.")
        return None
    if req.ip_adapter_image is None:
        raise BadInput("ip_adapter_id needs ip_adapter_image (the image whose look the adapter carries over)",
                       tip="Send ip_adapter_image as a URL or base64.")
    if model is not None and model.family in FLOW_FAMILIES:
        raise BadInput(f"ip_adapter_id: IP-Adapters are for SD 1.x / 2.x and SDXL models; {model.model_id} is "
                       f"{FLOW_FAMILIES[model.family]}", tip="Leave ip_adapter_id out.")
    entry = ondemand.require_known(req.ip_adapter_id, "ip_adapter", "ip_adapter_id", rt)
    if isinstance(entry, ondemand.Pending):  # still to fetch: fitted by the family its table gives
        pending.append(entry)
        family = IP_ADAPTERS.get(entry.model_id, ("", ""))[1]
        if model is not None and family and family != model.family:
            raise BadInput(f"ip_adapter_id: {entry.model_id} is an IP-Adapter for {'SDXL' if family == 'sdxl' else 'SD 1.x'} "
                           f"models; {model.model_id} is {'SDXL' if model.family == 'sdxl' else 'SD 1.x / 2.x'}",
                           tip="Use the IP-Adapter id made for the model's family (ip-adapter_sd15, ip-adapter_sdxl, ...).")
    else:
        _check_fits(entry, "ip_adapter_id", model)
    if highres:
        raise BadInput("ip_adapter_id cannot be combined with highres_fix (its second pass has no IP-Adapter image)",
                       tip="Leave highres_fix out.")
    images["ip_adapter_image"] = load_image(req.ip_adapter_image, "ip_adapter_image", rt, caller)
    scale = IP_ADAPTER_SCALE if req.ip_adapter_scale is None else req.ip_adapter_scale
    return IpAdapter(model_id=entry.model_id, scale=scale)


def _translation(req: GenerationRequest, rt: Runtime, pending: list) -> tuple[Translation | None, dict]:
    """multi_lingual: the prompt's (and negative prompt's) language, and what of them the translator
    (setting translator_model_id, fetched on first use where it is a known model) turns into English
    before the job runs; English is left alone. Returns (the job's Translation or None, meta)."""
    if not req.multi_lingual:
        return None, {}
    texts = {"prompt": req.prompt, "negative_prompt": req.negative_prompt}  # (as sent: before enhance_prompt)
    languages = {field: text_language(text) for field, text in texts.items() if text and text.strip()}
    meta = {f"{field}_language": language for field, language in languages.items()}
    foreign = tuple(field for field, language in languages.items() if language != "en")
    if not foreign:
        return None, meta
    model_id = rt.settings.translator_model_id
    pending += ondemand.waiting(ondemand.require_known(model_id, "translator", "multi_lingual", rt))
    return Translation(model_id=model_id, fields=foreign), {**meta, "translator": model_id}


def _second_passes(req: GenerationRequest, width: int, height: int, rt: Runtime):
    """highres_fix (a second pass at a larger size) and upscale (2x through the upscaler), checked
    against the output limit; the upscaler the job would wait for. Starts nothing."""
    settings = rt.settings
    highres = upscale = None
    final_w, final_h = width, height
    if req.highres_fix:
        final_w = max(8, int(width * settings.highres_fix_scale) // 8 * 8)
        final_h = max(8, int(height * settings.highres_fix_scale) // 8 * 8)
        highres = HighresFix(width=final_w, height=final_h, strength=settings.highres_fix_strength)
    if req.upscale:
        upscale = Upscale(model_id=settings.upscale_model_id, scale=2)
        final_w, final_h = final_w * upscale.scale, final_h * upscale.scale
    check_output_size(final_w, final_h, f"{width}x{height} with highres_fix/upscale", settings)
    pending = []
    if upscale is not None:
        pending = ondemand.waiting(ondemand.require_known(upscale.model_id, "upscaler", "upscale", rt))
    return highres, upscale, pending


def _check_fits(adapter: ModelEntry, field: str, model: ModelEntry | None) -> None:
    """An adapter made for another family (text-embedding width) cannot be applied (a model still to
    be loaded is checked by the engine)."""
    if model is not None and adapter.context_dim and model.context_dim and adapter.context_dim != model.context_dim:
        def family(dim: int) -> str:
            return FAMILY_BY_CONTEXT_DIM.get(dim, f"{dim}-wide text embeddings")

        raise BadInput(
            f"{field}: {adapter.model_id} was made for a model with {family(adapter.context_dim)}; "
            f"{model.model_id} has {family(model.context_dim)}",
            tip=f"Use a {adapter.category} made for the same base model family.",
        )


def _check_lora_family(lora: ModelEntry, model: ModelEntry | None) -> None:
    """A UNet LoRA (SD 1.x / 2.x / XL) fits no transformer model and a transformer LoRA no UNet;
    a Flux LoRA fits Flux models only, an SD3 one SD3 (the family read from its keys when it was
    loaded: infra.engine.files.convert.lora_family; "transformer" is either, checked when it loads)."""
    if model is None:
        return
    unet_model = "a Stable Diffusion model (a UNet)"
    if lora.family in ("", "sdxl"):
        fits, made_for = model.family not in FLOW_FAMILIES, unet_model
    elif lora.family == "transformer":
        fits, made_for = model.family in FLOW_FAMILIES, "a Flux or SD3 model"
    else:
        fits, made_for = lora.family == model.family, FLOW_FAMILIES.get(lora.family, lora.family)
    if not fits:
        raise BadInput(f"lora_model: {lora.model_id} was made for {made_for}; {model.model_id} is "
                       f"{FLOW_FAMILIES.get(model.family, unet_model)}",
                       tip="Use a LoRA trained for this model's family (get_all_models shows each model's family).")


def _adapters(req: GenerationRequest, model: ModelEntry | None, rt: Runtime) -> tuple[tuple[Lora, ...], str | None, str | None]:
    """LoRAs with their strengths, the embedding and the VAE, each checked to fit the model."""
    loras = []
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
            lora = rt.weights.require(lora_id, ("lora",), "lora_model")
            _check_lora_family(lora, model)
            _check_fits(lora, "lora_model", model)
            loras.append(Lora(model_id=lora_id, strength=strength))
    elif req.lora_strength:
        raise BadInput("lora_strength was given without lora_model", tip="Name the LoRAs in lora_model.")
    if req.embeddings_model:
        _check_fits(rt.weights.require(req.embeddings_model, ("embeddings",), "embeddings_model"), "embeddings_model", model)
    if req.vae:
        rt.weights.require(req.vae, ("vae",), "vae")
    return tuple(loras), req.embeddings_model, req.vae


def _controlnets(req: ControlnetRequest, model: ModelEntry | None, rt: Runtime) -> tuple[ControlNetSpec, ...]:
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
        _check_controlnet_family(entry, model)
        _check_fits(entry, "controlnet_model", model)
        preprocessor = None
        if req.auto_hint and kind in PREPROCESSOR_IDS:
            preprocessor = _preprocessor(kind, rt)
        elif req.auto_hint and kind not in AUTO_HINTS:
            raise BadInput(
                f"auto_hint for {kind} is not available on this server: it has no {kind} preprocessor",
                tip=f"Send the {kind} hint as control_image with auto_hint \"no\" "
                f"(auto_hint works for: {', '.join([*AUTO_HINTS, *PREPROCESSOR_IDS])}).",
            )
        if req.auto_hint and kind == "inpaint" and req.mask_image is None:
            raise BadInput("auto_hint for an inpaint ControlNet needs mask_image (the area to repaint)")
        nets.append(ControlNetSpec(model_id=net_id, type=kind, scale=scale, preprocessor=preprocessor))
    return tuple(nets)


def _preprocessor(kind: str, rt: Runtime) -> str:
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


def _controlnet_entry(net_id: str, rt: Runtime) -> ModelEntry:
    try:
        return rt.weights.require(net_id, ("controlnet",), "controlnet_model")
    except NotFound:
        repo = next((repo for repo, known in CONTROLNET_11_IDS.items() if known == net_id), None)
        if repo is None:
            raise
        raise NotFound(
            f"controlnet_model: ControlNet {net_id} is not loaded on this server",
            tip=f'Load it first: load_model with url "{repo}", model_type "controlnet", model_id "{net_id}".',
        ) from None


def _output_size(req: GenerationRequest, init) -> tuple[int, int]:
    """Requested size; else the init image's size (scaled to fit 1024, multiple of 8); else the default."""
    if init is None:
        return req.width or DEFAULT_SIZE, req.height or DEFAULT_SIZE
    scale = min(1.0, MAX_SIZE / max(init.width, init.height))
    fitted_w = max(8, int(init.width * scale) // 8 * 8)
    fitted_h = max(8, int(init.height * scale) // 8 * 8)
    return req.width or fitted_w, req.height or fitted_h


def side_by_side(first, second):
    """Two images as one (Kontext's way of taking two): `second` scaled to `first`'s height, on its right."""
    from PIL import Image

    second = second.convert(first.mode).resize(
        (max(1, round(second.width * first.height / second.height)), first.height), Image.Resampling.LANCZOS)
    canvas = Image.new(first.mode, (first.width + second.width, first.height))
    canvas.paste(first, (0, 0))
    canvas.paste(second, (first.width, 0))
    return canvas


def _within(image, longest: int):
    """The image scaled down (aspect kept) so its longer side is at most `longest`."""
    from PIL import Image

    scale = longest / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def _fit(image, width: int, height: int):
    """Resize to the output size. Masks use a box filter: an output pixel stays exactly as it was
    when its whole footprint in the sent mask is black (no ringing from the white area)."""
    from PIL import Image

    if image.size == (width, height):
        return image
    resample = Image.Resampling.BOX if image.mode == "L" else Image.Resampling.LANCZOS
    return image.resize((width, height), resample)
