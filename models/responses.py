"""Response envelopes of the ModelsLab wire format (spec section 1.3).

`success` / `processing` / `failed` describe a job, `error` a rejected request. The API layer
serialises them with `exclude_none`, so optional fields that are not set do not appear; `meta`
keeps its nulls (`"lora": null`) as the original does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Envelope(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorResponse(Envelope):
    status: Literal["error"] = "error"
    message: str | dict[str, list[str]] = Field(
        description="What went wrong; for validation errors an object field -> list of messages."
    )
    tip: str | None = Field(None, description="What to change to make the request work.")


class SuccessResponse(Envelope):
    status: Literal["success"] = "success"
    generationTime: float | None = None  # noqa: N815 - wire name
    id: int | None = None
    output: list[str] | str = Field(default_factory=list)
    proxy_links: list[str] | None = None
    meta: dict[str, Any] | None = None
    nsfw_content_detected: bool | None = None
    webhook_status: str | None = None
    tip: str | None = None


class JobProgress(BaseModel):
    """Where a queued or running job is (ours; clients that do not know it ignore it)."""

    percent: int = Field(description="0..100; never goes backwards; 100 once the outputs are stored.")
    step: int = Field(description="Denoising steps done, over every image and pass.")
    total_steps: int = Field(description="Steps the job runs: img2img strength, highres_fix, upscale and every "
                             "sample counted.")
    image: int = Field(description="The image being made (1-based; 0 while queued or loading).")
    images: int
    stage: Literal["queued", "loading_model", "denoising", "decoding", "postprocessing", "storing"]
    preview: str | None = Field(None, description="A small JPEG of the current latents (`preview: yes` jobs), "
                                "overwritten in place; gone when the job ends.")


class ProcessingResponse(Envelope):
    status: Literal["processing"] = "processing"
    tip: str = "Your request is queued; fetch the result at fetch_result or wait for the webhook."
    eta: float
    messege: str = "Try to fetch request after seconds estimated"
    message: str = "Try to fetch request after seconds estimated"
    webhook_status: str = ""
    fetch_result: str
    id: int
    output: list[str] = Field(default_factory=list)
    meta: dict[str, Any] | None = None
    future_links: list[str] = Field(default_factory=list)
    progress: JobProgress | None = None
    queue_position: int | None = Field(None, description="Jobs that start before this one (while it is queued).")


class FailedResponse(Envelope):
    status: Literal["failed"] = "failed"
    id: int | str = ""
    message: str = "Failed, Try Again"
    output: list[str] = Field(default_factory=list)
    meta: dict[str, Any] | None = None
    webhook_status: str | None = None
    tip: str | None = None
    cancelled: bool | None = Field(None, description="True when the job was cancelled (by its client or its deadline).")


class MessageResponse(Envelope):
    status: Literal["success", "processing"] = "success"
    message: str


class ModelListResponse(Envelope):
    status: Literal["success"] = "success"
    models: list[dict[str, Any]] = Field(
        description="`model_id`, `load_data` (MM/DD/YYYY HH:MM:SS, UTC), plus our `category`, `status` and, where "
        "known, `family` (sd, sdxl, flux, sd3, qwen, zimage, flux2, flux2_klein: the family a model is, or a LoRA / "
        "ControlNet was made for)."
    )


class UsageResponse(Envelope):
    status: Literal["success"] = "success"
    start_date: str
    end_date: str
    keys: list[dict[str, Any]] = Field(
        description="One object per key: `key_id` (a hash of the key), `total` and `endpoints` (endpoint -> counts), "
        "and `days` (day -> counts) with `by_day`. Counts: requests, errors, jobs_succeeded, jobs_failed, images, "
        "video_seconds, gpu_seconds."
    )


class QueueResponse(Envelope):
    """Ours (admin keys): the jobs queued or running, whatever their key."""

    status: Literal["success"] = "success"
    jobs: list[dict[str, Any]] = Field(
        description="Running jobs first, then in start order. Each: `id`, `key_id` (a hash of the key that submitted "
        "it, as usage names keys), `endpoint`, `model_id`, `priority`, `state` (queued or running), `created_at` and "
        "`started_at` (UTC, ISO 8601), `eta` (seconds), `queue_position` (while queued) and `progress` (as fetch "
        "gives it).")
    by_key: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="key_id -> jobs `queued`, `running`, and per priority (`high`, `normal`, "
        "`low`).")
    queue_by_priority: dict[str, int] = Field(default_factory=dict, description="Jobs queued (not started) per "
                                              "priority, as system_details gives it.")
    unlisted: int = Field(0, description="Queued jobs not in `jobs` (it lists the running ones and the first 100 "
                          "queued, by priority then age); `by_key` counts them.")


class SystemDetailsResponse(Envelope):
    status: Literal["ok"] = "ok"
    model_count: int
    queue_time: float = Field(description="Estimated seconds of queued and running work.")
    queue_num: int = Field(description="Jobs queued or running.")
    device: str
    version: str
    models: list[str] = Field(default_factory=list, description="Ready models in the weights store.")
    loaded_models: list[str] = Field(default_factory=list, description="Models in the engine's memory now.")
    memory_mb: float | None = Field(None, description="Resident memory of the server process, MiB.")
    storage: dict[str, Any] = Field(default_factory=dict, description="Where outputs go (no secrets).")
    queue_by_priority: dict[str, int] = Field(default_factory=dict, description="Jobs queued (not started) per "
                                              "priority: high, normal, low.")
    memory: dict[str, Any] | None = Field(
        None, description="Memory on the GPU: `settings` (dtype per family, quantization, text_encoder_offload, "
        "quantize_text_encoders as configured) and `models`: per loaded model what the engine applied (dtype, "
        "quantization, the text encoders offloaded to the CPU or kept on the device, fast path, fused QKV, compiled; "
        "`planned_gb` / `card_gb` where it planned the memory), where this process can see them (on Modal the web "
        "tier sees the settings only: the models are in the GPU containers).")
    caller: dict[str, Any] | None = Field(
        None, description="Ours: the calling key as `key_id` (a hash of it, as usage names keys) and `admin` (whether "
        "it may use the catalog and server endpoints); the browser page shows its console to admin keys.")


class UploadImageResponse(Envelope):
    status: Literal["success"] = "success"
    message: str = "image uploaded"
    image_url: str


class NsfwCheckResponse(Envelope):
    """The spec's shape (no `status`; `images` echoes the input), plus the score behind the verdict."""

    images: str
    has_nsfw_concept: list[bool]
    nsfw_score: float = Field(description="0..1: the detector's confidence in its most certain explicit finding.")
    threshold: float = Field(description="Scores at or above this count as NSFW (setting SDAPI_NSFW_THRESHOLD).")


