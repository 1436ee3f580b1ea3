"""The job contract: what crosses the queue from a handler to the engine, as typed, frozen data.

A handler resolves everything a request leaves open (model id, size, seeds, scheduler, which
LoRAs at which strength, the second passes) and builds one of these once; nothing changes it
afterwards, and the engine reads it as it is: it applies no defaults of its own. The defaults
here only mean "this feature is off". Where a job's outputs go, when they expire and which models
it waits for belong to the job record (`infra.jobs.job.Job`), not to its parameters.

    GenerationParams   text2img, img2img, inpaint, controlnet (`task`), with nested Lora,
                       ControlNetSpec, HighresFix, Upscale and SafetyCheck
    VideoParams        text2video (AnimateDiff)
    ImageVideoParams   img2video (Stable Video Diffusion)
    UpscaleParams      super_resolution
    MaskParams         mask_creator
    RemovalParams      object_removal by a LaMa-class network
    MagicMixParams     magic_mix
    BackgroundParams   removebg_mask, with nested AlphaMatting

`JobParams` is the union, told apart by `kind`; a job record stores `params.model_dump()`.
`work_units()` (what a job's run time is proportional to), `total_steps()` (the steps its progress
counts: every denoising step of every image and pass, plus one per upscaled image) and
`models_used()` (what delete_model must not delete while the job is queued) are methods. Imports
nothing of ours.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Task = Literal["text2img", "img2img", "inpaint", "controlnet"]
SafetyTreatment = Literal["sensitive_content_text", "blur", "pixelate", "black"]


class Contract(BaseModel):
    """Frozen, no unknown fields: a typo in a field name fails where the job is built."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Lora(Contract):
    model_id: str
    strength: float = 1.0


class ControlNetSpec(Contract):
    model_id: str
    type: str = Field(description="The hint kind (canny, depth, ...): what auto_hint makes of the image.")
    scale: float = 1.0
    preprocessor: str | None = Field(None, description="Store id of the network auto_hint runs for this kind.")


class HighresFix(Contract):
    """The second pass: the first image enlarged to this size and refined by img2img."""

    width: int
    height: int
    strength: float


class Upscale(Contract):
    model_id: str
    scale: int = 2


class IpAdapter(Contract):
    """An IP-Adapter (catalog category ip_adapter) steering the job by its `ip_adapter_image` input."""

    model_id: str
    scale: float = 0.6


class Translation(Contract):
    """multi_lingual: the job's texts found in another language than English, which the translator
    model turns into English before the job runs (English text never goes through it)."""

    model_id: str
    fields: tuple[Literal["prompt", "negative_prompt"], ...] = Field(min_length=1)


class SafetyCheck(Contract):
    type: SafetyTreatment
    threshold: float


class GenerationParams(Contract):
    kind: Literal["generation"] = "generation"
    denoises: ClassVar[bool] = True  # its run time tells the speed of denoising (the dispatcher's estimate)

    task: Task
    model_id: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    seeds: tuple[int, ...] = Field(min_length=1, description="One per image: image i is rendered from seeds[i].")
    steps: int
    guidance_scale: float
    scheduler: str | None = Field(description="A diffusers scheduler class name; None: the model's own (a model "
                                  "still to be loaded when the job was made).")
    use_karras_sigmas: bool
    algorithm: str | None = Field(description="The diffusers algorithm_type, or None for the scheduler's own.")
    clip_skip: int | None = Field(description="The wire value (1 = no skip, A1111's count).")
    tomesd: bool
    strength: float | None = Field(None, description="How much of the init image is redone; None: from noise.")
    loras: tuple[Lora, ...] = ()
    embedding: str | None = None
    vae: str | None = None
    panorama: bool = False
    self_attention: bool = False
    controlnets: tuple[ControlNetSpec, ...] = ()
    auto_hint: bool = False
    guess_mode: bool = False
    highres_fix: HighresFix | None = None
    upscale: Upscale | None = None
    safety_checker: SafetyCheck | None = None
    base64: bool = False
    translation: Translation | None = None
    ip_adapter: IpAdapter | None = None

    @property
    def samples(self) -> int:
        return len(self.seeds)

    def output_size(self) -> tuple[int, int]:
        """The size of the stored images: after highres_fix, then upscale."""
        width, height = (self.highres_fix.width, self.highres_fix.height) if self.highres_fix else (self.width, self.height)
        if self.upscale:
            width, height = width * self.upscale.scale, height * self.upscale.scale
        return width, height

    def first_pass_steps(self) -> int:
        """Denoising steps of one image's first pass: all of them from noise, diffusers' share of
        them (`int(steps * strength)`) from an init image; 0 when that share is none (the input
        is the answer)."""
        if self.strength is None:
            return self.steps
        return min(int(self.steps * self.strength), self.steps)

    def second_pass_steps(self) -> int:
        """Denoising steps of one image's highres_fix pass (0 without one)."""
        if not self.highres_fix or self.first_pass_steps() < 1:
            return 0
        return min(int(self.steps * self.highres_fix.strength), self.steps)

    def total_steps(self) -> int:
        """What the job's progress counts: each image's denoising steps (both passes), plus one
        step per image for the upscaler."""
        per_image = self.first_pass_steps() + self.second_pass_steps() + (1 if self.upscale else 0)
        return max(1, per_image * self.samples)

    def work_units(self) -> float:
        """Denoising steps x megapixels x images."""
        units = self.steps * (1.0 if self.strength is None else self.strength) * self.width * self.height / 1e6
        if highres := self.highres_fix:
            units += self.steps * highres.strength * highres.width * highres.height / 1e6
        return units * self.samples

    def models_used(self) -> set[str]:
        used = {self.model_id, self.vae, self.embedding, self.upscale.model_id if self.upscale else None,
                self.translation.model_id if self.translation else None,
                self.ip_adapter.model_id if self.ip_adapter else None}
        used.update(lora.model_id for lora in self.loras)
        for net in self.controlnets:
            used.update((net.model_id, net.preprocessor))
        return {model_id for model_id in used if model_id}


