"""text2video (and its G3 alias video/text2video): AnimateDiff, a motion adapter on an SD 1.x
model, rendered as mp4 or gif through the same queue as every generation."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import TYPE_CHECKING

from handlers import ondemand
from handlers.caller import Caller
from handlers.meta import video_meta
from handlers.submit import enhance_prompt, resolve_model, resolve_scheduler, submit_job
from infra.jobs.params import VideoParams
from models.errors import BadInput, NotAvailable
from models.requests import DEFAULT_SIZE, Text2VideoRequest
from models.responses import JobResponse

if TYPE_CHECKING:
    from infra.runtime import Runtime

# G3 fields for features this server does not have (zeroscope upscaling, improved sampling)
_NOT_AVAILABLE = ("upscale_height", "upscale_width", "upscale_strength", "upscale_guidance_scale",
                  "upscale_num_inference_steps", "improved_sampling_seed")


def text2video(req: Text2VideoRequest, rt: Runtime, caller: Caller) -> JobResponse:
    # 1. what the request asks for: available, on an SD 1.x model, with a motion adapter that fits it
    for field in _NOT_AVAILABLE:
        if getattr(req, field) is not None:
            raise NotAvailable(f"{field}: video upscaling is not available on this server", tip=f"Leave {field} out.")
    if req.use_improved_sampling:
        raise NotAvailable("use_improved_sampling is not available on this server", tip="Send \"no\" or leave it out.")
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
    # 2. the params, the meta derived from them, and the job
    params = VideoParams(
        model_id=resolved.model_id,
        motion_adapter=adapter_id,
        prompt=enhance_prompt(req.prompt, rt.settings.enhance_prompt_suffix) if req.enhance_prompt else req.prompt,
        negative_prompt=req.negative_prompt,
        width=req.width or DEFAULT_SIZE,
        height=req.height or DEFAULT_SIZE,
        num_frames=req.num_frames,
        fps=req.fps,
        output_type=req.output_type,
        steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**32),
        scheduler=scheduler,
        clip_skip=req.clip_skip,
    )
    key = f"generations/{uuid.uuid4()}.{req.output_type}"
    pending = [item for item in (resolved, adapter) if isinstance(item, ondemand.Pending)]
    return submit_job("text2video", params, video_meta(params, req), [key], {}, req, rt, caller, pending)


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
