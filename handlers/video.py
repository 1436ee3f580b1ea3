"""text2video (and its G3 alias video/text2video): AnimateDiff, a motion adapter on an SD 1.x
model, rendered as mp4 or gif through the same queue as every generation.

img2video (enterprise video/img2video, v6 video/img2video, v7 video-fusion/image-to-video): the
image, scaled and centre-cropped to width x height, animated by the image-to-video model (catalog
category image_to_video: Stable Video Diffusion; `model_id` unset or ModelsLab's "svd" is the
setting default_image_to_video_model_id, fetched on first use where it is a known model)."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from handlers import ondemand
from handlers.caller import Caller
from handlers.meta import image_ref, video_meta, yes_no
from handlers.submit import check_output_size, enhance_prompt, load_image, resolve_model, resolve_scheduler, submit_job
from infra.jobs.params import ImageVideoParams, VideoParams, VideoUpscale
from infra.net.inputs import encode_input
from models.errors import BadInput, NotAvailable
from models.requests import DEFAULT_SIZE, Img2VideoRequest, Text2VideoRequest
from models.responses import JobResponse

if TYPE_CHECKING:
    from infra.runtime import Runtime

FREE_INIT_ITERATIONS = 3  # use_improved_sampling: FreeInit's passes (its paper's and diffusers' default)


def text2video(req: Text2VideoRequest, rt: Runtime, caller: Caller) -> JobResponse:
    # 1. what the request asks for: available, on an SD 1.x model, with a motion adapter that fits it
    if req.improved_sampling_seed is not None:
        raise NotAvailable("improved_sampling_seed: improved sampling (FreeInit) re-noises from the job's seed here; it "
                           "takes no seed of its own", tip="Leave improved_sampling_seed out; seed sets both.")
    resolved = resolve_model("text2video", req.model_id, rt)
    model = None if isinstance(resolved, ondemand.Pending) else resolved  # None: a default model still to load
    if model is not None and model.family != "sd":
        raise BadInput(
            f"text2video runs AnimateDiff on SD 1.x models; {model.model_id} is {model.family.upper()}",
            tip="Send the model_id of a Stable Diffusion 1.x model.",
        )
    adapter_id = req.motion_module or rt.settings.default_motion_adapter_id
    adapter = ondemand.require_known(adapter_id, "motion_adapter", "motion_module", rt)
    if model is not None and not isinstance(adapter, ondemand.Pending):
        _check_adapter_fits(adapter_id, model.model_id, rt)
    scheduler, _ = resolve_scheduler(req.scheduler, "none", model, rt)
    width, height = req.width or DEFAULT_SIZE, req.height or DEFAULT_SIZE
    # 2. the params, the meta derived from them, and the job
    params = VideoParams(
        model_id=resolved.model_id,
        motion_adapter=adapter_id,
        prompt=enhance_prompt(req.prompt, rt.settings.enhance_prompt_suffix) if req.enhance_prompt else req.prompt,
        negative_prompt=req.negative_prompt,
        width=width,
        height=height,
        num_frames=req.num_frames,
        fps=req.fps,
        output_type=req.output_type,
        steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**32),
        scheduler=scheduler,
        clip_skip=req.clip_skip,
        free_init_iterations=FREE_INIT_ITERATIONS if req.use_improved_sampling else 0,
        upscale=_upscale(req, width, height, rt),
    )
    key = f"generations/{uuid.uuid4()}.{req.output_type}"
    pending = [item for item in (resolved, adapter) if isinstance(item, ondemand.Pending)]
    return submit_job("text2video", params, video_meta(params, req), [key], {}, req, rt, caller, pending)


def _upscale(req: Text2VideoRequest, width: int, height: int, rt: Runtime) -> VideoUpscale | None:
    """The upscaling pass the `upscale_*` fields ask for: it runs when upscale_width or upscale_height
    is sent (the other side keeps the video's aspect), to a size at least the video's."""
    fields = ("upscale_strength", "upscale_guidance_scale", "upscale_num_inference_steps")
    if req.upscale_width is None and req.upscale_height is None:
        if sent := [field for field in fields if getattr(req, field) is not None]:
            raise BadInput(f"{sent[0]} is for the upscaling pass, which runs to upscale_width x upscale_height",
                           tip="Send upscale_width and/or upscale_height too, or leave the upscale fields out.")
        return None
    up_w = req.upscale_width or max(8, round(req.upscale_height * width / height) // 8 * 8)
    up_h = req.upscale_height or max(8, round(req.upscale_width * height / width) // 8 * 8)
    if up_w < width or up_h < height:
        raise BadInput(f"upscale_width x upscale_height {up_w}x{up_h} is smaller than the video's {width}x{height}",
                       tip="Upscale to a size at least the video's, or leave the upscale fields out.")
    check_output_size(up_w, up_h, f"upscale_width x upscale_height {up_w}x{up_h}", rt.settings)
    return VideoUpscale(width=up_w, height=up_h, strength=_or(req.upscale_strength, 0.5),
                        guidance_scale=_or(req.upscale_guidance_scale, req.guidance_scale),
                        steps=_or(req.upscale_num_inference_steps, 20))


def _or(value, default):
    return default if value is None else value


def _check_adapter_fits(adapter_id: str, model_id: str, rt: Runtime) -> None:
    """A motion adapter is made for one UNet layout (its block widths); another cannot take it."""
    try:
        adapter = json.loads((rt.weights.folder(adapter_id) / "config.json").read_text())
        unet = json.loads((rt.weights.folder(model_id) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return  # no readable configs: the engine reports a mismatch when it builds the pipeline
    if list(adapter.get("block_out_channels", [])) != list(unet.get("block_out_channels", [])):
        raise BadInput(
            f"motion_module {adapter_id} does not fit model {model_id}: its blocks are "
            f"{adapter.get('block_out_channels')} wide, the model's UNet {unet.get('block_out_channels')}",
            tip="Use a motion adapter made for this model's architecture (SD 1.5 adapters for SD 1.5 models).",
        )


# ModelsLab's model names for its image-to-video model ("Allowed values: svd"): the server's default here
HOSTED_IMAGE_VIDEO_MODELS = {"svd", "svd-xt", "stable-video-diffusion"}


def img2video(req: Img2VideoRequest, rt: Runtime, caller: Caller) -> JobResponse:
    # 1. the model (fetched on first use where it is a known one) and the image, fitted to the size
    model_id = req.model_id
    if model_id is None or model_id.lower() in HOSTED_IMAGE_VIDEO_MODELS:
        model_id = rt.settings.default_image_to_video_model_id
    needed = ondemand.require_known(model_id, "image_to_video", "model_id", rt)
    if req.base64:
        raise BadInput("base64: a video is returned as a link, not as base64", tip="Send base64 false or leave it out.")
    image = ImageOps.fit(load_image(req.init_image, "init_image", rt, caller).convert("RGB"), (req.width, req.height),
                         Image.Resampling.LANCZOS)
    # 2. the params, the meta (§8.1's fields) and the job
    params = ImageVideoParams(
        model_id=model_id, width=req.width, height=req.height, num_frames=req.num_frames, fps=req.fps,
        output_type=req.output_type, steps=req.num_inference_steps, min_guidance_scale=req.min_guidance_scale,
        max_guidance_scale=req.max_guidance_scale, motion_bucket_id=req.motion_bucket_id,
        noise_aug_strength=req.noise_aug_strength, seed=req.seed if req.seed is not None else secrets.randbelow(2**32),
    )
    meta = {
        "model_id": model_id, "init_image": image_ref(req.init_image), "width": params.width, "height": params.height,
        "num_frames": params.num_frames, "fps": params.fps, "num_inference_steps": params.steps,
        "min_guidance_scale": params.min_guidance_scale, "max_guidance_scale": params.max_guidance_scale,
        "motion_bucket_id": params.motion_bucket_id, "noise_aug_strength": params.noise_aug_strength,
        "latent_interpolation_method": req.latent_interpolation_method, "output_type": params.output_type,
        "seed": params.seed, "base64": "no", "temp": yes_no(req.temp), "instant_response": yes_no(req.instant_response),
        "webhook": req.webhook, "track_id": req.track_id,
    }
    key = f"generations/{uuid.uuid4()}.{req.output_type}"
    return submit_job("img2video", params, meta, [key], {"image": encode_input(image)}, req, rt, caller,
                      ondemand.waiting(needed))
