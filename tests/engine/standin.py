"""`StandInEngine`: the `Engine` protocol (infra.engine.protocol) without diffusion, for tests that
must not pay for a model (dispatch, job stores, fuzzing). It imports neither torch nor diffusers.

It keeps the promises tests/engine/test_engine_conformance.py holds every engine to, the way
`DiffusersEngine` keeps them, only with made-up pixels:

- generation: one PNG per seed, at the params' final size (`output_size()`: after highres_fix and
  upscale), each one flat colour drawn from its seed (`colour(seed)`), so the same seed gives the
  same bytes and different seeds different images. Inpainting keeps the unmasked pixels of the
  init image exactly, as the real engine's compositing does; an img2img / inpaint job with
  strength x steps < 1 returns the init image itself. `base64: True` files are the base64 text of
  the PNG (`infra.media.encode_image`, as the real engine). A safety checker flags nothing (`nsfw_content_detected`: all False).
- video: one mp4 / gif (`infra.media.encode_video`) of `num_frames` flat frames at the job's fps.
- upscale: one PNG of the job's (width, height): the input image resized (Lanczos); with a face
  restorer, `faces_restored`: 0 (it finds no faces).
- object removal: the input image with its masked pixels (white in the `mask` input) one flat
  colour (`colour(0)`), the others as they were.
- magic_mix: one PNG of the job's size: the input blended with its seed's colour, `kmax` of it
  (the more of the schedule it runs, the further from the layout).
- mask (mask_creator): one black-and-white "L" PNG of the input's size, white where the input's
  luminance reaches the job's threshold (x 255): the words are not read.
- removebg (removebg_mask): the input's luminance stands for the model's mask (with
  `post_process_mask` thresholded at 128), inverted with `inverse_mask`; one PNG of the input's
  size: that mask ("L") with `only_mask`, else the input as RGBA with the mask as its alpha (alpha
  matting changes nothing here).

It raises what the real engine raises for the jobs it can judge without weights: `Unsupported`
for a panorama / self_attention text2img on a model it was told is SDXL (`sdxl_models`), and for
text2video on an SDXL or inpainting model (`inpaint_models`); `DoesNotFit` for a clip_skip beyond
the text encoder's `clip_layers`, and for a video whose num_frames is outside 1..`max_frames` or
whose size is not a multiple of 8. It knows no store: any model id is accepted.

Progress: a job's `total_steps()` are reported as steps (every image in turn, `image(i)` first),
in stage `denoising`, `step_seconds` apart (0 by default; a test that cancels a running job makes
its steps take time), so a cancel or a deadline stops it between two steps as it stops the real
engine; then stage `postprocessing`.

Bookkeeping: `loaded()` holds the model ids a job or `warm` touched, least recently used first (the
models and components the real engine's cache would hold: pipeline, VAE, ControlNets and their
preprocessors, motion adapter, upscaler, segmenter, background remover); `evict` / `unload_all`
forget them. `runs` lists the params of every job it was asked to run, failed ones included
(`inputs` the inputs beside them). Thread-safe: a dispatcher's workers may share one.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Iterable, Mapping

from PIL import Image, ImageOps

from infra.engine.postprocess import composite_inpaint
from infra.engine.protocol import DoesNotFit, EngineResult, Unsupported
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
from infra.media import encode_image, encode_video

SD_CLIP_LAYERS = 12  # CLIP ViT-L/14's layers (SD 1.x and the tiny models)
MOTION_MAX_FRAMES = 32  # AnimateDiff's motion_max_seq_length (and the tiny motion adapter's)


def colour(seed: int) -> tuple[int, int, int]:
    """The flat RGB colour of the image rendered from `seed`."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    return digest[0], digest[1], digest[2]


