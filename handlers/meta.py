"""`meta`: a job's effective parameters under ModelsLab's names, derived from its typed params
(`infra.jobs.params`) per endpoint family, plus the request fields that are echoed as sent.

Each family is a table: meta key -> the params field it shows (values as they are), meta key ->
the params field shown as "yes"/"no" (set = yes), and the request fields echoed. Only what no
table can say is spelled out below it (the first seed, comma-joined LoRAs, image references).
"""

from __future__ import annotations

from typing import Any

from infra.jobs.params import BackgroundParams, GenerationParams, UpscaleParams, VideoParams
from models.fields import format_number
from models.requests import GenerationRequest, RemoveBgMaskRequest, SuperResolutionRequest, Text2VideoRequest

# --------------------------------------------------------------------------- generation

GENERATION_VALUES = {
    "prompt": "prompt", "model_id": "model_id", "scheduler": "scheduler", "W": "width", "H": "height",
    "guidance_scale": "guidance_scale", "seeds": "seeds", "steps": "steps", "n_samples": "samples",
    "embeddings": "embedding", "vae": "vae",
}
GENERATION_FLAGS = {
    "safetychecker": "safety_checker", "use_karras_sigmas": "use_karras_sigmas", "tomesd": "tomesd",
    "upscale": "upscale", "highres_fix": "highres_fix", "panorama": "panorama", "self_attention": "self_attention",
}
GENERATION_ECHOED = ("safety_checker_type", "algorithm_type", "clip_skip", "webhook", "track_id")
GENERATION_ECHOED_FLAGS = ("enhance_prompt", "base64", "temp", "instant_response", "multi_lingual")
CONSTANT = {"full_url": "no", "outdir": "out"}  # what this server does not vary


def generation_meta(params: GenerationParams, req: GenerationRequest, file_prefix: str) -> dict[str, Any]:
    meta = {
        **_values(params, GENERATION_VALUES),
        **_flags(params, GENERATION_FLAGS),
        **_echoed(req, GENERATION_ECHOED, GENERATION_ECHOED_FLAGS),
        **CONSTANT,
        "seed": params.seeds[0],
        "negative_prompt": params.negative_prompt or "",
        "output_W": params.output_size()[0],
        "output_H": params.output_size()[1],
        "lora": ",".join(lora.model_id for lora in params.loras) or None,
        "lora_strength": ",".join(format_number(lora.strength) for lora in params.loras) or None,
        "file_prefix": file_prefix,
    }
    if params.strength is not None:
        meta["strength"] = params.strength
    if params.task == "controlnet":
        nets = params.controlnets
        meta.update(
            controlnet_model=",".join(net.model_id for net in nets),
            controlnet_type=",".join(net.type for net in nets),
            controlnet_conditioning_scale=",".join(format_number(net.scale) for net in nets),
            auto_hint=yes_no(params.auto_hint),
            guess_mode=yes_no(params.guess_mode),
        )
    for field in ("init_image", "mask_image"):
        ref = getattr(req, field, None)
        if ref is not None:
            meta[field] = image_ref(ref)
    if getattr(req, "control_image", None):
        meta["control_image"] = ",".join(image_ref(ref) for ref in req.control_image)
    return meta


# --------------------------------------------------------------------------- text2video

VIDEO_VALUES = {
    "prompt": "prompt", "model_id": "model_id", "motion_module": "motion_adapter", "num_frames": "num_frames",
    "fps": "fps", "output_type": "output_type", "steps": "steps", "guidance_scale": "guidance_scale", "seed": "seed",
    "scheduler": "scheduler", "clip_skip": "clip_skip", "W": "width", "H": "height",
}
VIDEO_ECHOED = ("webhook", "track_id")
VIDEO_ECHOED_FLAGS = ("enhance_prompt", "temp", "instant_response")


def video_meta(params: VideoParams, req: Text2VideoRequest) -> dict[str, Any]:
    upscale = params.upscale
    return {
        **_values(params, VIDEO_VALUES),
        **_echoed(req, VIDEO_ECHOED, VIDEO_ECHOED_FLAGS),
        "negative_prompt": params.negative_prompt or "",
        # the passes a job adds are echoed only when it runs them (the meta of a plain video is unchanged)
        **({"use_improved_sampling": "yes"} if params.free_init_iterations else {}),
        **({"upscale_width": upscale.width, "upscale_height": upscale.height, "upscale_strength": upscale.strength,
            "upscale_guidance_scale": upscale.guidance_scale, "upscale_num_inference_steps": upscale.steps}
           if upscale else {}),
    }


# --------------------------------------------------------------------------- super_resolution

UPSCALE_VALUES = {"model_id": "model_id", "scale": "scale", "W": "width", "H": "height"}
UPSCALE_ECHOED = ("face_enhance", "webhook", "track_id")
UPSCALE_ECHOED_FLAGS = ("base64", "temp")


def upscale_meta(params: UpscaleParams, req: SuperResolutionRequest) -> dict[str, Any]:
    return {**_values(params, UPSCALE_VALUES), **_echoed(req, UPSCALE_ECHOED, UPSCALE_ECHOED_FLAGS), "url": image_ref(req.url)}


# --------------------------------------------------------------------------- removebg_mask

# ModelsLab's removebg_mask meta (spec §4.3, §7) spells its rembg flags "0" / "1", its others "yes" / "no"
REMOVEBG_VALUES = {"background_model": "model_id", "W": "width", "H": "height"}
REMOVEBG_DIGIT_FLAGS = {"post_process_mask": "post_process_mask", "only_mask": "only_mask",
                        "alpha_matting": "alpha_matting"}
REMOVEBG_FLAGS = {"inverse_mask": "inverse_mask"}
REMOVEBG_ECHOED = ("alpha_matting_foreground_threshold", "alpha_matting_background_threshold",
                   "alpha_matting_erode_size", "seed", "webhook", "track_id")
REMOVEBG_ECHOED_FLAGS = ("base64", "temp", "instant_response")


def removebg_meta(params: BackgroundParams, req: RemoveBgMaskRequest, file_prefix: str) -> dict[str, Any]:
    return {
        **_values(params, REMOVEBG_VALUES),
        **{key: "1" if getattr(params, name) else "0" for key, name in REMOVEBG_DIGIT_FLAGS.items()},
        **_flags(params, REMOVEBG_FLAGS),
        **_echoed(req, REMOVEBG_ECHOED, REMOVEBG_ECHOED_FLAGS),
        "image_url": image_ref(req.image), "n_samples": 1, "outdir": CONSTANT["outdir"], "file_prefix": file_prefix,
    }


# --------------------------------------------------------------------------- shared


def yes_no(flag: Any) -> str:
    return "yes" if flag else "no"


def image_ref(ref: str) -> str:
    """An image input as meta shows it: its URL, or a placeholder for inline data."""
    return ref if ref.lower().startswith(("http://", "https://")) else "(base64 image)"


def _values(params, table: dict[str, str]) -> dict[str, Any]:
    return {key: _plain(getattr(params, name)) for key, name in table.items()}


def _flags(params, table: dict[str, str]) -> dict[str, str]:
    return {key: yes_no(getattr(params, name)) for key, name in table.items()}


def _echoed(req, values: tuple[str, ...], flags: tuple[str, ...]) -> dict[str, Any]:
    return {**{name: getattr(req, name) for name in values}, **{name: yes_no(getattr(req, name)) for name in flags}}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
