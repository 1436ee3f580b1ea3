"""Job -> output files: images for text2img, img2img, inpaint and controlnet (with highres_fix,
upscale, the safety checker and base64 files), super_resolution, mask_creator, removebg_mask,
text2video, img2video.

A job's typed parameters (`infra.jobs.params`) hold the effective values the handler resolved
(model id, size, seeds, scheduler, LoRAs, ...); the engine applies no defaults of its own. Input
images arrive as encoded bytes already fitted to the output size. Image i of a job is rendered alone from seed + i, so any image can be reproduced exactly by
sending its own seed with samples 1 (with the setting batch_samples, a job's images share one
batched pass, each from its own seed's generator: the same images up to floating-point noise).

Progress (`infra.engine.protocol.Progress`): every pipeline call reports each denoising step through
its step-end callback (chained after the speed mode's own; the legacy per-step `callback` where a
pipeline has only that), the stage it is in, and, when a preview is due, a small JPEG of the
latents (`latent_preview`). The `Cancelled` a step raises stops the pipeline where it is.

Prompts: A1111's emphasis syntax, BREAK and prompts past 77 tokens reach a pipeline as its text
embeddings (`infra.engine.prompts`); a plain prompt that fits goes to the pipeline as text, as before.

removebg_mask runs rembg (U²-Net on onnxruntime, its session cached like any component); rembg is
imported only when such a job runs (`infra.engine.files.background`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import FluxMultiControlNetModel, QwenImageMultiControlNetModel, SD3MultiControlNetModel
from diffusers.configuration_utils import FrozenDict
from diffusers.models import MultiControlNetModel
from PIL import Image, ImageOps

from infra.catalog.weights import WeightsStore
from infra.engine import quiet_libraries
from infra.engine.adapters import diffusers_clip_skip, job_adapters, job_ip_adapter, seed_tome, text_model_alias
from infra.engine.cache import CLIP_FAMILIES, ModelCache, build_scheduler
from infra.engine.hints import make_hint
from infra.engine.postprocess import composite_inpaint, treat_flagged
from infra.engine.prompts import text_call
from infra.engine.protocol import DoesNotFit, EngineResult, Progress, Unsupported
from infra.engine.speed import FastPath, MemorySettings, cfg_cutoff_call, memory_report
from infra.engine.types import LoadedModel
from infra.media import encode_image, encode_video
from infra.safety import detector
from infra.settings import Settings
from models.schedulers import DISTILLED_FAMILIES

if TYPE_CHECKING:
    from infra.jobs.params import (
        BackgroundParams,
        GenerationParams,
        ImageVideoParams,
        JobParams,
        MagicMixParams,
        MaskParams,
        RemovalParams,
        UpscaleParams,
        VideoParams,
    )

log = logging.getLogger(__name__)


KONTEXT_RESIZE_PIXELS = 512 * 512


# a family's ControlNets combined, where its pipelines take several (Z-Image's take one)
MULTI_CONTROLNETS = {"sd": MultiControlNetModel, "sdxl": MultiControlNetModel, "flux": FluxMultiControlNetModel,
                     "sd3": SD3MultiControlNetModel, "qwen": QwenImageMultiControlNetModel}
# a Flux union ControlNet's modes (InstantX / Shakker-Labs FLUX.1-dev-ControlNet-Union): controlnet_type -> control_mode
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "openpose": 4, "pose": 4, "gray": 5, "lq": 6}


def union_mode(net, controlnet_type: str) -> int | None:
    """The `control_mode` a Flux union ControlNet (one with `num_mode` in its config) runs the hint
    `controlnet_type` as; None for a ControlNet of one kind."""
    if not getattr(net.config, "num_mode", None):
        return None
    if controlnet_type not in UNION_MODES:
        raise Unsupported(f"controlnet_type {controlnet_type} is not a mode of the union ControlNet "
                          f"(its modes: {', '.join(UNION_MODES)})")
    return UNION_MODES[controlnet_type]


# pipelines that draw from torch's global generator besides the job's: diffusers 0.42.1's SD3 ControlNet
# pipelines and Qwen-Image's ControlNet inpainting sample the hint's VAE latents with
# `latent_dist.sample()` and no generator
GLOBAL_RNG_PIPELINES = ("StableDiffusion3ControlNetPipeline", "StableDiffusion3ControlNetInpaintingPipeline",
                        "QwenImageControlNetInpaintPipeline")


@contextlib.contextmanager
def global_rng_seeded(pipeline, seed: int):
    """For a pipeline of GLOBAL_RNG_PIPELINES: the global CPU generator seeded from the job's seed for
    the call (and put back after), so the same request gives the same image. (Two such jobs at once in
    one process would share it: on a GPU worker a container runs one job at a time.)"""
    if type(pipeline).__name__ not in GLOBAL_RNG_PIPELINES:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# the families whose ControlNet inpainting reads the masked image and mask as its hint (an inpainting
# ControlNet: SD3's Alimama-style, Qwen-Image's InstantX-style), by the config value that makes one
MASKED_IMAGE_CONTROLNETS = {"sd3": "extra_conditioning_channels", "qwen": "extra_condition_channels"}
INPAINTING_CONTROLNETS = {"sd3": "alimama-creative/SD3-Controlnet-Inpainting",
                          "qwen": "InstantX/Qwen-Image-ControlNet-Inpainting",
                          "zimage": "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.0"}


def is_inpainting_controlnet(net, model: LoadedModel) -> bool:
    """Whether a transformer family's ControlNet reads the masked image and the mask: SD3 / Qwen-Image
    ones with extra conditioning channels; Z-Image ones whose control_in_dim exceeds the latent
    channels (Union 2.0: hint, masked image and mask; Union 1.0 reads the hint only)."""
    if model.family in MASKED_IMAGE_CONTROLNETS:
        return bool(net.config.get(MASKED_IMAGE_CONTROLNETS[model.family]))
    if model.family == "zimage":
        return net.config.control_in_dim != model.pipeline.transformer.in_channels
    return False


def check_inpainting_controlnet(net, net_id: str, model: LoadedModel, inpaint: bool) -> None:
    """SD3, Qwen-Image and Z-Image inpaint through a ControlNet made for inpainting (and SD3 /
    Qwen-Image ones do nothing else); Flux.1's ControlNets do both."""
    if model.family not in INPAINTING_CONTROLNETS:
        return
    made_for_it = is_inpainting_controlnet(net, model)
    if inpaint and not made_for_it:
        raise Unsupported(f"ControlNet {net_id} reads a hint only: ControlNet inpainting on {model.family} models needs "
                          f"one made for inpainting (like {INPAINTING_CONTROLNETS[model.family]}); use it for text2img, "
                          "or inpaint without a ControlNet")
    if not inpaint and made_for_it and model.family in MASKED_IMAGE_CONTROLNETS:
        raise Unsupported(f"ControlNet {net_id} is an inpainting ControlNet: send init_image and mask_image "
                          "(it repaints the masked area), or use a hint ControlNet for text2img")


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class DiffusersEngine:
    """The `Engine` protocol (`infra.engine.protocol`) on diffusers, for every job kind."""

    def __init__(self, settings: Settings, weights: WeightsStore, device: str | None = None, dtype: str | None = None):
        """`device`: where to run (default: the setting `device`); `dtype` ("fp16" / "fp32"): what
        models load as (default: fp16 on CUDA, fp32 on the CPU). A Modal worker loads on the CPU in
        fp16 for its memory snapshot and moves to the GPU after the restore (`move_to`)."""
        quiet_libraries()
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.weights = weights
        self.device = resolve_device(device or settings.device)
        chosen = {"fp16": torch.float16, "fp32": torch.float32}.get(dtype or "")
        self.cache = ModelCache(
            weights, self.device, chosen or _dtype_for(self.device), self._cache_budget, FastPath.from_settings(settings),
            MemorySettings.from_settings(settings),
        )

    def _cache_budget(self) -> int:
        """The model cache's budget in bytes, read at every load (update_server may change it)."""
        return self.settings.model_cache_mb * 1024 * 1024

    def rebind(self, settings: Settings, weights: WeightsStore) -> None:
        """Read these settings and this weights store from now on (a Modal container restored from
        a snapshot, with its own environment and Volume view); the loaded models stay."""
        self.settings, self.weights = settings, weights
        self.cache.weights = weights

    def move_to(self, device: str) -> None:
        """Run on `device` from now on, with the loaded models moved there (fp16 on CUDA)."""
        self.device = resolve_device(device)
        self.cache.move_to(self.device, _dtype_for(self.device))

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"cpu ({torch.get_num_threads()} threads)"

    def warm(self, model_id: str) -> None:
        self.cache.model(model_id)

    def loaded(self) -> list[str]:
        return self.cache.loaded

    def memory_report(self) -> dict[str, dict]:
        """Per loaded model, what `speed.prepare` applied (dtype, quantization, offloaded text
        encoders, fast path) for system_details."""
        reports = {}
        for loaded in self.cache.models():
            report = memory_report(loaded.pipeline)
            if report is not None:
                reports[loaded.model_id] = report
        return reports

    def unload_all(self) -> list[str]:
        """Drop every cached model, component and video pipeline; their ids."""
        from infra.engine.video import VIDEO_PIPELINES

        unloaded = self.cache.loaded
        VIDEO_PIPELINES.clear()
        self.cache.clear()
        return unloaded

    def evict(self, model_id: str) -> None:
        """Forget a deleted model: its cache entry, and its adapter in every cached model."""
        from infra.engine.adapters import forget_lora

        self.cache.evict(model_id)
        for loaded in self.cache.models():
            forget_lora(loaded, model_id)

    def run(self, params: JobParams, inputs: Mapping[str, bytes], progress: Progress | None = None) -> EngineResult:
        """A job's output files (in the order of its output keys) and facts for its `meta`."""
        facts: dict = {}
        progress = progress or NO_PROGRESS
        # 1. the frames of a video are the whole output
        if params.kind == "video":
            frames = self.video(params, progress)
            if params.scheduler is None:
                facts["scheduler"] = scheduler_of(self.cache.model(params.model_id), params)
            return EngineResult([encode_video(frames, params.fps, params.output_type)], facts)
        if params.kind == "image_video":
            frames = self.image_video(params, _open(inputs["image"]), progress)
            return EngineResult([encode_video(frames, params.fps, params.output_type)], facts)
        # 2. the images: upscaled from the input, or generated (and optionally upscaled)
        if params.kind == "generation" and params.translation is not None:  # multi_lingual: in English first
            params = self._translated(params, facts)
        if params.kind == "mask":
            progress.stage("postprocessing")
            images = [self.segment(_open(inputs["image"]), params)]
            progress.step()
        elif params.kind == "magic_mix":
            images = [self.magic_mix(params, _open(inputs["image"]), progress)]
        elif params.kind == "removal":
            progress.stage("postprocessing")
            images = [self.remove_object(_open(inputs["image"]), _open(inputs["mask"]), params)]
            progress.step()
        elif params.kind == "removebg":
            progress.stage("postprocessing")
            images = [self.remove_background(_open(inputs["image"]).convert("RGB"), params)]
            progress.step()
        elif params.kind == "upscale":
            progress.stage("postprocessing")
            image, faces = self.super_resolve(_open(inputs["image"]), params)
            progress.step()
            images = [image]
            if params.face_restorer:
                facts["faces_restored"] = faces
        else:
            images = self.generate(params, inputs, progress)
            if upscale := params.upscale:
                progress.stage("postprocessing")
                upscaler = self.cache.component(upscale.model_id, "upscaler")
                upscaled = []
                for index, image in enumerate(images):
                    progress.image(index)
                    upscaled.append(self._upscale(upscaler, image, upscale.scale))
                    progress.step()
                images = upscaled
        # 3. the safety checker on what would be stored
        progress.stage("postprocessing")
        if checker := getattr(params, "safety_checker", None):
            images, flagged = check_images(images, checker.type, checker.threshold)
            facts["nsfw_content_detected"] = flagged
        # 4. the files, and the scheduler when the job left it to the model
        if params.kind == "generation" and params.scheduler is None:
            facts["scheduler"] = scheduler_of(self.cache.model(params.model_id), params)
        return EngineResult([encode_image(image, params.base64) for image in images], facts)

    def segment(self, image: Image.Image, params: MaskParams) -> Image.Image:
        """mask_creator: the segmenter's per-pixel probability that the pixel is what `params.text`
        names (CLIPSeg's logits at its own resolution, sigmoid, resized bilinearly to the image),
        white where it reaches `params.threshold`, else black (an "L" image of the input's size)."""
        model, processor = self.cache.component(params.model_id, "segmenter")
        inputs = processor(text=[params.text], images=[image.convert("RGB")], padding="max_length", return_tensors="pt")
        with torch.inference_mode():
            logits = model(**inputs.to(model.device)).logits
        probability = torch.sigmoid(logits.float().reshape(1, 1, *logits.shape[-2:]))
        probability = torch.nn.functional.interpolate(probability, size=(image.height, image.width), mode="bilinear")
        mask = (probability[0, 0] >= params.threshold).to(torch.uint8).mul(255).cpu().numpy()
        return Image.fromarray(mask, mode="L")

    def magic_mix(self, params: MagicMixParams, image: Image.Image, progress: Progress) -> Image.Image:
        """magic_mix: MagicMix (infra.engine.community.magic_mix) on the model's components, with the
        job's scheduler, its prompt through the CLIP families' prompt syntax, seeded by its seed."""
        progress.stage("loading_model")
        model = self.cache.model(params.model_id)
        if model.family != "sd":
            raise Unsupported(f"magic_mix runs on SD 1.x / 2.x models; {params.model_id} is {model.family.upper()}")
        pipeline = self.cache.pipeline(model, "magic_mix", scheduler_of(model, params), False, None)
        call = {"negative_prompt": params.negative_prompt or None, "clip_skip": None}
        with model.lock, text_model_alias(model):  # (as a generation's adapters hold it: the alias is per job)
            call = prompt_call(model, pipeline, params.prompt, call)
            generator = torch.Generator("cpu").manual_seed(params.seed)
            progress.stage("denoising")
            with torch.inference_mode():
                output = pipeline(image=image.convert("RGB"), kmin=params.kmin, kmax=params.kmax,
                                  mix_factor=params.mix_factor, num_inference_steps=params.steps,
                                  guidance_scale=params.guidance_scale, generator=generator,
                                  **reporting(pipeline, call, progress, params.total_steps(), 1))
        return output.images[0]

    def remove_object(self, image: Image.Image, mask: Image.Image, params: RemovalParams) -> Image.Image:
        """object_removal by a LaMa-class network: the image (RGB, 0..1) and its mask (1 where white,
        binarised at half) in, spandrel's descriptor padding them to the sizes the network takes;
        the network's pixels where the mask is white, the image's own everywhere else."""
        network = self.cache.component(params.model_id, "object_remover")
        rgb = image.convert("RGB")
        binary = mask.convert("L").resize(rgb.size, Image.Resampling.NEAREST).point(lambda v: 255 if v >= 128 else 0)
        pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)[None].float().div(255)
        holes = torch.from_numpy(np.asarray(binary).copy())[None, None].float().div(255)
        with torch.inference_mode():
            filled = network(pixels.to(network.device, network.dtype), holes.to(network.device, network.dtype))
        out = filled[0].float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.composite(Image.fromarray(out, mode="RGB"), rgb, binary)
    def remove_background(self, image: Image.Image, params: BackgroundParams) -> Image.Image:
        """removebg_mask: the background remover's mask of `image` (rembg: U²-Net's saliency map,
        min-max scaled to 0-255 and resized to the image; with `post_process_mask` smoothed by
        rembg's opening, blur and threshold), inverted when `inverse_mask` asks; then the mask itself
        ("L", `only_mask`), or rembg's cut-out of it: RGBA whose alpha is the mask (rembg's plain
        cut-out: the image composited over transparent black through the mask), or with
        `alpha_matting` the matted one (alpha and foreground colours solved from a trimap of the mask;
        where the trimap has no sure foreground or background to solve from, rembg's fallback: the
        mask as alpha, the foreground colours re-estimated)."""
        from rembg import remove
        from rembg.bg import alpha_matting_cutout, decontaminate_cutout, naive_cutout

        session = self.cache.component(params.model_id, "background_remover")
        # the mask first, by rembg alone: the inversion comes after its post-processing and before the
        # cut-out, a step rembg.remove does not have, so the cut-out is done here from the (inverted) mask
        mask = remove(image, session=session, only_mask=True, post_process_mask=params.post_process_mask)
        if params.inverse_mask:
            mask = ImageOps.invert(mask)
        if params.only_mask:
            return mask
        if matting := params.alpha_matting:
            try:
                return alpha_matting_cutout(image, mask, matting.foreground_threshold, matting.background_threshold,
                                            matting.erode_size)
            except ValueError:  # pymatting: no sure subject / background, or no convergence: rembg.remove's fallback
                return decontaminate_cutout(image, mask)
        return naive_cutout(image, mask)

    def _translated(self, params: GenerationParams, facts: dict) -> GenerationParams:
        """The job with its foreign-language texts in English (the translator's words in `facts`:
        translated_prompt, translated_negative_prompt); a text the translator answers nothing for
        stays as it was."""
        from infra.engine.prompts import translate

        translator = self.cache.component(params.translation.model_id, "translator")
        changes = {}
        for field in params.translation.fields:
            english = translate(translator, getattr(params, field))
            facts[f"translated_{field}"] = english
            if english:
                changes[field] = english
        return params.model_copy(update=changes)

    def super_resolve(self, image: Image.Image, params: UpscaleParams) -> tuple[Image.Image, int]:
        """Upscale to the job's size; with a face restorer, restore the faces found in the input."""
        from infra.engine.upscale import restore_faces

        upscaler = self.cache.component(params.model_id, "upscaler")
        output = self._upscale(upscaler, image, params.scale)
        if output.size != (params.width, params.height):
            output = output.resize((params.width, params.height), Image.Resampling.LANCZOS)
        if not params.face_restorer:
            return output, 0
        sx, sy = output.width / image.width, output.height / image.height
        boxes = [
            (round(x * sx), round(y * sy), round(w * sx), round(h * sy)) for x, y, w, h in
            (face.box for face in detector().faces(image))
        ]
        if boxes:
            restorer = self.cache.component(params.face_restorer, "face_restorer")
            output = restore_faces(restorer, output, boxes)
        return output, len(boxes)

    def _upscale(self, upscaler, image: Image.Image, scale: float) -> Image.Image:
        from infra.engine.upscale import upscale

        return upscale(upscaler, image, scale, self.settings.upscale_tile, self.settings.upscale_tile_overlap)

    def video(self, params: VideoParams, progress: Progress = None) -> list[Image.Image]:
        from infra.engine.video import generate_video

        progress = progress or NO_PROGRESS
        progress.stage("loading_model")
        model = self.cache.model(params.model_id)
        adapter = self.cache.component(params.motion_adapter, "motion_adapter")
        scheduler = build_scheduler(scheduler_of(model, params), model.scheduler_config, False, None)
        no_adapters = job_adapters(model, self.weights, [], None, 0.0, self.settings.max_loaded_loras)
        with no_adapters, text_model_alias(model):  # LoRAs of an earlier job switched off; holds the model's lock
            progress.image(0)
            progress.stage("denoising")
            return generate_video(
                model, adapter, scheduler, prompt=params.prompt, negative_prompt=params.negative_prompt,
                width=params.width, height=params.height, num_frames=params.num_frames, steps=params.steps,
                guidance_scale=params.guidance_scale, seed=params.seed, clip_skip=self._clip_skip(model, params.clip_skip),
                free_init_iterations=params.free_init_iterations,
                upscale=params.upscale.model_dump() if params.upscale else None,
                step_end=lambda pipeline, call, planned: reporting(pipeline, call, progress, planned, 1),
            )

    def image_video(self, params: ImageVideoParams, image: Image.Image, progress: Progress = None) -> list[Image.Image]:
        """img2video: the frames of `image` animated by the job's image-to-video model (SVD)."""
        from infra.engine.video import generate_image_video

        progress = progress or NO_PROGRESS
        progress.stage("loading_model")
        pipeline = self.cache.component(params.model_id, "image_to_video")
        progress.image(0)
        progress.stage("denoising")
        return generate_image_video(
            pipeline, image, width=params.width, height=params.height, num_frames=params.num_frames, fps=params.fps,
            steps=params.steps, min_guidance_scale=params.min_guidance_scale,
            max_guidance_scale=params.max_guidance_scale, motion_bucket_id=params.motion_bucket_id,
            noise_aug_strength=params.noise_aug_strength, seed=params.seed,
            step_end=lambda pipeline, call: reporting(pipeline, call, progress, params.steps, 1),
        )

    def generate(self, params: GenerationParams, inputs: Mapping[str, bytes],
                 progress: Progress | None = None) -> list[Image.Image]:
        """text2img, img2img, inpaint and controlnet: one image per seed, each composited and refined."""
        progress = progress or NO_PROGRESS
        # 1. the inputs (already fitted to the output size by the handler)
        init = _open(inputs["init_image"]) if "init_image" in inputs else None
        mask = _open(inputs["mask_image"]).convert("L") if "mask_image" in inputs else None
        strength = 1.0 if params.strength is None else params.strength
        highres = params.highres_fix
        if params.task in ("img2img", "inpaint") and int(params.steps * strength) < 1:
            # strength x steps < 1 means no denoising step at all: the answer is the input itself
            size = (highres.width, highres.height) if highres else init.size
            return [init.resize(size, Image.Resampling.LANCZOS) for _ in range(params.samples)]

        # 2. the pipeline: the model's variant for the task, with this job's scheduler and parts
        progress.stage("loading_model")
        model = self.cache.model(params.model_id)
        parts = {}
        if params.vae:
            parts["vae"] = vae_for(model, self.cache.component(params.vae, "vae"))
        variant, call = self._variant_and_inputs(params, model, init, mask, inputs, parts)
        pipeline = self.cache.pipeline(
            model, variant, scheduler_of(model, params), params.use_karras_sigmas, params.algorithm, **parts
        )
        clip = model.family in CLIP_FAMILIES
        call.update(
            negative_prompt=negative_prompt(model, params),
            num_inference_steps=params.steps,
            width=params.width,
            height=params.height,
            clip_skip=self._clip_skip(model, params.clip_skip),
            **guidance_call(model, params.guidance_scale),
        )
        accepted = call_parameters(type(pipeline))
        call = {k: v for k, v in call.items() if k in accepted}  # img2img variants take the image's size
        ip_adapter = contextlib.nullcontext()
        if params.ip_adapter is not None:
            if "ip_adapter_image" not in accepted:
                raise Unsupported(f"IP-Adapter is not available for {variant.replace('_', ' ')} jobs")
            ip_adapter = job_ip_adapter(model, pipeline, self.weights.folder(params.ip_adapter.model_id),
                                        self.cache.component(params.ip_adapter.model_id, "ip_adapter"),
                                        params.ip_adapter.scale)
            call["ip_adapter_image"] = _open(inputs["ip_adapter_image"])

        # 3. what adapts the model for this job, and the speed modes
        loras = [(lora.model_id, lora.strength) for lora in params.loras]
        # ToMe patches UNets (and SAG reads the attention maps it merges)
        tome = self._tome_ratio(params) if variant != "self_attention" and clip else 0.0
        if variant in ("text2img", "img2img", "inpaint") and clip:  # speed mode that changes outputs (cfg_cutoff)
            call.update(cfg_cutoff_call(pipeline, params.steps, self.settings.cfg_cutoff, params.guidance_scale))
        refine = self._highres_pass(model, params, init, mask, parts, progress) if highres else None
        seeds = list(params.seeds)
        # one pass for all samples, with one generator per image (the latents of seed + i alone), or one pass each
        batches = [seeds] if self.settings.batch_samples and not tome and len(seeds) > 1 else [[seed] for seed in seeds]

        # 4. denoise, then composite (inpainting keeps the unmasked pixels) and refine (highres_fix)
        images = []
        adapters = job_adapters(model, self.weights, loras, params.embedding, tome, self.settings.max_loaded_loras)
        with adapters, ip_adapter, text_model_alias(model):
            call = prompt_call(model, pipeline, params.prompt, call)
            for batch in batches:
                seed_tome(model, batch[0])
                generators = [torch.Generator("cpu").manual_seed(seed) for seed in batch]
                many = {"num_images_per_prompt": len(batch)} if len(batch) > 1 else {}
                progress.image(len(images))
                progress.stage("denoising")
                with torch.inference_mode(), global_rng_seeded(pipeline, batch[0]):
                    output = pipeline(
                        generator=generators if many else generators[0], **many,
                        **reporting(pipeline, call, progress, params.first_pass_steps(), len(batch)),
                    ).images
                for seed, image in zip(batch, output):
                    progress.image(len(images))
                    progress.stage("postprocessing")
                    if image.size != (params.width, params.height):  # (Qwen-Image-Edit's inpaint answers at 1 MP)
                        image = image.resize((params.width, params.height), Image.Resampling.LANCZOS)
                    if mask is not None:
                        image = composite_inpaint(image, init, mask)
                    if refine is not None:
                        image = refine(image, seed)
                    images.append(image)
        return images

    def _tome_ratio(self, params: GenerationParams) -> float:
        """The ToMe ratio of this job (0: no ToMe): the request's `tomesd`, unless setting tomesd_mode overrides it."""
        mode = self.settings.tomesd_mode
        wanted = mode == "always" or (mode == "request" and params.tomesd)
        return self.settings.tomesd_ratio if wanted else 0.0

    def _highres_pass(self, model: LoadedModel, params: GenerationParams, init, mask, parts: dict,
                      progress: Progress):
        """highres_fix's second pass: the first image enlarged (Lanczos) to the highres size and
        refined by img2img (inpaint when there is a mask, composited again so unmasked pixels stay
        the enlarged original) at the setting's strength, with the same seed and adapters."""
        highres = params.highres_fix
        size = (highres.width, highres.height)
        if int(params.steps * highres.strength) < 1:  # no denoising step: enlarging is all it does
            return lambda image, seed: image.resize(size, Image.Resampling.LANCZOS)
        variant = ("fill" if model.kind == "fill" else "inpaint") if mask is not None else "img2img"
        vae = {"vae": parts["vae"]} if "vae" in parts else {}
        pipeline = self.cache.pipeline(
            model, variant, scheduler_of(model, params), params.use_karras_sigmas, params.algorithm, **vae
        )
        big_mask = mask.resize(size, Image.Resampling.BOX) if mask is not None else None
        big_init = init.resize(size, Image.Resampling.LANCZOS) if mask is not None else None
        call = {
            "negative_prompt": negative_prompt(model, params),
            "num_inference_steps": params.steps,
            **guidance_call(model, params.guidance_scale),
            "strength": highres.strength,
            "width": size[0],
            "height": size[1],
            "clip_skip": self._clip_skip(model, params.clip_skip),
        }
        if big_mask is not None:
            call["mask_image"] = big_mask
        accepted = call_parameters(type(pipeline))
        call = {k: v for k, v in call.items() if k in accepted}
        # the text embeddings, at the first image (under the job's adapters: its embedding, text-encoder LoRAs)
        text = functools.cache(lambda: prompt_call(model, pipeline, params.prompt, call))

        def refine(image: Image.Image, seed: int) -> Image.Image:
            generator = torch.Generator("cpu").manual_seed(seed)
            enlarged = image.resize(size, Image.Resampling.LANCZOS)
            progress.stage("denoising")
            with torch.inference_mode():
                refined = pipeline(image=enlarged, generator=generator,
                                   **reporting(pipeline, text(), progress, params.second_pass_steps(), 1)).images[0]
            progress.stage("postprocessing")
            return composite_inpaint(refined, big_init, big_mask) if big_mask is not None else refined

        return refine

    def _variant_and_inputs(self, params: GenerationParams, model: LoadedModel, init, mask, inputs,
                            parts) -> tuple[str, dict]:
        task = params.task
        if task == "text2img":
            variant = "panorama" if params.panorama else "self_attention" if params.self_attention else task
            return variant, {}
        if task == "img2img" and model.kind == "edit":  # Kontext: no strength, the prompt says what changes
            # (Flux.2: the reference images after the first, reference_0, ..., as one list with it)
            references = [_open(inputs[f"reference_{i}"]) for i in range(len(inputs)) if f"reference_{i}" in inputs]
            return "edit", {"image": [init, *references] if references else init, **self._kontext_size(params)}
        if task == "img2img":
            return task, {"image": init, "strength": params.strength}
        if task == "inpaint":  # a Fill or Kontext model inpaints with its own pipeline
            variant = {"fill": "fill", "edit": "edit_inpaint"}.get(model.kind, task)
            call = {"image": init, "mask_image": mask, "strength": params.strength}
            return variant, {**call, **self._kontext_size(params)} if model.kind == "edit" else call
        # controlnet: one hint per ControlNet, from its own control image or the shared one
        nets = [self.cache.component(net.model_id, "controlnet") for net in params.controlnets]
        if len(nets) > 1 and model.family not in MULTI_CONTROLNETS:
            raise Unsupported(f"{model.family} models take one ControlNet at a time")
        parts["controlnet"] = nets[0] if len(nets) == 1 else MULTI_CONTROLNETS[model.family](nets)
        hints = []
        for i, net in enumerate(params.controlnets):
            source = inputs.get(f"control_image_{i}") or inputs.get("control_image_0") or inputs.get("init_image")
            hint = _open(source)
            if params.auto_hint:
                estimator = self.cache.component(net.preprocessor, "preprocessor") if net.preprocessor else None
                hint = make_hint(net.type, hint, mask, estimator)
            hints.append(hint)
        scales = [net.scale for net in params.controlnets]
        call = {
            "controlnet_conditioning_scale": scales[0] if len(nets) == 1 else scales,
            "guess_mode": params.guess_mode,
        }
        hint_arg = hints[0] if len(nets) == 1 else hints
        if model.family not in CLIP_FAMILIES:  # the transformer families' pipelines: the hint is control_image
            for net, spec in zip(nets, params.controlnets, strict=True):
                check_inpainting_controlnet(net, spec.model_id, model, inpaint=mask is not None)
            if mask is not None and model.family in MASKED_IMAGE_CONTROLNETS:  # (the image and mask are the hint)
                return "controlnet_inpaint", {**call, "control_image": init, "control_mask": mask}
            call["control_image"] = hint_arg
            modes = [union_mode(net, spec.type) for net, spec in zip(nets, params.controlnets, strict=True)]
            if any(mode is not None for mode in modes):
                call["control_mode"] = modes[0] if len(nets) == 1 else modes
            if init is None:
                return "controlnet", call
            call.update(image=init, strength=params.strength)
            if mask is not None:
                return "controlnet_inpaint", {**call, "mask_image": mask}
            return "controlnet_img2img", call
        if init is None:
            return "controlnet", {**call, "image": hint_arg}
        call.update(image=init, control_image=hint_arg, strength=params.strength)
        if mask is not None:
            return "controlnet_inpaint", {**call, "mask_image": mask}
        return "controlnet_img2img", call

    @staticmethod
    def _kontext_size(params: GenerationParams) -> dict:
        """A Kontext pipeline's size arguments: the output at the job's size (`max_area` would
        otherwise rescale it to 1 MP), and the image read at the resolution of its training set
        closest in aspect (~1 MP, diffusers' `_auto_resize`) for outputs of at least
        KONTEXT_RESIZE_PIXELS; a smaller output reads it as it was sent (at most 1024 on its longer side)."""
        return {"max_area": params.width * params.height,
                "_auto_resize": params.width * params.height >= KONTEXT_RESIZE_PIXELS}

    @staticmethod
    def _clip_skip(model: LoadedModel, wire_value: int | None) -> int | None:
        if model.family not in (*CLIP_FAMILIES, "sd3"):  # (an LLM text encoder: the handler refused clip_skip)
            return None
        skip = diffusers_clip_skip(wire_value)
        layers = model.pipeline.text_encoder.config.num_hidden_layers
        if skip is not None and skip >= layers:
            raise DoesNotFit(f"clip_skip {wire_value} is too large for model {model.model_id} ({layers} CLIP layers)")
        return skip


