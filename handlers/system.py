"""Server endpoints that report state: system_details, schedulers_list, usage (ours)."""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from handlers.caller import Caller
from infra.catalog.weights import READY
from infra.jobs.usage import today
from infra.limits import key_id
from models.errors import BadInput
from models.requests import KeyOnlyRequest, UsageRequest
from models.responses import SchedulersListResponse, SystemDetailsResponse, UsageResponse
from models.schedulers import SUPPORTED

if TYPE_CHECKING:
    from infra.runtime import Runtime


def system_details(req: KeyOnlyRequest, rt: Runtime, caller: Caller) -> SystemDetailsResponse:
    queued, queue_time = rt.jobs.unfinished()
    models = [m.model_id for m in rt.weights.list() if m.status == READY]
    return SystemDetailsResponse(
        model_count=len(models),
        queue_time=round(queue_time, 2),
        queue_num=queued,
        device=rt.dispatcher.device,
        version=rt.version,
        models=models,
        loaded_models=rt.dispatcher.loaded_models(),
        memory_mb=_resident_mb(),
        storage=rt.storage.describe(),
        queue_by_priority=rt.dispatcher.queue_lengths(),
        memory=_memory(rt),
        caller={"key_id": caller.key_id, "admin": caller.admin},
    )


def _memory(rt: Runtime) -> dict:
    """The memory settings as configured, and per loaded model what the engine applied."""
    settings = rt.settings
    report = getattr(rt.dispatcher, "memory_report", None)
    return {
        "settings": {
            "dtype": "on CUDA fp16 for SD / SDXL, bf16 for the transformer families (fp16 on a GPU without bf16); "
                     "fp32 on the CPU",
            "quantization": settings.quantization,
            "text_encoder_offload": settings.text_encoder_offload,
            "quantize_text_encoders": settings.quantize_text_encoders,
        },
        "models": report() if report is not None else {},
    }


def _resident_mb() -> float | None:
    """This process's resident memory (Linux), in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def schedulers_list(req: KeyOnlyRequest, rt: Runtime, caller: Caller) -> SchedulersListResponse:
    """The schedulers this server can run (see docs/compatibility.md for the four it cannot)."""
    return SchedulersListResponse(schedulers=list(SUPPORTED))


def usage(req: UsageRequest, rt: Runtime, caller: Caller) -> UsageResponse:
    """Per-key usage between two UTC days (default: this month so far), for billing."""
    end = _day(req.end_date, "end_date") if req.end_date else today()
    start = _day(req.start_date, "start_date") if req.start_date else end[:8] + "01"
    if start > end:
        raise BadInput(f"start_date {start} is after end_date {end}", tip="Swap the two dates.")
    keys = None
    if req.api_key:
        keys = [key_id(req.api_key)]
    elif req.key_id:
        keys = [req.key_id]
    totals = rt.usage.totals(start, end, keys)
    return UsageResponse(start_date=start, end_date=end, keys=totals.by_key(req.by_day))


def _day(value: str, field: str) -> str:
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise BadInput(f"{field} must be a date like 2026-11-24, not {value!r}", tip="Use YYYY-MM-DD (UTC).") from None
