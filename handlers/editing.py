"""outpaint and object_removal (spec §4.2, §4.4, §7): the image_editing family's edits, as inpaint jobs.

Neither has an engine path of its own: each builds an ordinary inpaint job (task "inpaint", one
image) through `handlers.generation._generate`, the function inpaint itself goes through, so it
gets the same checks, params, queue, sync budget, fetch, webhook and metering (under its own
endpoint name). The engine composites every inpaint output into its input through the mask
(`infra.engine.postprocess.composite_inpaint`), which keeps the unmasked pixels bit for bit.

- **outpaint** prepares the inputs: a canvas of the requested size with the image in its middle
  (scaled down to fit, never up), the border around it pre-filled with the image's edge pixels
  spread outwards and blurred (so a strength-1 inpaint has colours to continue), and a mask that
  is white on the border and on an `overlap_width` band just inside each edge of the image that
  meets a border (the seam is repainted), black on the rest of the image.
- **object_removal** repaints the white area of its mask with the server's default inpainting
  model, an empty prompt and a negative prompt naming what is usually removed, at strength 1
  (there is no dedicated removal network here); `meta.removal_model` says which model did it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from handlers import ondemand
from handlers.caller import Caller
from handlers.generation import _check_mask, _generate
from handlers.meta import image_ref
from handlers.submit import check_output_size, load_image, resolve_model
from infra.catalog.weights import CATEGORY_TITLES
from models.requests import InpaintRequest, JobOptions, ObjectRemovalRequest, OutpaintRequest
from models.responses import JobResponse
from models.schedulers import FLOW_FAMILIES

if TYPE_CHECKING:
    from infra.runtime import Runtime

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
    init = load_image(req.init_image, "init_image", rt, caller)
    mask = load_image(req.mask_image, "mask_image", rt, caller)
    _check_mask(init, mask)
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
