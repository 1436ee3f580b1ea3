"""One request model per endpoint of spec section 3 (plus clear_queue, reset_s3,
load_model_v2 and sync_models), with the union of the fields of every doc generation.

Fields a client may send but that mean nothing here (`loadbalancer`, `deploy_type`, ...) are
still declared where the docs list them, so `/docs` shows them; unknown fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from models.fields import (
    CanvasDimension,
    CsvList,
    Dimension,
    FloatList,
    ImageList,
    JobId,
    ListOf,
    LooseFloat,
    LooseInt,
    OneOf,
    Text,
    YesNo,
    is_unset,
)
from models.schedulers import ALGORITHM_WIRE_VALUES, FLOW_MATCHING, SUPPORTED

SafetyCheckerType = Literal["sensitive_content_text", "blur", "pixelate", "black"]
# the names schedulers_list gives (any letter case); the unsupported ones are refused with the reason
Scheduler = OneOf(SUPPORTED + FLOW_MATCHING)
DEFAULT_SIZE = 512  # width and height of a generation or video that gives neither (and has no init image)


class WireModel(BaseModel):
    """Base of every request: unknown fields ignored; `null` and blank strings mean unset."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    key: str | None = Field(None, description="Enterprise API key (or send `Authorization: Bearer <key>`).")

    @model_validator(mode="before")
    @classmethod
    def _drop_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not is_unset(v)}
        return data


class KeyOnlyRequest(WireModel):
    """system_details, restart_server, update_server, clear_cache, clear_queue, schedulers_list,
    get_all_models, queue: the key is the whole body."""


# --------------------------------------------------------------------------- how a job is run and followed

WEBHOOK_EVENTS = ("queued", "started", "progress", "completed")
MIN_DEADLINE, MAX_DEADLINE = 1, 7 * 24 * 3600  # deadline_seconds (and the Cancel-After header), in seconds


class JobOptions(WireModel):
    """Ours, on every job endpoint (ModelsLab's clients send none of them and see no change)."""

    priority: Literal["high", "normal", "low"] = Field(
        "normal", description="Start order among queued jobs (round-robin across keys within a priority); "
        "`high` needs an admin key.")
    deadline_seconds: LooseFloat(MIN_DEADLINE, MAX_DEADLINE) | None = Field(
        None, description="Past this many seconds after submission the job ends as cancelled (also the "
        "`Cancel-After` header).")
    webhook_events: ListOf(WEBHOOK_EVENTS) | None = Field(
        None, description="Comma list of queued, started, progress, completed: what `webhook` receives, each "
        "with an `event` field. Default: completed only, without the field (ModelsLab's payload).")
    preview: YesNo = Field(False, description="Link a small JPEG of the current latents as `progress.preview`.")
    idempotency_key: Text | None = Field(
        None, max_length=255, description="Also the `Idempotency-Key` header: the same key and body from the same "
        "API key within 24 h return the first job instead of making a new one.")

    @field_validator("webhook_events")
    @classmethod
    def _known_events(cls, events: list[str] | None) -> list[str] | None:
        if events is None:
            return None
        unknown = [event for event in events if event not in WEBHOOK_EVENTS]
        if unknown:
            raise ValueError(f"unknown webhook event {', '.join(unknown)}: use {', '.join(WEBHOOK_EVENTS)}")
        return list(dict.fromkeys(events))


# --------------------------------------------------------------------------- generation


