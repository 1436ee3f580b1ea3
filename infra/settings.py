"""Every knob of the server, in one place. Each is read from an environment variable with the
prefix `SDAPI_` (e.g. `SDAPI_PORT=9000`); the README lists them all."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_API_KEY = "enterprise_api_key"  # the key in the docs' examples; for local use only

DEFAULT_ENHANCE_SUFFIX = "highly detailed, sharp focus, professional lighting, 8k"

# Knobs a running process cannot take on: they shape what was built at start-up (the server's
# socket and folders, the worker threads, the engine's device and threads, the GPU fast path's
# compiled modules). update_server names them instead of applying them. Every other knob is read
# where it is used, each time, so update_server applies it at once.
RESTART_ONLY = ("host", "port", "data_dir", "models_dir", "workers", "device", "torch_threads", "build_tiny_models",
                "fast_path", "compile_mode", "compile_cache_dir", "text_encoder_offload", "quantization",
                "quantize_text_encoders")


class Settings(BaseSettings):
    # `.env` in the working directory too: edit it and call update_server to apply changes
    model_config = SettingsConfigDict(env_prefix="SDAPI_", env_file=".env", extra="ignore")

    # --- serving
    host: str = Field("127.0.0.1", description="Address the local server listens on.")
    port: int = Field(8000, description="Port the local server listens on.")
    public_url: str | None = Field(
        None,
        description="Base URL clients reach this server at (for output links and fetch_result); "
        "default: taken from each request's Host.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEV_API_KEY],
        description="Comma-separated API keys. Default: the development key `enterprise_api_key`.",
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated admin keys: only these may use the catalog and server endpoints "
        "(load/delete models, sync, restart/update server, update_s3/reset_s3, clear_cache/clear_queue); "
        "the SDAPI_API_KEYS then only generate. Empty: every API key is an admin key.",
    )
    rate_limit_per_minute: int = Field(0, description="Requests per minute one key may make; 0 = no limit.")
    max_jobs_per_key: int = Field(0, description="Jobs one key may have queued or running at once; 0 = no limit.")
    usage_flush_seconds: float = Field(
        2.0, description="How often per-key usage counted in memory is written to the usage store (and at stop)."
    )
    errors_with_http_200: bool = Field(
        False, description="Answer errors with HTTP 200 (status in the body only), for legacy clients."
    )
    max_body_bytes: int = Field(30 * 1024 * 1024, description="Largest accepted request body.")

    # --- storage
    data_dir: Path = Field(Path("data"), description="Jobs database, outputs and model weights live here.")
    models_dir: Path | None = Field(None, description="Where model weights live; default: <data_dir>/models.")

    # --- jobs and queue
    sync_timeout: float = Field(
        30.0, description="Seconds a generation request waits for its job before answering `processing`."
    )
    workers: int = Field(1, description="In-process worker threads running jobs.")
    initial_seconds_per_step: float = Field(
        0.05, description="ETA estimate per step per megapixel before any job was timed."
    )
    progress_seconds: float = Field(
        0.25, gt=0, le=10, description="How often a running job's progress is written (and its cancel request read)."
    )
    preview_every_steps: int = Field(
        5, ge=1, description="A `preview: yes` job's preview is redrawn every this many denoising steps."
    )
    webhook_progress_seconds: float = Field(
        5.0, ge=0, description="At most one `progress` webhook event per job this often."
    )
    modal_max_containers: int = Field(
        10, ge=1, description="On Modal: the GPU burst ceiling (the Worker class's max_containers, set where `modal "
        "deploy` runs and baked into every image). Jobs beyond it (plus the spawn-ahead) wait in the fair queue, not "
        "in Modal's first-come queue.",
    )
    modal_spawn_ahead: int = Field(
        0, ge=0, description="On Modal: jobs handed to Modal beyond the GPU ceiling, so a GPU worker that finishes "
        "finds its next job at once (0: every job waits in the fair queue until a GPU is free; more: less fair).",
    )
    stream_max_seconds: float = Field(
        600.0, gt=0, description="A stream/{id} connection ends after this long with a `reconnect` event (on Modal: "
        "below the web function's timeout)."
    )

    # --- models and generation
    default_model_id: str = Field("tiny-sd", description="Model used when a request names none.")
    default_inpaint_model_id: str = Field(
        "tiny-sd-inpaint", description="Model inpaint uses when a request names none."
    )
    family_model_ids: dict[str, str] = Field(
        default_factory=dict,
        description="The model each enterprise model-family route runs (`flux/`, `flux_kontext_dev/`, `qwen/`, ...: "
        "their requests name no model), by model category, e.g. {\"flux\": \"flux-dev\", \"flux_kontext\": "
        "\"kontext-dev\"}. A category not named here runs the first loaded model of that category.",
    )
    translator_model_id: str = Field(
        "opus-mt-mul-en",
        description="multi_lingual's translator: a model of category translator (a transformers sequence-to-sequence "
        "model into English). The default, Helsinki-NLP/opus-mt-mul-en, is fetched on first use where "
        "fetch_known_models allows it.",
    )
    mask_model_id: str = Field(
        "clipseg-rd64-refined",
        description="mask_creator's text-prompted segmentation model (category segmenter, a CLIPSeg folder). The "
        "default, CIDAS/clipseg-rd64-refined, is fetched on first use where fetch_known_models allows it.",
    )
    removal_model_id: str = Field(
        "", description="object_removal's LaMa-class inpainting network (category object_remover, a spandrel "
        "inpainting model such as big-lama, loaded with load_model_v2). Unset, or not loaded: object_removal runs "
        "the default inpainting model with an empty prompt (meta.removal_model says which ran).",
    )
    background_model_id: str = Field(
        "u2net",
        description="removebg_mask's background remover (category background_remover: a U²-Net-style ONNX file, run "
        "through rembg). The default, rembg's published u2net.onnx, is fetched on first use where fetch_known_models "
        "allows it.",
    )
    flux_inpaint_with_fill: bool = Field(
        True,
        description="Inpaint requests on a base Flux.1 model run on a loaded Flux.1 Fill model (family_model_ids' "
        "flux_fill, else the first loaded), which was trained for it, instead of the FluxInpaintPipeline on the model "
        "named; `meta.notes` says so. Not with a LoRA (it was made for the model named). false: always the model named.",
    )
    default_model_source: str | None = Field(
        None,
        description="Where the default model is loaded from (a hub repo id or a URL, as load_model's `url`) when it is "
        "not on the server yet: the first request that needs it starts the load and its job waits for it. "
        "Default: none (the local server builds its built-in model).",
    )
    default_inpaint_model_source: str | None = Field(
        None, description="The same for the default inpainting model."
    )
    placeholder_model_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["your_model_id"],
        description="Model ids from the docs' examples that mean 'the default model'.",
    )
    build_tiny_models: bool = Field(True, description="Build the tiny built-in models on first start.")
    device: str = Field("auto", description="torch device: auto | cpu | cuda.")
    torch_threads: int = Field(0, description="torch CPU threads; 0 = torch's default.")
    enhance_prompt_suffix: str = Field(
        DEFAULT_ENHANCE_SUFFIX, description="What enhance_prompt appends to a prompt that lacks it."
    )
    max_input_image_bytes: int = Field(20 * 1024 * 1024, description="Largest accepted input image file.")
    max_input_image_pixels: int = Field(4096 * 4096, description="Largest accepted input image, in pixels.")
    image_fetch_timeout: float = Field(20.0, description="Seconds to download an input image.")
    fetch_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated hosts or host:port pairs the server may fetch (images, model "
        "files, webhooks) although they resolve to a loopback, private or link-local address; "
        "every other such URL is refused. Default: none.",
    )

    # --- GPU speed (issue 9; bench/gpu.py measures each knob against plain diffusers)
    fast_path: bool = Field(
        False,
        description="GPU fast path (CUDA only; nothing changes on the CPU): channels_last (UNets, VAEs), fused QKV "
        "projections (UNets, VAEs, the Flux.1 / SD3 / Flux.2 transformers), cuDNN autotuning, torch.compile of the "
        "UNet or transformer and the VAE decoder (`compile_mode`). Outputs equal the plain fp16 / bf16 pipeline's up "
        "to floating-point noise. A model that loads a LoRA runs uncompiled.",
    )
    compile_mode: Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "reduce-overhead",
        description="torch.compile mode on the fast path: none | default | reduce-overhead (adds CUDA graphs) | "
        "max-autotune | max-autotune-no-cudagraphs. Each new batch x size compiles once.",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Persistent torch.compile cache (inductor graphs, Triton kernels, autotuning) so a new "
        "process does not recompile; on Modal a folder on the weights Volume. Default: torch's temp folder.",
    )
    batch_samples: bool = Field(
        False,
        description="Render a job's samples in one batched pass (one generator per image: the same images as "
        "one by one up to floating-point noise; inpainting draws the masked image's VAE sample from the first "
        "image's generator) instead of one pass per image. Not with ToMe.",
    )
    tomesd_mode: Literal["request", "off", "always"] = Field(
        "request",
        description="ToMe token merging (changes outputs): request (the request's `tomesd` field decides) | "
        "off (never) | always (every job). ToMe jobs run the UNet uncompiled.",
    )
    tomesd_ratio: float = Field(0.5, gt=0, le=0.75, description="Share of tokens ToMe merges (0..0.75) when it is used.")
    cfg_cutoff: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the steps (0..1] that run classifier-free guidance; the later ones run the "
        "conditional half only, about half their UNet work. 1 = all steps (off). Changes outputs.",
    )

    # --- memory on a GPU (issue 19; infra/engine/speed.py `prepare` applies them, but the model cache does not
    # call it yet: until it does, these three are read by nothing but bench/gpu.py)
    text_encoder_offload: Literal["auto", "keep", "offload"] = Field(
        "auto",
        description="Where the big text encoders (T5-XXL of Flux.1 and SD3, the LLM encoders of Qwen-Image, Z-Image "
        "and Flux.2: every text encoder that is not a CLIP) live on a GPU: keep (on the GPU) | offload (in CPU "
        "memory, streamed to the GPU layer by layer while a prompt is encoded: less GPU memory, some 0.1-1 s more per "
        "job) | auto (offload when the model's weights with them, plus activation headroom, exceed the card's memory). "
        "CLIP encoders and the UNet families' encoders always stay on the GPU. Applied when a model is loaded.",
    )
    quantization: Literal["none", "fp8", "int8", "auto"] = Field(
        "none",
        description="Weight quantization of the transformer families' transformer (torchao; changes outputs a "
        "little, bench/gpu.py measures how much): none | fp8 (float8 weights and activations, per row: GPUs of "
        "compute capability 8.9+, i.e. L4, L40S, H100, H200, B200; elsewhere int8) | int8 (int8 weight-only: any "
        "CUDA GPU, and the CPU; halves the transformer's memory) | auto (fp8 where the card has it, else int8 on "
        "CUDA, none on the CPU). UNets (SD, SDXL) are never quantized. Needs the `quant` extra (torchao).",
    )
    quantize_text_encoders: bool = Field(
        False,
        description="Quantize the big text encoders kept on the GPU too, the way `quantization` says (T5-XXL in "
        "int8: 4.8 GB instead of 9.5 GB). Off by default: prompt fidelity is worth more than the memory on most cards.",
    )

    # --- model catalog
    store_precision: Literal["auto", "fp16", "fp32"] = Field(
        "auto",
        description="Precision the weights store keeps a model in when its load request gives no `revision`. "
        "auto: fp16 where the loading machine has a CUDA GPU (half the bytes a cold start reads; GPUs run fp16), "
        "fp32 on a CPU-only machine (CPUs run fp32, and upcasting fp16 on every cold load costs more than reading "
        "twice the bytes: bench/RESULTS.md). The Modal deployment sets fp16 (its downloader has no GPU).",
    )
    allow_local_model_paths: bool = Field(
        True, description="Let load_model take a local file or folder path as `url` (local mode)."
    )
    max_model_bytes: int = Field(20 * 1024**3, description="Largest model file load_model downloads.")
    model_download_timeout: float = Field(
        120.0, description="Seconds a model download may stall before it fails."
    )
    model_cache_mb: int = Field(
        24_000, description="Memory the loaded models (pipelines, VAEs, ControlNets) may use; least recently used go first."
    )
    max_loaded_loras: int = Field(8, description="LoRA adapters kept loaded per model (least recently used go first).")
    sync_url: str | None = Field(
        None, description="Base URL of the deployment sync_models copies to when a request gives no `sync_url`."
    )
    sync_link_seconds: int = Field(
        3600, description="How long the signed archive links sync_models hands to the target stay valid."
    )

    # --- outputs
    temp_output_seconds: int = Field(
        24 * 3600, description="How long `temp: yes` outputs and upload_image uploads stay available."
    )
    cleanup_interval: float = Field(
        3600.0, description="Seconds between runs of the cache cleaner (expired outputs); 0 turns the timer off."
    )
    max_output_pixels: int = Field(
        4096 * 4096,
        description="Largest image super_resolution, upscale, highres_fix, outpaint or removebg_mask may produce, in pixels.",
    )

    # --- webhooks
    webhook_secret: str | None = Field(
        None,
        description="Secret of the webhook signature (HMAC-SHA256); default: derived from the API keys. "
        "Set it to share it with receivers.",
    )
    webhook_attempts: int = Field(5, description="Deliveries tried per webhook before it is given up.")
    webhook_backoff: float = Field(
        2.0, description="Seconds before the first webhook retry; doubled for each later one (with +-25 % jitter)."
    )
    webhook_timeout: float = Field(10.0, description="Seconds a webhook receiver has to answer one delivery.")

    # --- durable jobs
    job_attempts: int = Field(
        2, description="Times a job may be started: a job whose worker died is retried until this many starts."
    )
    job_retention_seconds: int = Field(
        7 * 24 * 3600, description="How long finished job records (fetch results) are kept."
    )

    # --- S3 storage (the bucket itself is set with update_s3)
    s3_acl: str | None = Field(None, description="ACL set on every uploaded object, e.g. public-read; none by default.")
    s3_config: str | None = Field(
        None,
        description="JSON object with update_s3's fields: the bucket outputs go to by default (e.g. set in the "
        "Modal secret). update_s3 overrides it; reset_s3 returns to it.",
    )

    # --- safety checker and nsfw_image_check
    safety_checker_default: bool = Field(
        True, description="Whether generations run the NSFW safety checker when a request does not say."
    )
    nsfw_threshold: float = Field(
        0.5, description="NSFW score (0..1) at and above which an image counts as NSFW."
    )

    # --- super resolution, upscale, highres_fix
    upscale_model_id: str = Field("RealESRGAN_x2plus", description="Upscaler `upscale: yes` uses (2x).")
    face_restorer_id: str = Field("GFPGANv1.4", description="Face restoration model `face_enhance` uses.")
    upscale_tile: int = Field(256, description="Upscalers run on tiles of this many input pixels a side.")
    upscale_tile_overlap: int = Field(16, description="Pixels each upscaler tile overlaps its neighbours by.")
    highres_fix_scale: float = Field(2.0, description="How much highres_fix enlarges the first pass.")
    highres_fix_strength: float = Field(
        0.5, description="Denoising strength of highres_fix's second pass (0..1)."
    )
    fetch_known_models: bool = Field(
        True,
        description="Download the well-known models (upscalers, face restorer, motion adapter, ModelsLab's "
        "IP-Adapter ids, translator, segmenter, ...) into the weights store on first use (off: load them with "
        "load_model_v2 first).",
    )
    hub_endpoint: str | None = Field(
        None, description="The Hugging Face hub (or a mirror of it) that repo-id sources are downloaded from; unset: "
        "huggingface_hub's own (HF_ENDPOINT, else https://huggingface.co).",
    )
    known_model_urls: dict[str, str] = Field(
        default_factory=dict,
        description='JSON object overriding where a well-known model is downloaded from, e.g. '
        '{"RealESRGAN_x2plus": "https://mirror.example/RealESRGAN_x2plus.pth"}.',
    )

    # --- text2video
    default_motion_adapter_id: str = Field(
        "tiny-motion-adapter", description="AnimateDiff motion adapter text2video uses when a request names none."
    )
    # --- img2video
    default_image_to_video_model_id: str = Field(
        "tiny-svd", description="The image-to-video model (category image_to_video, a Stable Video Diffusion folder) "
        "img2video runs when a request names none or ModelsLab's 'svd'. On Modal: stable-video-diffusion-img2vid-xt, "
        "fetched on first use (a gated repo: HF_TOKEN must be an account that accepted its licence).",
    )

    @field_validator("api_keys", "admin_api_keys", "placeholder_model_ids", "fetch_allowlist", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def weights_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"
