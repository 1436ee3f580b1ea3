"""super_resolution, upload_image, nsfw_image_check, and the image_editing family's outpaint,
object_removal, mask_creator, removebg_mask and magic_mix.

super_resolution is a job like a generation (queued, fetchable, webhook), but its `output` is
one URL string, as the spec shows. upload_image stores the client's own bytes after checking
they are the image type it claims. nsfw_image_check runs the NSFW detector right here: it needs
no GPU, so the web tier answers it without a job.

outpaint and object_removal (spec §4.2, §4.4, §7) have no engine path of their own (object_removal
has one when a LaMa-class network is loaded: below): each builds an
ordinary inpaint job (task "inpaint", one image) through `handlers.generation._generate`, the
function inpaint itself goes through, so it gets the same checks, params, queue, sync budget,
fetch, webhook and metering (under its own endpoint name). The engine composites every inpaint
output into its input through the mask (`infra.engine.postprocess.composite_inpaint`), which keeps
the unmasked pixels bit for bit.

- **outpaint** prepares the inputs: a canvas of the requested size with the image in its middle
  (scaled down to fit, never up), the border around it pre-filled with the image's edge pixels
  spread outwards and blurred (so a strength-1 inpaint has colours to continue), and a mask that
  is white on the border and on an `overlap_width` band just inside each edge of the image that
  meets a border (the seam is repainted), black on the rest of the image.
- **object_removal** runs the LaMa-class network of the setting removal_model_id when it is
  loaded (a one-pass job, RemovalParams: the hole filled, the rest kept exactly); else it repaints
  the white area of its mask with the server's default inpainting model, an empty prompt and a
  negative prompt naming what is usually removed, at strength 1; `meta.removal_model` says which
  model did it.
- **magic_mix** is a denoising job of its own (MagicMixParams: infra.engine.community.magic_mix)
  on an SD 1.x / 2.x model.

mask_creator and removebg_mask are one-pass jobs like super_resolution, each on a model of its own
catalog category (setting mask_model_id: a segmenter; background_model_id: a background remover),
fetched on first use where it is a known model: one PNG of the input's size. removebg_mask's is
the image with its background transparent, or its mask (`only_mask`), at the image's size (within
the output limit); the thresholds of its alpha matting are checked here (the background one below
the foreground one), its other fields are flags.
"""

from __future__ import annotations

import io
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

from handlers import ondemand
from handlers.caller import Caller
from handlers.generation import _check_mask, _generate, safety_check
from handlers.meta import image_ref, removebg_meta, upscale_meta, yes_no
from handlers.submit import check_output_size, load_image, output_key, resolve_model, submit_job
from infra.catalog.weights import CATEGORY_TITLES
from infra.jobs.params import (
    AlphaMatting,
    BackgroundParams,
    MagicMixParams,
    MaskParams,
    RemovalParams,
    UpscaleParams,
)
from infra.net.inputs import decode_base64, encode_input
from infra.safety import detector
from infra.storage.base import StorageError
from models.errors import ApiError, BadInput, NotFound
from models.requests import (
    InpaintRequest,
    JobOptions,
    MagicMixRequest,
    MaskCreatorRequest,
    NsfwImageCheckRequest,
    ObjectRemovalRequest,
    OutpaintRequest,
    RemoveBgMaskRequest,
    SuperResolutionRequest,
    UploadImageRequest,
)
from models.responses import JobResponse, NsfwCheckResponse, UploadImageResponse
from models.schedulers import FLOW_FAMILIES

if TYPE_CHECKING:
    from infra.runtime import Runtime

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}
NETWORK_OUTPUT_FACTOR = 4  # an upscaler's own output may be this many times the output limit, before resampling