class _NoProgress:
    """The `Progress` of a run nobody follows (a warm-up, a benchmark): every call a no-op."""

    def stage(self, stage: str) -> None: ...

    def image(self, index: int) -> None: ...

    def adjust(self, extra_steps: int) -> None: ...

    def step(self, count: int = 1) -> None: ...

    def wants_preview(self) -> bool:
        return False

    def preview(self, jpeg: bytes) -> None: ...


NO_PROGRESS = _NoProgress()


def reporting(pipeline, call: dict, progress: Progress, planned: int, images: int) -> dict:
    """The pipeline call `call` with each denoising step reported to `progress`: a step-end
    callback chained after the one `call` may already carry (the speed mode's), or the legacy
    per-step `callback` where the pipeline has only that. `planned`: the steps the job counted for
    this pass (corrected at the first step when the scheduler runs more); `images`: images the
    pass makes at once (a batched pass advances each)."""
    accepted = call_parameters(type(pipeline))
    if progress is NO_PROGRESS:
        return call
    seen = [0]

    def report(step: int, latents) -> None:
        if seen[0] == 0 and (actual := getattr(pipeline, "_num_timesteps", None)) and actual != planned:
            progress.adjust((actual - planned) * images)
        seen[0] += 1
        progress.step(images)  # raises Cancelled: the pipeline stops here
        if latents is not None and progress.wants_preview():
            progress.preview(latent_preview(latents))
        if seen[0] >= (getattr(pipeline, "_num_timesteps", None) or planned):
            progress.stage("decoding")

    if "callback_on_step_end" in accepted:
        chained = call.get("callback_on_step_end")
        names = list(call.get("callback_on_step_end_tensor_inputs") or [])
        if "latents" in getattr(pipeline, "_callback_tensor_inputs", ()) and "latents" not in names:
            names.append("latents")

        def on_step_end(pipe, step, timestep, tensors):
            if chained is not None:
                tensors = chained(pipe, step, timestep, tensors)
            report(step, tensors.get("latents"))
            return tensors

        return {**call, "callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": names}
    if "callback" in accepted:
        return {**call, "callback": lambda step, timestep, latents: report(step, latents), "callback_steps": 1}
    return call  # no per-step hook: the steps are counted when the pass ends (execute_job's finish)


