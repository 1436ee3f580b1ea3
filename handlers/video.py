"""text2video (and its G3 alias video/text2video): AnimateDiff, a motion adapter on an SD 1.x
model, rendered as mp4 or gif through the same queue as every generation."""

from __future__ import annotations

import json
import secrets
import uuid

from handlers.generation import enhance_prompt, resolve_model
from handlers.ondemand import require_model
from handlers.queue import expiry, submit_job, yes_no
from infra.engine.schedulers import SchedulerError, resolve_name
from models.errors import ApiError, BadInput, NotAvailable
from models.requests import Text2VideoRequest
from models.responses import JobResponse

DEFAULT_SIZE = 512

# G3 fields for features this server does not have (zeroscope upscaling, improved sampling)
_NOT_AVAILABLE = ("upscale_height", "upscale_width", "upscale_strength", "upscale_guidance_scale",
                  "upscale_num_inference_steps", "improved_sampling_seed")


def text2video(req: Text2VideoRequest, rt) -> JobResponse:
    for field in _NOT_AVAILABLE:
        if getattr(req, field) is not None:
            raise NotAvailable(f"{field}: video upscaling is not available on this server", tip=f"Leave {field} out.")
    if req.use_improved_sampling:
        raise NotAvailable("use_improved_sampling is not available on this server", tip="Send \"no\" or leave it out.")
    model = resolve_model("text2video", req.model_id, rt)
    if model.family != "sd":
        raise BadInput(
            f"text2video runs AnimateDiff on SD 1.x models; {model.model_id} is {model.family.upper()}",
            tip="Send the model_id of a Stable Diffusion 1.x model.",
        )
    adapter_id = req.motion_module or rt.settings.default_motion_adapter_id
    awaiting = require_model(adapter_id, "motion_adapter", "motion_module", rt)
    if not awaiting:
        _check_adapter_fits(adapter_id, model.model_id, rt)
    try:
        scheduler = resolve_name(req.scheduler) if req.scheduler else rt.weights.default_scheduler(model.model_id)
    except SchedulerError as exc:
        raise ApiError({"scheduler": [str(exc)]}, status_code=422) from None

    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    prompt = enhance_prompt(req.prompt, rt.settings.enhance_prompt_suffix) if req.enhance_prompt else req.prompt
    params = {
        "model_id": model.model_id,
        "motion_adapter": adapter_id,
        "prompt": prompt,
        "negative_prompt": req.negative_prompt,
        "width": req.width or DEFAULT_SIZE,
        "height": req.height or DEFAULT_SIZE,
        "samples": 1,
        "num_frames": req.num_frames,
        "fps": req.fps,
        "output_type": req.output_type,
        "steps": req.num_inference_steps,
        "guidance_scale": req.guidance_scale,
        "seed": seed,
        "scheduler": scheduler,
        "clip_skip": req.clip_skip,
        "await_models": awaiting,
        **expiry(req.temp, rt.settings),
    }
    # meta: the effective parameters under their ModelsLab names
    echoed = ("prompt", "model_id", "num_frames", "fps", "output_type", "steps", "guidance_scale", "seed", "scheduler",
              "clip_skip")
    meta = {
        **{name: params[name] for name in echoed},
        "motion_module": adapter_id,
        "negative_prompt": req.negative_prompt or "",
        "W": params["width"],
        "H": params["height"],
        "enhance_prompt": yes_no(req.enhance_prompt),
        "temp": yes_no(req.temp),
        "instant_response": yes_no(req.instant_response),
        "webhook": req.webhook,
        "track_id": req.track_id,
    }
    key = f"generations/{uuid.uuid4()}.{req.output_type}"
    return submit_job("text2video", params, meta, [key], {}, req, rt)


def _check_adapter_fits(adapter_id: str, model_id: str, rt) -> None:
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