class GenerationRequest(JobOptions):
    """Fields shared by text2img, img2img, inpaint and controlnet."""

    model_id: Text | None = Field(None, description="Model id; defaults to the server's default model.")
    prompt: Text
    negative_prompt: Text | None = None
    width: Dimension | None = Field(
        None, description=f"1..1024, rounded down to a multiple of 8. Default: the init image's, else {DEFAULT_SIZE}."
    )
    height: Dimension | None = Field(
        None, description=f"1..1024, rounded down to a multiple of 8. Default: the init image's, else {DEFAULT_SIZE}."
    )
    samples: LooseInt(1, 4) = 1
    num_inference_steps: LooseInt(1, 50) = Field(
        20, validation_alias=AliasChoices("num_inference_steps", "steps"), description="Alias: `steps`."
    )
    guidance_scale: LooseFloat(1, 20) = 7.5
    seed: LooseInt(0, 2**32 - 1) | None = Field(None, description="null -> random; echoed in meta.seed.")
    scheduler: Scheduler | None = Field(None, description="See schedulers_list; default: the model's own.")
    use_karras_sigmas: YesNo = True
    algorithm_type: OneOf(ALGORITHM_WIRE_VALUES, blanks=True) = Field(
        "none", description="none | dpmsolver+++ | dpmsolver++ | sde-dpmsolver++")
    enhance_prompt: YesNo = True
    safety_checker: YesNo | None = Field(
        None, description="Run the NSFW safety checker; default: the server's setting (yes unless changed)."
    )
    safety_checker_type: SafetyCheckerType = "sensitive_content_text"
    clip_skip: LooseInt(1, 8) | None = None
    tomesd: YesNo = True
    vae: Text | None = Field(None, description="A VAE loaded with load_vae; default: the model's own.")
    lora_model: CsvList | None = Field(None, description="LoRA ids, comma-separated.")
    lora_strength: FloatList(0.1, 1) | None = Field(
        None, description="One strength for all LoRAs or one per LoRA, comma-separated. Default 1."
    )
    embeddings_model: Text | None = Field(
        None, description="A textual-inversion embedding id; write the id in the prompt where it should act."
    )
    multi_lingual: YesNo = False
    panorama: YesNo = False
    self_attention: YesNo = False
    upscale: YesNo = Field(False, description="Upscale the result 2x with the server's upscaler.")
    highres_fix: YesNo = Field(
        False, description="Generate, enlarge (2x by default) and refine in a second img2img pass at the larger size."
    )
    base64: YesNo = Field(
        False, description="Outputs are stored as text files holding the base64 of the PNG (links end in .base64)."
    )
    temp: YesNo = Field(False, description="Outputs are deleted after 24 hours (the links stop working).")
    instant_response: YesNo = Field(False, description="Answer `processing` at once instead of waiting.")
    loadbalancer: YesNo = Field(False, description="Accepted and ignored: Modal autoscaling balances load.")
    ip_adapter_id: Text | None = None
    ip_adapter_scale: LooseFloat(0, 1) | None = None
    ip_adapter_image: Text | None = None
    webhook: Text | None = None
    track_id: Text | None = None


class Text2ImgRequest(GenerationRequest):
    pass


class Img2ImgRequest(GenerationRequest):
    init_image: Text = Field(description="URL, base64 string or data URI of the starting image.")
    strength: LooseFloat(0, 1) = 0.7
    init_image_2: Text | None = Field(
        None, description="Flux Kontext models: a second image to combine with init_image (the two are placed side by "
        "side and edited as one picture, as the prompt says).")
    reference_images: ImageList | None = Field(
        None, description="Flux.2 and Qwen-Image-Edit-2509 models: more reference images after init_image (and "
        "init_image_2), each a URL, base64 string or data URI; Flux.2 dev takes 10 images in all, Klein 4, "
        "Qwen-Image-Edit-2509 3. The family routes and qwen_edit send them as an `init_image` list.")


class InpaintRequest(Img2ImgRequest):
    mask_image: Text = Field(description="URL/base64 of the mask: white = repaint, black = keep.")


class ControlnetRequest(GenerationRequest):
    prompt: Text | None = None
    controlnet_model: CsvList = Field(description="ControlNet id, or several comma-separated (multi-ControlNet).")
    controlnet_type: CsvList | None = Field(
        None, description="Preprocessor type per ControlNet (canny, depth, ...); default: the ControlNet's id."
    )
    controlnet_conditioning_scale: FloatList(0, 20) = Field(
        default_factory=lambda: [1.0], description="One scale for all ControlNets or one per ControlNet."
    )
    auto_hint: YesNo = False
    guess_mode: YesNo = False
    init_image: Text | None = Field(None, description="Source image (img2img ControlNet); the hint if no control_image.")
    control_image: ImageList | None = Field(
        None, description="The hint image, or a JSON list with one hint per ControlNet."
    )
    mask_image: Text | None = Field(None, description="With init_image: ControlNet inpainting (white = repaint).")
    strength: LooseFloat(0, 1) = 0.7