def latent_preview(latents: torch.Tensor, longest: int = 256) -> bytes:
    """A small JPEG of the first image's latents: the linear latent-to-RGB approximation of SD's
    VAE latent space (the factors A1111 and ComfyUI use for their live previews), not a VAE decode;
    a latent space of another width shows its first three channels. Nearest-neighbour enlarged to
    at most `longest` pixels."""
    first = latents[0].detach().float().cpu()
    if first.dim() == 4:  # a video's first frame: AnimateDiff's (channels, frames, h, w), SVD's (frames, channels, h, w)
        first = first[0] if first.shape[0] != 4 and first.shape[1] == 4 else first[:, 0]
    if first.shape[0] == 4:
        rgb = torch.einsum("chw,cr->rhw", first, _SD_LATENT_RGB)
    else:
        rgb = first[:3]
        rgb = (rgb - rgb.mean()) / (rgb.std() + 1e-6) * 0.5
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels, "RGB")
    scale = max(1, longest // max(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


_SD_LATENT_RGB = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                               [-0.2829, 0.1762, 0.2721], [-0.2120, -0.0259, -0.5634]])


def prompt_call(model: LoadedModel, pipeline, prompt: str, call: dict) -> dict:
    """The prompt into the call: through A1111's prompt syntax and long-prompt chunking on the CLIP
    families (prompts.py); as written for the transformer families, whose T5 / LLM encoder reads the
    text itself (and whose CLIP encoders, where they have them, get it cut at 77 tokens, as diffusers does)."""
    if model.family in CLIP_FAMILIES:
        return text_call(pipeline, prompt, call)
    return {**call, "prompt": prompt}


