"""text2video and img2video.

text2video: AnimateDiff, a motion adapter (temporal attention modules) on a Stable Diffusion 1.x
model, run with diffusers' `AnimateDiffPipeline`.

Motion adapters in the store are diffusers `MotionAdapter` folders. `prepare_motion_adapter` takes
such a folder, or a single original AnimateDiff checkpoint (guoyww's `mm_sd_v15*.ckpt` /
`.safetensors`). diffusers' `MotionAdapter.from_single_file` cannot be used offline: without
`config=` it fetches the config of the release it guesses from the keys (e.g.
guoyww/animatediff-motion-adapter-v1-5-2) from the hub. The architecture is in the tensor shapes,
though, so the config is read from them (blocks, channels, layers, frames) and the keys are renamed
with diffusers' own converter; only the number of attention heads is not in the shapes, and every
released module uses 8. SDXL motion adapters, PIA and SparseCtrl files are refused.

How a video job runs (`generate_video`): the model's UNet2DConditionModel becomes a
UNetMotionModel, the same UNet with a motion module after every block. diffusers does that
conversion in `AnimateDiffPipeline(...)` / `AnimateDiffPipeline.from_pipe(sd, motion_adapter=...)`
with `UNetMotionModel.from_unet2d`, which initialises a new model randomly and then *copies* the
UNet's and the adapter's weights into it (seconds and ~1.7 GB more for SD 1.5 in fp16, per model
and adapter); `from_pipe` also casts every shared component to float32 unless `dtype=` is given.
Neither changes the shared SD pipeline's own modules otherwise, but we do not copy at all:
`motion_unet` builds the UNetMotionModel on the meta device and assigns it the *same tensors*
as the model's UNet and the adapter (the UNetMotionModel's state dict is exactly the union of
the two). Building takes milliseconds and no memory, the text2img pipeline is untouched
(its modules are not replaced or wrapped, only their tensors are read), and a LoRA loaded into
the model's UNet (peft wraps its layers) does not reach the video: the motion UNet's layers are
plain and share only the base weights. Inference never writes to weights.

The built pipelines are kept in a small `VideoPipelines` cache per (model, adapter) object pair;
a job swaps in only its own fresh scheduler. An entry disappears by itself when the model cache
drops either object (a weakref finalizer), so a cached video pipeline never keeps an evicted
model's VAE, text encoder or UNet tensors in memory. The caller holds `model.lock` for the job,
which also serialises the jobs that use one cached pipeline.

img2video (`generate_image_video`): diffusers' `StableVideoDiffusionPipeline` as the model cache
loaded it (catalog category image_to_video), called with the job's image and SVD's conditioning.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch
from diffusers import AnimateDiffPipeline, AnimateDiffVideoToVideoPipeline, MotionAdapter, UNetMotionModel
from PIL import Image

from infra.engine import LOAD_LOCK
from infra.engine.adapters import text_model_alias
from infra.engine.prompts import text_call
from infra.engine.protocol import DoesNotFit, Unsupported
from infra.engine.types import LoadedModel

# --------------------------------------------------------------------------- pipelines


def motion_unet(unet, adapter: MotionAdapter) -> UNetMotionModel:
    """The UNetMotionModel of `unet` + `adapter`, sharing their tensors (no copy). A peft-wrapped
    (LoRA) layer of `unet` contributes its base weights only."""
    blocks = list(unet.config.block_out_channels)
    if list(adapter.config.block_out_channels) != blocks:
        raise DoesNotFit(
            f"the motion adapter is for UNet blocks of {list(adapter.config.block_out_channels)} channels; "
            f"the model's UNet has {blocks}"
        )
    base = {}
    for key, tensor in unet.state_dict().items():
        if ".lora_" in key:  # a LoRA's own tensors (lora_A / lora_B / lora_magnitude_vector ...)
            continue
        base[key.replace(".base_layer.", ".")] = tensor
    motion = {k: v.to(device=unet.device, dtype=unet.dtype) for k, v in adapter.state_dict().items()}
    with LOAD_LOCK, torch.device("meta"):
        try:  # from_unet2d checks the layer counts and derives the config; load_weights=False: no copy
            model = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
        except ValueError as exc:
            raise DoesNotFit(f"the motion adapter does not fit the model's UNet: {exc}") from exc
    try:
        model.load_state_dict({**base, **motion}, strict=True, assign=True)
    except RuntimeError as exc:
        raise DoesNotFit(f"the motion adapter does not fit the model's UNet: {str(exc)[:300]}") from exc
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a diffusers change would show here
        raise RuntimeError("UNetMotionModel has tensors outside its state dict; cannot share the UNet's weights")
    return model.eval()


def build_video_pipeline(model: LoadedModel, adapter: MotionAdapter) -> AnimateDiffPipeline:
    """An AnimateDiffPipeline on the model's VAE, text encoder and tokenizer and a motion UNet that
    shares the model's UNet weights. Its scheduler is the model's until a job swaps in its own."""
    _check_model(model)
    sd = model.pipeline
    pipeline = AnimateDiffPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=motion_unet(sd.unet, adapter),  # a UNetMotionModel: the constructor converts nothing
        motion_adapter=None,  # its tensors live in the motion UNet; not holding it lets the cache evict it
        scheduler=sd.scheduler,
        feature_extractor=None,
        image_encoder=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _check_model(model: LoadedModel) -> None:
    if model.family != "sd":
        raise Unsupported(f"text2video runs on Stable Diffusion 1.x models; {model.model_id} is {model.family.upper()}")
    if model.pipeline.unet.config.in_channels != 4:
        raise Unsupported(f"text2video needs a text2img model; {model.model_id} is an inpainting model")


class VideoPipelines:
    """Built AnimateDiff pipelines per (LoadedModel, MotionAdapter) object pair, the `max_entries`
    most recently used. An entry goes when either object is garbage collected (evicted from the
    model cache), so it never keeps an evicted model's tensors alive."""

    def __init__(self, max_entries: int = 2):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, int], tuple[AnimateDiffPipeline, list[weakref.finalize]]] = OrderedDict()
        self._lock = threading.RLock()  # a finalizer may run (garbage collection) while this thread holds it

    def get(self, model: LoadedModel, adapter: MotionAdapter) -> AnimateDiffPipeline:
        key = (id(model), id(adapter))  # ids are unique while both live; the finalizers drop the entry first
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        pipeline = build_video_pipeline(model, adapter)  # under the model's lock: one build per key
        with self._lock:
            finalizers = [weakref.finalize(model, self._forget, key), weakref.finalize(adapter, self._forget, key)]
            self._entries[key] = (pipeline, finalizers)
            while len(self._entries) > self.max_entries:
                _, (_, old) = self._entries.popitem(last=False)
                for finalizer in old:
                    finalizer.detach()
        return pipeline

    def clear(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for _, finalizers in entries:
            for finalizer in finalizers:
                finalizer.detach()

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self, key: tuple[int, int]) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
        for finalizer in entry[1] if entry else ():
            finalizer.detach()  # the other object's finalizer must not drop a later entry with a reused id