def super_resolution(req: SuperResolutionRequest, rt: Runtime, caller: Caller) -> JobResponse:
    settings = rt.settings
    # 1. the image, the output size, the networks (fetched on first use), all checked first
    image = load_image(req.url, "url", rt, caller)
    width, height = round(image.width * req.scale), round(image.height * req.scale)
    check_output_size(width, height, f"url is {image.width}x{image.height}; scale {req.scale:g}", settings)
    upscaler = ondemand.require_known(req.model_id, "upscaler", "model_id", rt)
    if not isinstance(upscaler, ondemand.Pending) and upscaler.scale > req.scale:
        # the network's own output is held whole before it is resampled down to `scale`
        net_w, net_h = image.width * upscaler.scale, image.height * upscaler.scale
        if net_w * net_h > NETWORK_OUTPUT_FACTOR * settings.max_output_pixels:
            raise BadInput(
                f"url is {image.width}x{image.height}: {req.model_id} makes {net_w}x{net_h} before scaling to "
                f"{req.scale:g}x, more than this server holds",
                tip="Send a smaller image, a scale closer to the model's own, or use a x2 model.",
            )
    needed = [upscaler]
    restorer = None
    if req.face_enhance:
        restorer = settings.face_restorer_id
        needed.append(ondemand.require_known(restorer, "face_restorer", "face_enhance", rt))
    # 2. the params, the meta derived from them, and the job
    params = UpscaleParams(
        model_id=req.model_id, scale=req.scale, face_restorer=restorer, width=width, height=height, base64=req.base64
    )
    name = _output_name("_out")
    return submit_job("super_resolution", params, upscale_meta(params, req), [output_key(name, req.base64)],
                      {"image": encode_input(image)}, req, rt, caller, ondemand.waiting(*needed))


def upload_image(req: UploadImageRequest, rt: Runtime, caller: Caller) -> UploadImageResponse:
    settings = rt.settings
    data = decode_base64(req.base64_image, "base64_image", settings.max_input_image_bytes)
    expected = PIL_FORMATS[req.image_type]
    try:
        image = Image.open(io.BytesIO(data))
        actual, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise BadInput(f"base64_image has more than the {settings.max_input_image_pixels} pixels this server accepts") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadInput("base64_image is not a readable image", tip="Send the base64 of a PNG or JPEG file.") from None
    if actual != expected:
        raise BadInput(
            f"base64_image is a {actual} image but image_type says {req.image_type}",
            tip=f"Send image_type \"{actual.lower() if actual else 'png'}\" or the base64 of a {expected} file.",
        )
    if width * height > settings.max_input_image_pixels:
        raise BadInput(
            f"base64_image is {width}x{height} pixels, more than the {settings.max_input_image_pixels} pixels "
            "this server accepts",
            tip="Send a smaller image.",
        )
    try:
        image.load()  # the whole file decodes, not only its header
    except (OSError, ValueError, SyntaxError):
        raise BadInput("base64_image is a damaged or truncated image", tip="Send the complete image file.") from None
    # digits, as ModelsLab names uploads; 30 random ones (~100 bits) so the link cannot be guessed
    key = f"uploads/{time.time_ns()}{secrets.randbelow(10**30):030d}.{req.image_type}"
    expires_at = time.time() + settings.temp_output_seconds
    try:
        rt.storage.put(key, data, f"image/{expected.lower()}", expires_at=expires_at)
    except StorageError as exc:
        raise ApiError(f"The image could not be stored: {exc}", status_code=502) from None
    return UploadImageResponse(image_url=rt.storage.url(key, caller.base_url, expires_at=expires_at))


def nsfw_image_check(req: NsfwImageCheckRequest, rt: Runtime, caller: Caller) -> NsfwCheckResponse:
    image = load_image(req.init_image, "init_image", rt, caller)
    score = detector().nsfw_score(image)
    threshold = rt.settings.nsfw_threshold
    return NsfwCheckResponse(
        images=req.init_image, has_nsfw_concept=[score >= threshold], nsfw_score=round(score, 4), threshold=threshold
    )


# --------------------------------------------------------------------------- outpaint, object_removal

# outpaint's canvas may be larger than what text2img / inpaint take on the wire (MAX_SIZE, 1024): the
# spec's limit is 1440 a side (models/requests.py OutpaintRequest). The engine renders a job at the
# size its params say (it has no limit of its own); the server's output limit (max_output_pixels) is
# checked here as for every other output.
OBJECT_REMOVAL_NEGATIVE_PROMPT = "object, person, text, watermark"
OBJECT_REMOVAL_STEPS = 20


@dataclass(frozen=True)
class Layout:
    """Where outpaint puts the image on its canvas."""

    width: int  # the canvas
    height: int
    image_width: int  # the image as placed (scaled down to fit, never up)
    image_height: int
    left: int  # the border on each side (padding_*)
    top: int
    right: int
    bottom: int
    scale: float  # image_width / the sent image's width (1: as sent)
    overlap: int

    def keep_box(self) -> tuple[int, int, int, int] | None:
        """The part of the placed image kept as it is (left, top, right, bottom; exclusive): the image
        less `overlap` pixels on each side where a border meets it; None when nothing is left."""
        box = (self.left + (self.overlap if self.left else 0), self.top + (self.overlap if self.top else 0),
               self.left + self.image_width - (self.overlap if self.right else 0),
               self.top + self.image_height - (self.overlap if self.bottom else 0))
        return box if box[2] > box[0] and box[3] > box[1] else None