class VideoUpscale(Contract):
    """text2video's upscaling pass: the frames enlarged to width x height and denoised again at
    `strength` (AnimateDiff video-to-video) with these steps and guidance."""

    width: int
    height: int
    strength: float
    guidance_scale: float
    steps: int

    def steps_run(self) -> int:
        """The steps the pass runs (diffusers' video-to-video rule: steps x strength, rounded down)."""
        return min(int(self.steps * self.strength), self.steps)


class VideoOutput(Contract):
    """What every video job has: the output's size, frames, rate and format, its denoising steps and
    seed. Its cost: every frame denoised in each step."""

    denoises: ClassVar[bool] = True

    width: int
    height: int
    num_frames: int
    fps: int
    output_type: Literal["mp4", "gif"]
    steps: int
    seed: int

    @property
    def seconds(self) -> float:
        """The length of the video."""
        return self.num_frames / max(1, self.fps)

    def work_units(self) -> float:
        return self.total_steps() * self.width * self.height / 1e6 * self.num_frames

    def total_steps(self) -> int:
        """Denoising steps (every frame is denoised in each)."""
        return max(1, self.steps)


class VideoParams(VideoOutput):
    kind: Literal["video"] = "video"

    model_id: str
    motion_adapter: str
    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    scheduler: str | None  # None: the model's own
    clip_skip: int | None
    free_init_iterations: int = Field(0, description="use_improved_sampling: FreeInit's passes (0: off).")
    upscale: VideoUpscale | None = None

    def work_units(self) -> float:
        first = max(1, self.steps) * max(1, self.free_init_iterations) * self.width * self.height
        second = self.upscale.steps_run() * self.upscale.width * self.upscale.height if self.upscale else 0
        return (first + second) / 1e6 * self.num_frames

    def total_steps(self) -> int:
        """Denoising steps (every frame is denoised in each), in every FreeInit pass and the upscaling pass."""
        return max(1, self.steps) * max(1, self.free_init_iterations) + (self.upscale.steps_run() if self.upscale else 0)

    def models_used(self) -> set[str]:
        return {self.model_id, self.motion_adapter}


class ImageVideoParams(VideoOutput):
    """img2video: the job's `image` input (already width x height) animated by an image-to-video
    model (catalog category image_to_video: Stable Video Diffusion), `num_frames` frames at `fps`."""

    kind: Literal["image_video"] = "image_video"

    model_id: str
    min_guidance_scale: float = Field(description="The guidance of the first frame; it rises linearly to the last's.")
    max_guidance_scale: float
    motion_bucket_id: int = Field(description="SVD's motion conditioning: higher, more motion.")
    noise_aug_strength: float = Field(description="Noise added to the image's conditioning: higher, freer of it.")

    def models_used(self) -> set[str]:
        return {self.model_id}