VIDEO_PIPELINES = VideoPipelines()  # the process's cache, used unless the caller brings its own


def generate_video(
    model: LoadedModel,
    adapter: MotionAdapter,
    scheduler,
    *,
    prompt: str,
    negative_prompt: str | None,
    width: int,
    height: int,
    num_frames: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    clip_skip: int | None,
    free_init_iterations: int = 0,
    upscale: dict | None = None,
    pipelines: VideoPipelines | None = None,
    step_end=None,
) -> list[Image.Image]:
    """The frames of one video. `clip_skip` is diffusers' count of skipped layers (or None);
    `scheduler` is a fresh scheduler for this job; `free_init_iterations` > 1 runs FreeInit
    (diffusers' `enable_free_init`: the video denoised that many times, each time re-noised from the
    last one's low spatio-temporal frequencies, which makes the frames more consistent); `upscale`
    (width, height, strength, guidance_scale, steps) adds the upscaling pass (`refine_video`);
    `step_end(pipeline, call, planned steps) -> call` adds the progress reporting to each pipeline
    call. The caller holds `model.lock`."""
    _check_model(model)
    max_frames = adapter.config.motion_max_seq_length
    if not 1 <= num_frames <= max_frames:
        raise DoesNotFit(f"num_frames must be between 1 and {max_frames} for this motion adapter, not {num_frames}")
    if width % 8 or height % 8:
        raise DoesNotFit(f"width and height must be multiples of 8, not {width}x{height}")
    pipeline = (pipelines if pipelines is not None else VIDEO_PIPELINES).get(model, adapter)
    pipeline.scheduler = scheduler
    generator = torch.Generator("cpu").manual_seed(seed)
    call = {"negative_prompt": negative_prompt or None, "num_frames": num_frames, "width": width, "height": height,
            "num_inference_steps": steps, "guidance_scale": guidance_scale, "clip_skip": clip_skip,
            "generator": generator, "output_type": "pil"}
    if step_end is not None:
        call = step_end(pipeline, call, steps)
    if free_init_iterations > 1:  # on the cached pipeline for this job only (the caller holds the model's lock)
        pipeline.enable_free_init(num_iters=free_init_iterations)
    try:
        with text_model_alias(model), torch.inference_mode():  # the alias is a no-op if the caller set it
            output = pipeline(**text_call(pipeline, prompt, call))  # A1111 prompt syntax, long prompts (prompts.py)
    finally:
        if free_init_iterations > 1:
            pipeline.disable_free_init()
    frames = list(output.frames[0])
    if upscale is not None:
        fresh = type(scheduler).from_config(scheduler.config)
        frames = refine_video(pipeline, frames, fresh, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                              clip_skip=clip_skip, step_end=step_end, **upscale)
    return frames


