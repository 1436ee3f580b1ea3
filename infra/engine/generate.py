"""Job -> images for text2img, img2img and inpaint.

`job.params` holds the effective parameters the handler resolved (model id, size, resolved
seed, scheduler, ...); input images arrive as PNG bytes already fitted to the output size.
Image i of a job is rendered alone from seed + i, so any image can be reproduced exactly by
sending its own seed with samples 1.
"""

from __future__ import annotations

import io
import logging

import torch
from PIL import Image

from infra.engine import quiet_libraries
from infra.engine.adapters import clip_skip_prompt_embeds
from infra.engine.pipelines import PipelineCache
from infra.engine.postprocess import composite_inpaint
from infra.settings import Settings
from infra.weights import WeightsStore

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, settings: Settings, weights: WeightsStore):
        quiet_libraries()
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.cache = PipelineCache(weights, self.device, dtype)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"cpu ({torch.get_num_threads()} threads)"

    def warm(self, model_id: str) -> None:
        self.cache.model(model_id)

    def generate(self, task: str, params: dict, inputs: dict[str, bytes]) -> list[Image.Image]:
        init = _open(inputs["init_image"]) if "init_image" in inputs else None
        mask = _open(inputs["mask_image"]).convert("L") if "mask_image" in inputs else None
        strength = params.get("strength", 1.0)
        if init is not None and int(params["steps"] * strength) < 1:
            # strength x steps < 1 means no denoising step at all: the answer is the input itself
            return [init.copy() for _ in range(params["samples"])]

        pipeline = self.cache.pipeline(
            params["model_id"], task, params["scheduler"], params["use_karras_sigmas"], params["algorithm"]
        )
        common = dict(
            negative_prompt=params["negative_prompt"] or None,
            num_inference_steps=params["steps"],
            guidance_scale=params["guidance_scale"],
            width=params["width"],
            height=params["height"],
        )
        embeds = clip_skip_prompt_embeds(pipeline, params["prompt"], params["clip_skip"]) if params["clip_skip"] else None
        if embeds is None:
            common["prompt"] = params["prompt"]
        else:
            common["prompt_embeds"] = embeds
        if task in ("img2img", "inpaint"):
            common.update(image=init, strength=strength)
            if task == "img2img":
                del common["width"], common["height"]  # img2img takes the size of `image`
        if task == "inpaint":
            common["mask_image"] = mask

        images = []
        for seed in params["seeds"]:
            generator = torch.Generator("cpu").manual_seed(seed)
            with torch.inference_mode():
                image = pipeline(generator=generator, **common).images[0]
            if task == "inpaint":
                image = composite_inpaint(image, init, mask)
            images.append(image)
        return images


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image