def outpaint_layout(image_size: tuple[int, int], canvas: tuple[int, int], overlap: int) -> Layout:
    """The image centred on the canvas, scaled down (aspect kept) only when it does not fit."""
    (w, h), (width, height) = image_size, canvas
    scale = min(1.0, width / w, height / h)
    placed_w = w if scale == 1.0 else max(1, min(width, round(w * scale)))
    placed_h = h if scale == 1.0 else max(1, min(height, round(h * scale)))
    left, top = (width - placed_w) // 2, (height - placed_h) // 2
    return Layout(width, height, placed_w, placed_h, left, top, width - placed_w - left, height - placed_h - top,
                  placed_w / w, overlap)


def outpaint_inputs(image: Image.Image, layout: Layout) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): the placed image with the border pre-filled (its edge pixels spread outwards,
    then blurred), and the mask (white = paint: the border and the overlap band)."""
    image = image.convert("RGB")
    if image.size != (layout.image_width, layout.image_height):
        image = image.resize((layout.image_width, layout.image_height), Image.Resampling.LANCZOS)
    spread = np.pad(np.asarray(image), ((layout.top, layout.bottom), (layout.left, layout.right), (0, 0)), mode="edge")
    radius = max(2, min(layout.width, layout.height) // 16)
    canvas = Image.fromarray(spread).filter(ImageFilter.GaussianBlur(radius))
    canvas.paste(image, (layout.left, layout.top))  # the image itself, exactly
    mask = Image.new("L", (layout.width, layout.height), 255)
    if (box := layout.keep_box()) is not None:
        ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=0)
    return canvas, mask


def _options(req: JobOptions) -> dict:
    """How the client asked the job to be run (priority, deadline, webhook events, ...), for the
    inpaint request it becomes."""
    return {name: getattr(req, name) for name in JobOptions.model_fields if name != "key"}


def _is_transformer(resolved) -> bool:
    return not isinstance(resolved, ondemand.Pending) and resolved.family in FLOW_FAMILIES


def outpaint(req: OutpaintRequest, rt: Runtime, caller: Caller) -> JobResponse:
    # 1. the image and the model (to know the canvas's multiple: 16 for the transformer families)
    image = load_image(req.image, "image", rt, caller)
    resolved = resolve_model("inpaint", req.model_id, rt, inpainting=True, category=caller.model_category)
    step = 16 if _is_transformer(resolved) else 8
    width, height = max(step, req.width // step * step), max(step, req.height // step * step)
    check_output_size(width, height, f"width {req.width}, height {req.height}", rt.settings)
    # 2. the canvas and mask, then an inpaint job of them (reused: the inpaint task and its compositing)
    layout = outpaint_layout(image.size, (width, height), req.overlap_width)
    canvas, mask = outpaint_inputs(image, layout)
    inpaint_req = InpaintRequest.model_validate({
        **_options(req), "model_id": req.model_id, "prompt": req.prompt, "negative_prompt": req.negative_prompt,
        "init_image": req.image, "mask_image": "(the outpaint border)", "num_inference_steps": req.num_inference_steps,
        "guidance_scale": req.guidance_scale, "seed": req.seed, "strength": 1, "enhance_prompt": False,
        "base64": req.base64, "temp": req.temp, "instant_response": req.instant_response, "webhook": req.webhook,
        "track_id": req.track_id,
    })
    meta = {
        "width": width, "height": height, "num_inference_steps": req.num_inference_steps,
        "overlap_width": req.overlap_width, "padding_left": layout.left, "padding_right": layout.right,
        "padding_top": layout.top, "padding_bottom": layout.bottom, "image_width": layout.image_width,
        "image_height": layout.image_height, "image_scale": round(layout.scale, 4),
        "init_image": image_ref(req.image), "mask_image": None, "watermark": "no",
    }
    return _generate("inpaint", inpaint_req, rt, caller, {"init_image": canvas, "mask_image": mask},
                     endpoint="outpaint", size=(width, height), extra_meta=meta)


def object_removal(req: ObjectRemovalRequest, rt: Runtime, caller: Caller) -> JobResponse:
    """The masked object removed and the hole filled: by the LaMa-class network the setting
    removal_model_id names when it is loaded or being fetched (a one-pass job at the image's own
    size), else by the default inpainting model with an empty prompt (an inpaint job); either way
    the unmasked pixels are kept exactly and `meta.removal_model` says which ran."""
    init = load_image(req.init_image, "init_image", rt, caller)
    mask = load_image(req.mask_image, "mask_image", rt, caller)
    _check_mask(init, mask)
    remover = _removal_network(rt)
    if remover is not None:
        check_output_size(init.width, init.height, f"init_image ({init.width}x{init.height})", rt.settings)
        params = RemovalParams(model_id=remover.model_id, width=init.width, height=init.height, base64=req.base64)
        meta = {"removal_model": f"{remover.model_id} (LaMa-class inpainting network)",
                "image_path": image_ref(req.init_image), "mask_path": image_ref(req.mask_image),
                "width": init.width, "height": init.height, "base64": yes_no(req.base64), "temp": yes_no(req.temp)}
        name = _output_name("_removed")
        inputs = {"image": encode_input(init), "mask": encode_input(mask.convert("L").resize(init.size))}
        return submit_job("object_removal", params, meta, [output_key(name, req.base64)], inputs, req, rt, caller,
                          ondemand.waiting(remover))
    resolved = resolve_model("inpaint", None, rt, inpainting=True)  # the default inpainting model
    kind = "inpainting" if isinstance(resolved, ondemand.Pending) else CATEGORY_TITLES.get(resolved.category, "inpainting")
    inpaint_req = InpaintRequest.model_validate({
        **_options(req), "prompt": "-", "negative_prompt": OBJECT_REMOVAL_NEGATIVE_PROMPT, "init_image": req.init_image,
        "mask_image": req.mask_image, "num_inference_steps": OBJECT_REMOVAL_STEPS, "seed": req.seed, "strength": 1,
        "enhance_prompt": False, "base64": req.base64, "temp": req.temp, "instant_response": req.instant_response,
        "webhook": req.webhook, "track_id": req.track_id,
    }).model_copy(update={"prompt": ""})  # (a blank prompt is "not sent" on the wire; here it is the point)
    meta = {
        "removal_model": f"{resolved.model_id} ({kind}, empty prompt)",
        "image_path": image_ref(req.init_image), "mask_path": image_ref(req.mask_image),
    }
    return _generate("inpaint", inpaint_req, rt, caller, {"init_image": init, "mask_image": mask.convert("L")},
                     endpoint="object_removal", extra_meta=meta)


def magic_mix(req: MagicMixRequest, rt: Runtime, caller: Caller) -> JobResponse:
    """MagicMix on an SD 1.x / 2.x model (the request's, else the default): `image` fitted (centre
    crop) to width x height, mixed with `prompt` between kmax and kmin; one image, a job like the
    generations (safety checker, seed, metering as magic_mix)."""
    if req.kmin > req.kmax:
        raise BadInput(f"kmin ({req.kmin}) must be at most kmax ({req.kmax}): the layout mixing runs from kmax down to kmin",
                       tip="Send kmin <= kmax (the docs' defaults: kmin 0.3, kmax 0.5).")
    image = load_image(req.image, "image", rt, caller)
    resolved = resolve_model("img2img", req.model_id, rt)
    if not isinstance(resolved, ondemand.Pending) and resolved.family != "sd":
        raise BadInput(f"magic_mix runs on SD 1.x / 2.x models; {resolved.model_id} is "
                       f"{CATEGORY_TITLES.get(resolved.category, resolved.category)}",
                       tip="Name an SD 1.x / 2.x model in model_id (get_all_models lists them).")
    check_output_size(req.width, req.height, f"{req.width}x{req.height}", rt.settings)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    params = MagicMixParams(
        model_id=resolved.model_id, prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width,
        height=req.height, steps=req.steps, guidance_scale=req.guidance_scale, kmin=req.kmin, kmax=req.kmax,
        mix_factor=req.mix_factor, seed=seed, base64=req.base64, safety_checker=safety_check(req, rt))
    file_prefix = str(uuid.uuid4())
    meta = {"model_id": resolved.model_id, "prompt": req.prompt, "negative_prompt": req.negative_prompt or "",
            "image": image_ref(req.image), "W": req.width, "H": req.height, "kmin": req.kmin, "kmax": req.kmax,
            "mix_factor": req.mix_factor, "steps": req.steps, "guidance_scale": req.guidance_scale, "n_samples": 1,
            "seed": seed, "safety_checker": yes_no(params.safety_checker is not None), "base64": yes_no(req.base64), "temp": yes_no(req.temp),
            "file_prefix": file_prefix}
    fitted = ImageOps.fit(image.convert("RGB"), (req.width, req.height), Image.Resampling.LANCZOS)
    return submit_job("magic_mix", params, meta, [output_key(f"{file_prefix}-0", req.base64)],
                      {"image": encode_input(fitted)}, req, rt, caller, ondemand.waiting(resolved))


def _output_name(suffix: str = "") -> str:
    """The file name of a one-output job's output: the time, then 122 random bits (the link is the
    credential), then `suffix`."""
    return f"{int(time.time())}-{uuid.uuid4().hex}{suffix}"


def _removal_network(rt: Runtime):
    """The object_remover model (setting removal_model_id) when it is ready or a known model that
    is fetched on first use; None (the inpainting model removes) when it is unset or not here."""
    model_id = rt.settings.removal_model_id
    if not model_id:
        return None
    try:
        return ondemand.require_known(model_id, "object_remover", "removal_model_id", rt)
    except NotFound:
        return None


def mask_creator(req: MaskCreatorRequest, rt: Runtime, caller: Caller) -> JobResponse:
    """A mask (white = the object, black = the rest; the input's size) of what `specific_object`
    names in `init_image`, by the segmenter (setting mask_model_id, fetched on first use where it
    is a known model): a job like super_resolution, one PNG."""
    image = load_image(req.init_image, "init_image", rt, caller)
    if not req.specific_object.strip():
        raise BadInput("specific_object is empty: say what to mask", tip='Send the object in words, e.g. "the ball".')
    model_id = rt.settings.mask_model_id
    needed = ondemand.require_known(model_id, "segmenter", "mask_creator", rt)
    params = MaskParams(model_id=model_id, text=req.specific_object, threshold=req.threshold, width=image.width,
                        height=image.height, base64=req.base64)
    meta = {"specific_object": req.specific_object, "threshold": req.threshold, "mask_model": model_id,
            "init_image": image_ref(req.init_image), "width": image.width, "height": image.height,
            "base64": yes_no(req.base64), "temp": yes_no(req.temp)}
    name = _output_name("_mask")
    return submit_job("mask_creator", params, meta, [output_key(name, req.base64)], {"image": encode_input(image)},
                      req, rt, caller, ondemand.waiting(needed))


def removebg_mask(req: RemoveBgMaskRequest, rt: Runtime, caller: Caller) -> JobResponse:
    """`image` with its background removed (an RGBA PNG whose alpha is the mask), or the mask itself
    (`only_mask`; white = the subject, or the background with `inverse_mask`), by the background
    remover (setting background_model_id, fetched on first use where it is a known model)."""
    matting = None
    if req.alpha_matting:
        if req.alpha_matting_background_threshold >= req.alpha_matting_foreground_threshold:
            raise BadInput(
                f"alpha_matting_background_threshold ({req.alpha_matting_background_threshold}) must be below "
                f"alpha_matting_foreground_threshold ({req.alpha_matting_foreground_threshold}): a mask value cannot "
                "be sure background and sure subject at once",
                tip="Send a background threshold below the foreground one (the defaults are 20 and 240).",
            )
        matting = AlphaMatting(foreground_threshold=req.alpha_matting_foreground_threshold,
                               background_threshold=req.alpha_matting_background_threshold,
                               erode_size=req.alpha_matting_erode_size)
    image = load_image(req.image, "image", rt, caller)
    check_output_size(image.width, image.height, f"image is {image.width}x{image.height}", rt.settings)
    model_id = rt.settings.background_model_id
    needed = ondemand.require_known(model_id, "background_remover", "removebg_mask", rt)
    params = BackgroundParams(model_id=model_id, width=image.width, height=image.height, base64=req.base64,
                              post_process_mask=req.post_process_mask, inverse_mask=req.inverse_mask,
                              only_mask=req.only_mask, alpha_matting=matting)
    name = _output_name()
    return submit_job("removebg_mask", params, removebg_meta(params, req, name), [output_key(name, req.base64)],
                      {"image": encode_input(image)}, req, rt, caller, ondemand.waiting(needed))