def refine_video(pipeline: AnimateDiffPipeline, frames: list[Image.Image], scheduler, *, prompt: str,
                 negative_prompt: str | None, width: int, height: int, strength: float, guidance_scale: float,
                 steps: int, seed: int, clip_skip: int | None, step_end=None) -> list[Image.Image]:
    """text2video's upscaling pass (the `upscale_*` fields): the frames enlarged (Lanczos) to width x
    height and denoised again at `strength` by diffusers' AnimateDiffVideoToVideoPipeline on the same
    VAE, text encoder and motion UNet, so the detail is the model's, not the resampler's. A strength
    too low for one step leaves the enlarged frames as they are."""
    enlarged = [frame.resize((width, height), Image.Resampling.LANCZOS) for frame in frames]
    planned = min(int(steps * strength), steps)  # diffusers' video-to-video rule (VideoUpscale.steps_run)
    if planned < 1:
        return enlarged
    refiner = AnimateDiffVideoToVideoPipeline(
        vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, unet=pipeline.unet,
        motion_adapter=None, scheduler=scheduler, feature_extractor=None, image_encoder=None,
    )  # a UNetMotionModel already: the constructor converts nothing, copies nothing
    refiner.set_progress_bar_config(disable=True)
    call = {"video": enlarged, "negative_prompt": negative_prompt or None, "width": width, "height": height,
            "strength": strength, "num_inference_steps": steps, "guidance_scale": guidance_scale, "clip_skip": clip_skip,
            "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "pil"}
    if step_end is not None:
        call = step_end(refiner, call, planned)
    with torch.inference_mode():
        output = refiner(**text_call(refiner, prompt, call))
    return list(output.frames[0])


# --------------------------------------------------------------------------- img2video

SVD_DECODE_CHUNK = 8  # frames the temporal VAE decodes at once: bounds the decoder's memory on long videos


def generate_image_video(
    pipeline,
    image: Image.Image,
    *,
    width: int,
    height: int,
    num_frames: int,
    fps: int,
    steps: int,
    min_guidance_scale: float,
    max_guidance_scale: float,
    motion_bucket_id: int,
    noise_aug_strength: float,
    seed: int,
    step_end=None,
) -> list[Image.Image]:
    """The frames of one video animating `image` (already width x height) with a Stable Video
    Diffusion pipeline. The model is conditioned on the image (CLIP image embedding + its latents)
    and on `fps` and `motion_bucket_id`; there is no text. Guidance rises linearly from
    `min_guidance_scale` on the first frame to `max_guidance_scale` on the last. `step_end(pipeline,
    call) -> call` adds progress reporting."""
    if width % 8 or height % 8:
        raise DoesNotFit(f"width and height must be multiples of 8, not {width}x{height}")
    # 1. the call: SVD's own parameters (its `fps` conditioning is the output's frame rate)
    call = {"height": height, "width": width, "num_frames": num_frames, "num_inference_steps": steps,
            "min_guidance_scale": min_guidance_scale, "max_guidance_scale": max_guidance_scale, "fps": fps,
            "motion_bucket_id": motion_bucket_id, "noise_aug_strength": noise_aug_strength,
            "decode_chunk_size": min(num_frames, SVD_DECODE_CHUNK),
            "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "pil"}
    if step_end is not None:
        call = step_end(pipeline, call)
    # 2. denoise every frame's latents together; decode them in chunks
    with torch.inference_mode():
        output = pipeline(image.convert("RGB"), **call)
    return list(output.frames[0])
