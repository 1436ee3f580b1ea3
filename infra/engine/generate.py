"""Job -> images for text2img, img2img, inpaint and controlnet.

`job.params` holds the effective parameters the handler resolved (model id, size, resolved
seeds, scheduler, LoRAs, ...); input images arrive as PNG bytes already fitted to the output
size. Image i of a job is rendered alone from seed + i, so any image can be reproduced exactly by
sending its own seed with samples 1.
"""

from __future__ import annotations

import copy
import inspect
import io
import logging

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models import MultiControlNetModel
from PIL import Image

from infra.engine import quiet_libraries
from infra.engine.adapters import diffusers_clip_skip, job_adapters, seed_tome, text_model_alias
from infra.engine.hints import make_hint
from infra.engine.pipelines import LoadedModel, ModelCache
from infra.engine.postprocess import composite_inpaint
from infra.settings import Settings
from infra.weights import WeightsStore
from models.errors import BadInput

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
        self.settings = settings
        self.weights = weights
        self.device = resolve_device(settings.device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.cache = ModelCache(weights, self.device, dtype, settings.model_cache_mb * 1024 * 1024)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"cpu ({torch.get_num_threads()} threads)"

    def warm(self, model_id: str) -> None:
        self.cache.model(model_id)

    def evict(self, model_id: str) -> None:
        """Forget a deleted model: its cache entry, and its adapter in every cached model."""
        from infra.engine.adapters import forget_lora

        self.cache.evict(model_id)
        for loaded in self.cache.models():
            forget_lora(loaded, model_id)

    def generate(self, task: str, params: dict, inputs: dict[str, bytes]) -> list[Image.Image]:
        init = _open(inputs["init_image"]) if "init_image" in inputs else None
        mask = _open(inputs["mask_image"]).convert("L") if "mask_image" in inputs else None
        strength = params.get("strength", 1.0)
        if task in ("img2img", "inpaint") and int(params["steps"] * strength) < 1:
            # strength x steps < 1 means no denoising step at all: the answer is the input itself
            return [init.copy() for _ in range(params["samples"])]

        model = self.cache.model(params["model_id"])
        parts = {}
        if params.get("vae"):
            parts["vae"] = vae_for(model, self.cache.component(params["vae"], "vae"))
        variant, call = self._variant_and_inputs(task, params, init, mask, inputs, parts)
        pipeline = self.cache.pipeline(
            model, variant, params["scheduler"], params["use_karras_sigmas"], params["algorithm"], **parts
        )
        call.update(
            negative_prompt=params["negative_prompt"] or None,
            num_inference_steps=params["steps"],
            guidance_scale=params["guidance_scale"],
            width=params["width"],
            height=params["height"],
            clip_skip=self._clip_skip(model, params.get("clip_skip")),
        )
        accepted = inspect.signature(type(pipeline).__call__).parameters
        call = {k: v for k, v in call.items() if k in accepted}  # img2img variants take the image's size

        loras = [(lora_id, strength) for lora_id, strength in params.get("loras", [])]
        tome = params.get("tomesd", False) and variant != "self_attention"  # SAG reads the attention maps ToMe merges
        images = []
        adapters = job_adapters(model, self.weights, loras, params.get("embedding"), tome, self.settings.max_loaded_loras)
        with adapters, text_model_alias(model):
            for seed in params["seeds"]:
                seed_tome(model, seed)
                generator = torch.Generator("cpu").manual_seed(seed)
                with torch.inference_mode():
                    image = pipeline(prompt=params["prompt"], generator=generator, **call).images[0]
                if mask is not None:
                    image = composite_inpaint(image, init, mask)
                images.append(image)
        return images

    def _variant_and_inputs(self, task, params, init, mask, inputs, parts) -> tuple[str, dict]:
        if task == "text2img":
            variant = "panorama" if params.get("panorama") else "self_attention" if params.get("self_attention") else task
            return variant, {}
        if task == "img2img":
            return task, {"image": init, "strength": params["strength"]}
        if task == "inpaint":
            return task, {"image": init, "mask_image": mask, "strength": params["strength"]}
        # controlnet: one hint per ControlNet, from its own control image or the shared one
        nets = [self.cache.component(net["model_id"], "controlnet") for net in params["controlnets"]]
        parts["controlnet"] = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
        hints = []
        for i, net in enumerate(params["controlnets"]):
            source = inputs.get(f"control_image_{i}") or inputs.get("control_image_0") or inputs.get("init_image")
            hint = _open(source)
            if params.get("auto_hint"):
                estimator = self.cache.component(net["preprocessor"], "preprocessor") if net.get("preprocessor") else None
                hint = make_hint(net["type"], hint, mask, estimator)
            hints.append(hint)
        scales = [net["scale"] for net in params["controlnets"]]
        call = {
            "controlnet_conditioning_scale": scales[0] if len(nets) == 1 else scales,
            "guess_mode": params.get("guess_mode", False),
        }
        hint_arg = hints[0] if len(nets) == 1 else hints
        if init is None:
            return "controlnet", {**call, "image": hint_arg}
        call.update(image=init, control_image=hint_arg, strength=params["strength"])
        if mask is not None:
            return "controlnet_inpaint", {**call, "mask_image": mask}
        return "controlnet_img2img", call

    @staticmethod
    def _clip_skip(model: LoadedModel, wire_value: int | None) -> int | None:
        skip = diffusers_clip_skip(wire_value)
        layers = model.pipeline.text_encoder.config.num_hidden_layers
        if skip is not None and skip >= layers:
            raise BadInput(f"clip_skip {wire_value} is too large for model {model.model_id} ({layers} CLIP layers)")
        return skip


def vae_for(model: LoadedModel, vae):
    """A custom VAE as `model` must use it: with the model's latent scaling factor. SD 1.x, 2.x and
    SDXL VAEs have the same shapes, so a single-file VAE cannot tell which family's config it
    had; the latents it decodes belong to the model's UNet, whose own VAE config knows the factor.
    A shallow copy shares the weights and changes only the config of this job's view."""
    factor = model.pipeline.vae.config.scaling_factor
    if vae.config.scaling_factor == factor:
        return vae
    view = copy.copy(vae)
    view._internal_dict = FrozenDict({**vae.config, "scaling_factor": factor})
    return view


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image