class Text2VideoRequest(JobOptions):
    """G1 `/enterprise/text2video` fields plus the G3 `video/text2video` ones. The video is made by
    AnimateDiff: a motion adapter (`motion_module`) on an SD 1.x model (`model_id`)."""

    model_id: Text | None = Field(None, description="An SD 1.x model id; defaults to the server's default model.")
    motion_module: Text | None = Field(
        None, description="A motion adapter (model_category motion_adapter); default: the server's."
    )
    prompt: Text
    negative_prompt: Text | None = None
    width: Dimension | None = Field(None, description=f"Default {DEFAULT_SIZE}.")
    height: Dimension | None = Field(None, description=f"Default {DEFAULT_SIZE}.")
    num_frames: LooseInt(1, 25) = 16
    fps: LooseInt(1, 16) = 8
    output_type: Literal["mp4", "gif"] = "mp4"
    num_inference_steps: LooseInt(1, 50) = Field(20, validation_alias=AliasChoices("num_inference_steps", "steps"))
    guidance_scale: LooseFloat(0, 20) = 7.5
    strength: LooseFloat(0, 1) | None = None
    seed: LooseInt(0, 2**32 - 1) | None = None
    scheduler: Scheduler | None = None
    clip_skip: LooseInt(1, 8) | None = None
    enhance_prompt: YesNo = True
    upscale_height: Dimension | None = Field(
        None, description="With upscale_width (either one keeps the aspect): the size of the upscaling pass, at least "
        "the video's, ≤ 1024; unset: no upscaling pass.")
    upscale_width: Dimension | None = None
    upscale_strength: LooseFloat(0, 1) | None = Field(None, description="How much the pass repaints (default 0.5).")
    upscale_guidance_scale: LooseFloat(0, 20) | None = Field(None, description="Default: guidance_scale.")
    upscale_num_inference_steps: LooseInt(1, 50) | None = Field(None, description="Default 20.")
    use_improved_sampling: YesNo = False
    improved_sampling_seed: LooseInt() | None = None
    instant_response: YesNo = False
    temp: YesNo = False
    loadbalancer: YesNo = False
    webhook: Text | None = None
    track_id: Text | None = None


class Img2VideoRequest(JobOptions):
    """enterprise `video/img2video` (§8.1), v6 `video/img2video`, v7 `video-fusion/image-to-video`: the
    image animated by the image-to-video model (Stable Video Diffusion). There is no text input."""

    model_id: Text | None = Field(
        None, description="An image_to_video model id; unset or ModelsLab's `svd`: the server's default.")
    init_image: Text = Field(description="URL, base64 string or data URI of the first frame.")
    width: Dimension = Field(DEFAULT_SIZE, description="1..1024, rounded down to a multiple of 8.")
    height: Dimension = Field(DEFAULT_SIZE, description="1..1024, rounded down to a multiple of 8.")
    num_frames: LooseInt(1, 25) = 16
    fps: LooseInt(1, 16) = Field(8, description="The video's frame rate, and SVD's fps conditioning.")
    num_inference_steps: LooseInt(1, 50) = Field(20, validation_alias=AliasChoices("num_inference_steps", "steps"))
    min_guidance_scale: LooseFloat(0, 8) = Field(1.0, description="The first frame's guidance (it rises to the last's).")
    max_guidance_scale: LooseFloat(0, 8) = Field(3.0, description="The last frame's guidance.")
    motion_bucket_id: LooseInt(0, 255) = Field(127, description="More motion when higher.")
    noise_aug_strength: LooseFloat(0, 1) = Field(
        0.02, description="Noise added to the image's conditioning: higher strays further from the image.")
    latent_interpolation_method: Literal["lerp"] = Field(
        "lerp", description="Only `lerp`: SVD denoises every frame's latents together, interpolating none.")
    output_type: Literal["mp4", "gif"] = "mp4"
    seed: LooseInt(0, 2**32 - 1) | None = None
    negative_prompt: Text | None = Field(None, description="Accepted; SVD takes no text, so it has no effect.")
    prompt: Text | None = Field(None, description="Accepted (v7 sends one); SVD takes no text, so it has no effect.")
    enhance_prompt: YesNo = False
    clip_skip: LooseInt(1, 8) | None = Field(None, description="Accepted; SVD has no text encoder, no effect.")
    instant_response: YesNo = False
    temp: YesNo = False
    base64: YesNo = False
    webhook: Text | None = None
    track_id: Text | None = None