class OnePassParams(Contract):
    """A job that makes one image in one pass of a network, no denoising loop (super_resolution,
    mask_creator, removebg_mask): its cost is the output's size."""

    denoises: ClassVar[bool] = False

    width: int = Field(description="The output size.")
    height: int
    base64: bool = False

    def work_units(self) -> float:
        """One step at the output size."""
        return self.width * self.height / 1e6

    def total_steps(self) -> int:
        """The pass is one step."""
        return 1


class UpscaleParams(OnePassParams):
    """super_resolution: the `image` input upscaled to width x height (the input times `scale`); the
    face restoration, when asked, is part of its one step."""

    kind: Literal["upscale"] = "upscale"

    model_id: str
    scale: float
    face_restorer: str | None = None

    def models_used(self) -> set[str]:
        return {model_id for model_id in (self.model_id, self.face_restorer) if model_id}


class MaskParams(OnePassParams):
    """mask_creator: a black-and-white mask (white = the object) of what `text` names in the job's
    `image` input (width x height: the input's size), by a text-prompted segmentation model (catalog
    category segmenter)."""

    kind: Literal["mask"] = "mask"

    model_id: str
    text: str
    threshold: float

    def models_used(self) -> set[str]:
        return {self.model_id}


class MagicMixParams(Contract):
    """magic_mix (MagicMix on an SD 1.x / 2.x model): the layout of the job's `image` input (fitted
    to width x height) with the content of `prompt`; denoised from the `kmax` point of the schedule,
    mixed (`mix_factor`) with the image's noised latents down to `kmin` (0 <= kmin <= kmax <= 1)."""

    kind: Literal["magic_mix"] = "magic_mix"
    denoises: ClassVar[bool] = True

    model_id: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int = Field(description="The schedule's steps; MagicMix runs the last kmax of them.")
    guidance_scale: float
    kmin: float
    kmax: float
    mix_factor: float
    seed: int
    scheduler: str | None = None
    safety_checker: SafetyCheck | None = None
    base64: bool = False

    def total_steps(self) -> int:
        """The denoising steps from the kmax point on (at least one)."""
        return max(1, int(self.kmax * self.steps))

    def work_units(self) -> float:
        return self.total_steps() * self.width * self.height / 1e6

    def models_used(self) -> set[str]:
        return {self.model_id}


class AlphaMatting(Contract):
    """removebg_mask's alpha matting: the mask split into a trimap (sure foreground above
    `foreground_threshold`, sure background below `background_threshold`, both eroded by an
    `erode_size` square; the rest unknown) and the alpha of the unknown band solved from the image
    (closed-form matting), the foreground colours re-estimated there."""

    foreground_threshold: int = Field(ge=0, le=255)
    background_threshold: int = Field(ge=0, le=255)
    erode_size: int = Field(ge=0)


class BackgroundParams(OnePassParams):
    """removebg_mask: the job's `image` input (width x height: the input's size) with its background
    removed by a salient-object segmentation model (catalog category background_remover, U²-Net
    through rembg): an RGBA image whose alpha is the model's mask, or with `only_mask` the mask
    itself (an "L" image, white = the subject). `post_process_mask` smooths the mask first (rembg's
    morphological opening, blur and threshold); `inverse_mask` then inverts it (white = the
    background), before the cut-out; `alpha_matting` refines the cut-out's edges from the mask."""

    kind: Literal["removebg"] = "removebg"

    model_id: str
    post_process_mask: bool = False
    inverse_mask: bool = False
    only_mask: bool = False
    alpha_matting: AlphaMatting | None = None

    def models_used(self) -> set[str]:
        return {self.model_id}


class RemovalParams(OnePassParams):
    """object_removal by a LaMa-class network (catalog category object_remover): the pixels of the
    job's `image` input under its `mask` input (white) filled in, every other pixel kept exactly
    (width x height: the input's size)."""

    kind: Literal["removal"] = "removal"

    model_id: str

    def models_used(self) -> set[str]:
        return {self.model_id}


JobParams = Annotated[GenerationParams | VideoParams | ImageVideoParams | UpscaleParams | MaskParams | RemovalParams
                      | BackgroundParams | MagicMixParams, Field(discriminator="kind")]
VIDEO_KINDS = ("video", "image_video")  # the job kinds whose output is one video (metered in seconds)
PARAMS = TypeAdapter(JobParams)  # PARAMS.validate_python(record["params"]) -> the typed params
