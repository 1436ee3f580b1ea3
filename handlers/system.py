"""Server endpoints that report state: system_details, schedulers_list."""

from __future__ import annotations

from infra.engine.schedulers import SUPPORTED
from infra.weights import READY
from models.requests import KeyOnlyRequest
from models.responses import SchedulersListResponse, SystemDetailsResponse


def system_details(req: KeyOnlyRequest, rt) -> SystemDetailsResponse:
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
    )


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


def schedulers_list(req: KeyOnlyRequest, rt) -> SchedulersListResponse:
    """The schedulers this server can run (see docs/compatibility.md for the four it cannot)."""
    return SchedulersListResponse(schedulers=list(SUPPORTED))