# --------------------------------------------------------------------------- image editing (spec §4.2-§4.4, §7)

OUTPAINT_MAX_OVERLAP = 42


class OutpaintRequest(JobOptions):
    """outpaint: `image` placed in the middle of a `width` x `height` canvas (scaled down to fit, never
    up), the border around it painted by an inpainting model."""

    model_id: Text | None = Field(
        None, description="An inpainting model (any model inpaint takes); default: the server's default inpainting model.")
    prompt: Text = Field("high quality", description="What the new border shows.")
    negative_prompt: Text = "low quality"
    image: Text = Field(description="URL, base64 string or data URI of the image to extend.")
    width: CanvasDimension = Field(1280, description="The canvas width: 1..1440, rounded down to a multiple of 8.")
    height: CanvasDimension = Field(720, description="The canvas height: 1..1440, rounded down to a multiple of 8.")
    overlap_width: LooseInt(0, OUTPAINT_MAX_OVERLAP) = Field(
        10, description="Pixels inside the image's edges (where a border meets it) repainted with the border, so "
        "the seam is painted over.")
    num_inference_steps: LooseInt(1, 30) = Field(
        10, validation_alias=AliasChoices("num_inference_steps", "steps"), description="Alias: `steps`.")
    guidance_scale: LooseFloat(1, 20) = 8.0
    seed: LooseInt(0, 2**32 - 1) | None = Field(None, description="null -> random; echoed in meta.seed.")
    temp: YesNo = Field(True, description="Outputs are deleted after 24 hours (outpaint's default: yes).")
    base64: YesNo = False
    instant_response: YesNo = Field(False, description="Answer `processing` at once instead of waiting.")
    webhook: Text | None = None
    track_id: Text | None = None


class MagicMixRequest(JobOptions):
    """magic_mix (MagicMix, spec §7): the layout of `image` with the content of `prompt`, on an SD 1.x /
    2.x model: the image noised to the kmax point of the schedule, denoised on the prompt while mixed
    with its own noised latents down to kmin, then on the prompt alone."""

    model_id: Text | None = Field(None, description="An SD 1.x / 2.x model; default: the server's default model.")
    prompt: Text = Field(description="The content to mix into the image's layout.")
    negative_prompt: Text | None = None
    image: Text = Field(validation_alias=AliasChoices("image", "init_image"),
                        description="URL, base64 string or data URI of the layout image (alias: `init_image`).")
    width: Dimension = Field(768, description="1..1024, rounded down to a multiple of 8; the image is fitted to it.")
    height: Dimension = Field(768, description="1..1024, rounded down to a multiple of 8.")
    kmin: LooseFloat(0, 1) = Field(0.3, description="Where (of the schedule, from its end) the layout mixing stops.")
    kmax: LooseFloat(0, 1) = Field(0.5, description="Where the denoising starts: more keeps less of the image.")
    mix_factor: LooseFloat(0, 1) = Field(0.5, description="The share of the prompt's latents in each mixed step.")
    steps: LooseInt(1, 50) = Field(20, validation_alias=AliasChoices("steps", "num_inference_steps"),
                                   description="The schedule's steps (alias: `num_inference_steps`).")
    guidance_scale: LooseFloat(1, 20) = 7.5
    samples: LooseInt(1, 1) = Field(1, description="One image per job (the docs' maximum).")
    seed: LooseInt(0, 2**32 - 1) | None = Field(None, description="null -> random; echoed in meta.seed.")
    safety_checker: YesNo | None = Field(
        None, description="Run the NSFW safety checker; default: the server's setting (yes unless changed).")
    safety_checker_type: SafetyCheckerType = "sensitive_content_text"
    base64: YesNo = False
    temp: YesNo = False
    instant_response: YesNo = Field(False, description="Answer `processing` at once instead of waiting.")
    webhook: Text | None = None
    track_id: Text | None = None


class EditingJobOptions(JobOptions):
    """The output and delivery fields of the image_editing jobs that take an `init_image`."""

    init_image: Text = Field(description="URL, base64 string or data URI of the image.")
    base64: YesNo = False
    temp: YesNo = False
    instant_response: YesNo = Field(False, description="Answer `processing` at once instead of waiting.")
    webhook: Text | None = None
    track_id: Text | None = None