def negative_prompt(model: LoadedModel, params) -> str | None:
    """The job's negative prompt, None for none; Flux.1 and Flux.2 take none (their guidance is
    distilled); Qwen-Image runs its true CFG only with one, so an empty one is a blank."""
    if model.family in DISTILLED_FAMILIES:
        return None
    if model.family == "qwen":
        return params.negative_prompt or " "
    return params.negative_prompt or None


def guidance_call(model: LoadedModel, guidance_scale: float) -> dict:
    """The job's guidance as the family's pipelines take it: Qwen-Image's is true CFG
    (`true_cfg_scale`; its `guidance_scale` is for guidance-distilled checkpoints only), the others'
    `guidance_scale` (classifier-free for SD, SD3 and Z-Image; distilled for Flux.1 and Flux.2)."""
    if model.family == "qwen":
        return {"true_cfg_scale": guidance_scale}
    return {"guidance_scale": guidance_scale}


def scheduler_of(model: LoadedModel, params) -> str:
    """The job's scheduler: the one it names, else the model's own."""
    return params.scheduler or model.scheduler_config["_class_name"]


@functools.cache
def call_parameters(pipeline_class) -> frozenset[str]:
    """The keyword arguments a pipeline class's __call__ takes (inspect.signature costs ~2 ms a job)."""
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)


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


def check_images(images: list[Image.Image], treatment: str, threshold: float) -> tuple[list[Image.Image], list[bool]]:
    """The safety checker: every image scored by the NSFW detector; flagged ones replaced by their
    treated version (blur, pixelate, black or a notice). Returns the images and which were flagged."""
    flagged = [detector().nsfw_score(image) >= threshold for image in images]
    return [treat_flagged(image, treatment) if hit else image for image, hit in zip(images, flagged)], flagged


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image