class SchedulersListResponse(Envelope):
    schedulers: list[str]


JobResponse = SuccessResponse | ProcessingResponse | FailedResponse


def job_response(job, fetch_result: str, eta: float = 0.0, progress: dict | None = None,
                 queue_position: int | None = None) -> JobResponse:
    """The envelope for a job record (anything with the fields of `infra.jobs.Job`); a processing
    one with its `progress` (the wire object) and `queue_position` when given."""
    if job.status == "success":
        flagged = job.meta.get("nsfw_content_detected") if job.meta else None
        return SuccessResponse(
            generationTime=job.generation_time,
            id=job.id,
            # super_resolution answers one URL string, as the spec shows; everything else a list
            output=job.future_links[0] if job.endpoint == "super_resolution" else job.future_links,
            meta=job.meta,
            nsfw_content_detected=any(flagged) if flagged is not None else None,
            webhook_status=job.webhook_status or None,
        )
    if job.status == "failed":
        return FailedResponse(
            id=job.id, message=job.message or "Failed, Try Again", meta=job.meta, webhook_status=job.webhook_status or None,
            cancelled=True if getattr(job, "cancelled", False) else None,
        )
    return ProcessingResponse(
        eta=round(eta, 2),
        fetch_result=fetch_result,
        id=job.id,
        meta=job.meta,
        future_links=job.future_links,
        webhook_status=job.webhook_status,
        progress=progress,
        queue_position=queue_position,
    )