class ObjectRemovalRequest(EditingJobOptions):
    """object_removal: the white area of mask_image repainted by the default inpainting model with an
    empty prompt (this server has no dedicated removal network)."""

    mask_image: Text = Field(description="URL/base64 of the mask: white = the object to remove, black = keep.")
    seed: LooseInt(0, 2**32 - 1) | None = Field(None, description="null -> random; echoed in meta.seed.")


class MaskCreatorRequest(EditingJobOptions):
    """mask_creator: a mask of the object `specific_object` names in `init_image`, by the text-prompted
    segmentation model (setting mask_model_id)."""

    specific_object: Text = Field(description="What to mask, in words (\"the ball\").")
    threshold: LooseFloat(0, 1) = Field(0.4, description="How sure the model must be that a pixel is the object (0-1).")


MAX_ERODE_SIZE = 32  # alpha matting's erosion square: its cost grows with the square of its side


class RemoveBgMaskRequest(JobOptions):
    """removebg_mask: `image` with its background removed by the background remover (setting
    background_model_id, U²-Net through rembg): a PNG with transparency, or with `only_mask` the
    mask. The same body on v6 and the enterprise family (v6's `inverse_mask` and `base64` too)."""

    image: Text = Field(validation_alias=AliasChoices("image", "init_image"),
                        description="URL, base64 string or data URI of the image. Alias: `init_image`.")
    alpha_matting: YesNo = Field(False, description="Refine the cut-out's edges by alpha matting (hair, fur, soft "
                                 "edges); slower.")
    alpha_matting_foreground_threshold: LooseInt(0, 255) = Field(
        240, description="With alpha_matting: mask values above it are surely the subject (0-255).")
    alpha_matting_background_threshold: LooseInt(0, 255) = Field(
        20, description="With alpha_matting: mask values below it are surely background (0-255; less than the "
        "foreground threshold).")
    alpha_matting_erode_size: LooseInt(0, MAX_ERODE_SIZE) = Field(
        5, description=f"With alpha_matting: pixels (0-{MAX_ERODE_SIZE}) the sure areas are eroded by before the "
        "edge between them is solved.")
    post_process_mask: YesNo = Field(False, description="Smooth the mask (morphological opening, blur, threshold).")
    only_mask: YesNo = Field(False, description="Answer the mask (white = the subject) instead of the cut-out.")
    inverse_mask: YesNo = Field(False, description="Invert the mask (white = the background): the cut-out keeps the "
                                "background.")
    seed: LooseInt(0, 2**32 - 1) | None = Field(None, description="Accepted and echoed; the removal is deterministic.")
    base64: YesNo = False
    temp: YesNo = False
    instant_response: YesNo = Field(False, description="Answer `processing` at once instead of waiting.")
    webhook: Text | None = None
    track_id: Text | None = None


# --------------------------------------------------------------------------- media


class SuperResolutionRequest(JobOptions):
    url: Text = Field(validation_alias=AliasChoices("url", "init_image"),
                      description="URL (or base64) of the image to upscale. Alias: `init_image` (v6, the families).")
    scale: LooseFloat(1, 4) = Field(4, description="1..4; the network's own scale is resampled to this one.")
    model_id: Text = Field(
        "realesr-general-x4v3",
        description="RealESRGAN_x4plus, RealESRNet_x4plus, RealESRGAN_x4plus_anime_6B, RealESRGAN_x2plus, "
        "realesr-general-x4v3, ultra_resolution, or any upscaler loaded with load_model_v2.",
    )
    face_enhance: YesNo = Field(False, description="Restore faces with the face restoration model (GFPGAN).")
    base64: YesNo = False
    temp: YesNo = False
    instant_response: YesNo = False
    webhook: Text | None = None
    track_id: Text | None = None


class UploadImageRequest(WireModel):
    base64_image: Text = Field(description="Raw base64 or a data: URI.")
    image_type: Literal["png", "jpeg", "jpg"] = Field(description="The type of the image; the bytes must match it.")
    deploy_type: Text | None = Field(None, description="Accepted and ignored.")


class NsfwImageCheckRequest(WireModel):
    init_image: Text = Field(description="URL or base64 of the image to classify.")