class StandInEngine:
    """An `Engine` that draws flat colours (see the module docstring)."""

    def __init__(self, sdxl_models: Iterable[str] = frozenset(), inpaint_models: Iterable[str] = frozenset(),
                 clip_layers: int = SD_CLIP_LAYERS, max_frames: int = MOTION_MAX_FRAMES, device: str = "cpu",
                 step_seconds: float = 0.0):
        self.sdxl_models = frozenset(sdxl_models)
        self.inpaint_models = frozenset(inpaint_models)
        self.clip_layers = clip_layers
        self.max_frames = max_frames
        self.device = device
        self.step_seconds = step_seconds
        self.steps_run = 0  # steps of every job so far (a cancelled job's only up to its cancel)
        self.settings = self.weights = None  # what `rebind` was given (it reads neither)
        self.runs: list[JobParams] = []
        self.inputs: list[Mapping[str, bytes]] = []
        self._loaded: dict[str, None] = {}  # insertion order: least recently used first
        self._lock = threading.Lock()

    # --- the protocol: bookkeeping

    @property
    def device_name(self) -> str:
        return f"stand-in ({self.device})"

    def move_to(self, device: str) -> None:
        self.device = device

    def rebind(self, settings, weights) -> None:
        self.settings, self.weights = settings, weights

    def warm(self, model_id: str) -> None:
        self._touch(model_id)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def evict(self, model_id: str) -> None:
        with self._lock:
            self._loaded.pop(model_id, None)

    def unload_all(self) -> list[str]:
        with self._lock:
            unloaded = list(self._loaded)
            self._loaded.clear()
        return unloaded

    # --- the protocol: jobs

    def run(self, params: JobParams, inputs: Mapping[str, bytes], progress=None) -> EngineResult:
        with self._lock:
            self.runs.append(params)
            self.inputs.append(inputs)
        if progress is not None:
            self._steps(params, progress)
        if isinstance(params, VideoParams):
            return EngineResult([self._video(params)], {})
        if isinstance(params, ImageVideoParams):  # the image, shaded a little more on every frame
            self._touch(params.model_id)
            image = _open(inputs["image"]).convert("RGB")
            frames = [image.point(lambda v, i=i: max(0, v - 8 * i)) for i in range(params.num_frames)]
            return EngineResult([encode_video(frames, params.fps, params.output_type)], {})
        if isinstance(params, UpscaleParams):
            self._touch(params.model_id)
            size = (params.width, params.height)
            source = _open(inputs["image"]) if "image" in inputs else Image.new("RGB", size, colour(0))
            image = source.resize(size, Image.Resampling.LANCZOS)
            facts = {"faces_restored": 0} if params.face_restorer else {}
            return EngineResult([encode_image(image, params.base64)], facts)
        if isinstance(params, MagicMixParams):
            self._touch(params.model_id)
            layout = _open(inputs["image"]).convert("RGB").resize((params.width, params.height))
            mixed = Image.blend(layout, Image.new("RGB", layout.size, colour(params.seed)), params.kmax)
            return EngineResult([encode_image(mixed, params.base64)], {})
        if isinstance(params, RemovalParams):
            self._touch(params.model_id)
            image = _open(inputs["image"]).convert("RGB")
            holes = _open(inputs["mask"]).convert("L").point(lambda v: 255 if v >= 128 else 0)
            filled = Image.composite(Image.new("RGB", image.size, colour(0)), image, holes)
            return EngineResult([encode_image(filled, params.base64)], {})
        if isinstance(params, MaskParams):
            self._touch(params.model_id)
            cut = round(params.threshold * 255)
            mask = _open(inputs["image"]).convert("L").point(lambda v: 255 if v >= cut else 0)
            return EngineResult([encode_image(mask, params.base64)], {})
        if isinstance(params, BackgroundParams):
            self._touch(params.model_id)
            return EngineResult([encode_image(self._cut_out(_open(inputs["image"]), params), params.base64)], {})
        images = self._generate(params, inputs)
        if params.upscale:
            self._touch(params.upscale.model_id)
        facts = {}
        if params.safety_checker:
            facts["nsfw_content_detected"] = [False] * len(images)
        return EngineResult([encode_image(image, params.base64) for image in images], facts)

    # --- internals

    def _steps(self, params: JobParams, progress) -> None:
        images = getattr(params, "samples", 1)
        per_image = max(1, params.total_steps() // images)
        progress.stage("denoising")
        for index in range(images):
            progress.image(index)
            for _ in range(per_image):
                if self.step_seconds:
                    time.sleep(self.step_seconds)
                progress.step()  # raises Cancelled once the job is cancelled or past its deadline
                with self._lock:
                    self.steps_run += 1
        progress.stage("postprocessing")

    def _generate(self, params: GenerationParams, inputs: Mapping[str, bytes]) -> list[Image.Image]:
        init = _open(inputs["init_image"]) if "init_image" in inputs else None
        mask = _open(inputs["mask_image"]).convert("L") if "mask_image" in inputs else None
        size = params.output_size()
        strength = 1.0 if params.strength is None else params.strength
        if params.task in ("img2img", "inpaint") and init is not None and int(params.steps * strength) < 1:
            # no denoising step at all: the real engine answers with the input itself (then upscales it)
            return [init.resize(size, Image.Resampling.LANCZOS) for _ in params.seeds]
        self._touch(params.model_id, params.vae)
        if params.task == "text2img" and params.model_id in self.sdxl_models:
            for variant, asked in (("panorama", params.panorama), ("self attention", params.self_attention)):
                if asked:
                    raise Unsupported(f"{variant} is not available for SDXL models like {params.model_id}")
        if params.task == "controlnet":
            for net in params.controlnets:
                self._touch(net.model_id, net.preprocessor if params.auto_hint else None)
        self._check_clip_skip(params.model_id, params.clip_skip)
        images = []
        for seed in params.seeds:
            image = Image.new("RGB", (params.width, params.height), colour(seed))
            if mask is not None and init is not None:
                image = composite_inpaint(image, init, mask)
            if image.size != size:
                image = image.resize(size, Image.Resampling.LANCZOS)
            images.append(image)
        return images

    @staticmethod
    def _cut_out(image: Image.Image, params: BackgroundParams) -> Image.Image:
        mask = image.convert("L")
        if params.post_process_mask:
            mask = mask.point(lambda v: 255 if v >= 128 else 0)
        if params.inverse_mask:
            mask = ImageOps.invert(mask)
        if params.only_mask:
            return mask
        cutout = image.convert("RGBA")
        cutout.putalpha(mask)
        return cutout

    def _video(self, params: VideoParams) -> bytes:
        self._touch(params.model_id, params.motion_adapter)
        self._check_clip_skip(params.model_id, params.clip_skip)
        if params.model_id in self.sdxl_models:
            raise Unsupported(f"text2video runs on Stable Diffusion 1.x models; {params.model_id} is SDXL")
        if params.model_id in self.inpaint_models:
            raise Unsupported(f"text2video needs a text2img model; {params.model_id} is an inpainting model")
        if not 1 <= params.num_frames <= self.max_frames:
            raise DoesNotFit(
                f"num_frames must be between 1 and {self.max_frames} for this motion adapter, not {params.num_frames}"
            )
        if params.width % 8 or params.height % 8:
            raise DoesNotFit(f"width and height must be multiples of 8, not {params.width}x{params.height}")
        size = (params.upscale.width, params.upscale.height) if params.upscale else (params.width, params.height)
        frames = [Image.new("RGB", size, colour(params.seed + i)) for i in range(params.num_frames)]
        return encode_video(frames, params.fps, params.output_type)

    def _check_clip_skip(self, model_id: str, wire_value: int | None) -> None:
        skip = wire_value - 1 if wire_value and wire_value > 1 else None  # A1111's count -> layers skipped
        if skip is not None and skip >= self.clip_layers:
            raise DoesNotFit(
                f"clip_skip {wire_value} is too large for model {model_id} ({self.clip_layers} CLIP layers)"
            )

    def _touch(self, *model_ids: str | None) -> None:
        with self._lock:
            for model_id in model_ids:
                if model_id:
                    self._loaded.pop(model_id, None)
                    self._loaded[model_id] = None


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image