class FetchRequest(WireModel):
    request_id: JobId = Field(
        validation_alias=AliasChoices("request_id", "id"), description="The `id` of a generation response."
    )


class CancelRequest(FetchRequest):
    """cancel (also `cancel/{id}`): stop a queued or running job of this key."""


class StreamRequest(FetchRequest):
    """stream/{id}: the job's progress as server-sent events (GET or POST)."""


# --------------------------------------------------------------------------- model catalog


ModelType = Literal["huggingface", "api_trained", "custom_ckpt", "lora", "controlnet", "embeddings", "vae"]


class LoadModelRequest(WireModel):
    url: Text = Field(
        description="Hugging Face repo id (owner/name), an http(s) URL to a .safetensors/.ckpt/.pt/.bin file, "
        "or (local mode) a file or folder path."
    )
    model_id: Text | None = Field(
        None, description="Id to register. Optional only for ControlNet 1.1 repos, which have conventional ids."
    )
    model_type: ModelType = Field(
        "huggingface", description="huggingface / api_trained / custom_ckpt = a Stable Diffusion model (family detected)."
    )
    from_safetensors: YesNo = Field(False, description="Accepted; the file format is detected from the file.")
    revision: Literal["fp16", "fp32"] | None = Field(
        None, description="Precision the weights are stored in; default: the server's SDAPI_STORE_PRECISION (auto: fp16 "
        "on a GPU machine, fp32 on a CPU-only one)."
    )
    upcast_attention: YesNo = Field(False, description="Compute attention in fp32 (SD 2.1 checkpoints).")
    base_model: Text | None = Field(
        None, description="Flux.1 / SD3 single files (a transformer-only .safetensors as BFL and CivitAI publish them): "
        "the model_id of a loaded model of the same family whose text encoders, tokenizers, VAE and scheduler the file "
        "lacks. Default: the first loaded model of that family.")
    webhook: Text | None = Field(None, description="Receives the outcome when the load ends.")


ModelCategory = Literal[
    "stable_diffusion", "stable_diffusion_xl", "inpaint", "flux", "flux_kontext", "flux_fill", "sd3", "qwen", "qwen_edit", "zimage", "flux2", "flux2_klein", "lora", "controlnet", "embeddings", "vae", "preprocessor",
    "upscaler", "face_restorer", "motion_adapter", "translator", "ip_adapter", "segmenter", "image_to_video",
    "object_remover", "background_remover",
]


class LoadModelV2Request(WireModel):
    # one of the two is needed: the schema says so (a null or blank one is unset, so it does not count)
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["model_category"], "properties": {"model_category": {"type": "string"}}},
        {"required": ["model_type"], "properties": {"model_type": {"type": "string"}}},
    ]})

    url: Text
    model_id: Text
    model_category: ModelCategory | None = Field(
        None, description="What the model is. Examples in ModelsLab's docs send v1's `model_type` instead: "
        "either is enough (model_category wins).")
    model_type: ModelType | None = Field(None, description="load_model's field, read as load_model reads it.")
    model_format: Literal["ckpt", "safetensors", "pt", "pth", "bin", "onnx", "diffusers", "archive"] | None = Field(
        None, description="Accepted as a hint; the format is detected from the file (archive: a sync_models .tar)."
    )

    @model_validator(mode="after")
    def _category_or_type(self) -> LoadModelV2Request:
        if self.model_category is None and self.model_type is None:
            raise ValueError("needs model_category (or load_model's model_type): what the model is")
        return self
    revision: Literal["fp16", "fp32"] | None = None  # None: the server's store_precision
    upcast_attention: YesNo = False
    base_model: Text | None = Field(
        None, description="Flux.1 / SD3 single files (a transformer-only .safetensors as BFL and CivitAI publish them): "
        "the model_id of a loaded model of the same family whose text encoders, tokenizers, VAE and scheduler the file "
        "lacks. Default: the first loaded model of that family.")
    webhook: Text | None = None


class LoadVaeRequest(WireModel):
    vae_id: Text
    vae_url: Text = Field(description="Hugging Face repo id, an http(s) URL to a VAE file, or (local mode) a path.")
    vae_type: Literal["diffusers", "safetensors", "pt", "ckpt", "bin"] = "diffusers"
    revision: Literal["fp16", "fp32"] | None = None  # None: the server's store_precision
    webhook: Text | None = None


class ModelIdRequest(WireModel):
    """verify_model and delete_model."""

    model_id: Text


class SyncModelsRequest(WireModel):
    sync_key: Text = Field(description="Enterprise key of the deployment to copy the models to.")
    sync_url: Text | None = Field(
        None, description="Base URL of that deployment (default: the server's SDAPI_SYNC_URL setting)."
    )


# --------------------------------------------------------------------------- server admin

DeployType = Text


class UpdateS3Request(WireModel):
    public_url: Text = Field(description="Public prefix objects are read under, e.g. https://cdn.example/.")
    region_name: Text
    endpoint_url: Text = Field(
        description="S3 endpoint; virtual-hosted (https://<bucket>.s3.amazonaws.com) or with the bucket as its path."
    )
    aws_access_key_id: Text
    aws_secret_access_key: Text = Field(description="Stored, never returned or logged.")
    image_directory: Text = Field(description="Key prefix (folder) inside the bucket, e.g. generations.")
    bucket: Text | None = Field(None, description="The bucket (ours); default: read from endpoint_url.")
    deploy_type: DeployType = "text_to_image"


class UsageRequest(WireModel):
    """Ours: per-key usage for billing (admin keys)."""

    start_date: Text | None = Field(None, description="First UTC day, YYYY-MM-DD (default: the 1st of this month).")
    end_date: Text | None = Field(None, description="Last UTC day, YYYY-MM-DD (default: today).")
    api_key: Text | None = Field(None, description="Only this API key's usage (the key itself; never echoed).")
    key_id: Text | None = Field(None, description="Only this key id's usage (as listed in an earlier answer).")
    by_day: YesNo = Field(False, description="Also break each key's usage down by day.")


class ResetS3Request(WireModel):
    deploy_type: DeployType = "text_to_image"


# --------------------------------------------------------------------------- v7's own fields
# The v7 routes (infra/web/generations.py) take v1's bodies plus these: a v7 body is validated
# with its model (what the OpenAPI document shows for the route), then translated onto v1's fields
# and validated as v1's.

ASPECT_RATIO_PATTERN = r"^[ \t\r\n]*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+):(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t\r\n]*$"


def _one_image(value: Any) -> Any:
    if isinstance(value, list) and len(value) != 1:
        raise ValueError(f"takes one image (a string, or a list of one), got a list of {len(value)}")
    if not isinstance(value, (str, list)) or (isinstance(value, list) and not isinstance(value[0], str)):
        raise ValueError("must be an image: a URL, base64 or data URI string, or a list of one")
    return value


# v7 sends reference images as lists: this server takes one
OneImage = Annotated[Any, BeforeValidator(_one_image), WithJsonSchema({"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {"type": "string", "pattern": r"[^ \t\r\n]"}, "minItems": 1, "maxItems": 1}]})]


def _aspect_ratio():
    return Field(None, pattern=ASPECT_RATIO_PATTERN, description="`16:9`, `1:1`, `1920:1080`...: the size (long side "
                 "1024) when width and height are not sent.")


class V7TextToImageRequest(Text2ImgRequest):
    aspect_ratio: str | None = _aspect_ratio()


class V7ImageToImageRequest(Img2ImgRequest):
    init_image: OneImage = Field(description="URL, base64 or data URI of the starting image, or a list of one.")
    aspect_ratio: str | None = _aspect_ratio()


class V7InpaintRequest(InpaintRequest):
    init_image: OneImage = Field(description="URL, base64 or data URI of the image to repaint, or a list of one.")
    aspect_ratio: str | None = _aspect_ratio()


class V7TextToVideoRequest(Text2VideoRequest):
    aspect_ratio: str | None = _aspect_ratio()
    duration: LooseFloat(0, 3600) | None = Field(
        None, description="Seconds; × fps (default 8) gives num_frames (at most 25). num_frames, when sent, wins.")


class V7ImageToVideoRequest(Img2VideoRequest):
    init_image: OneImage = Field(description="URL, base64 or data URI of the first frame, or a list of one.")
    aspect_ratio: str | None = _aspect_ratio()
    duration: LooseFloat(0, 3600) | None = Field(
        None, description="Seconds; × fps (default 8) gives num_frames (at most 25). num_frames, when sent, wins.")
