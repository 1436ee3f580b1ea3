"""The dispatcher of the web tier on Modal: `LocalDispatcher`'s interface, with jobs handed to
the GPU worker class (`Worker().run.spawn(job_id)`) and model loads to the download function.
Nothing here imports `modal` or torch: the `.spawn` callables are passed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from infra.catalog.weights import LoadRequest
from infra.jobs.params import JobParams


class ModalDispatcher:
    """`LocalDispatcher`'s interface for the web tier on Modal: jobs go to the GPU worker class
    (`spawn_job(job_id)`, i.e. `Worker().run.spawn(job_id)`), model loads to the download
    function (`spawn_load(dict of the LoadRequest's fields)`).

    The web tier cannot see the workers' memory: `loaded_models()` is empty, and evict /
    unload_models / restart bump the config generation (workers finish their input, then stop
    taking new ones; fresh containers load models again on demand) and report no model names."""

    def __init__(self, spawn_job: Callable[[int], Any], spawn_load: Callable[[dict], Any], config, jobs,
                 settings, device_label: str):
        self.spawn_job, self.spawn_load = spawn_job, spawn_load
        self.config, self.jobs, self.settings = config, jobs, settings
        self.device = device_label

    # --- lifecycle: nothing runs in the web container
    def start(self) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> None:
        pass

    # --- the interface handlers use
    def submit(self, job_id: int) -> None:
        self.spawn_job(job_id)

    def load(self, request: LoadRequest) -> None:
        """The load runs on the download function; it takes the request as a dict of primitives."""
        self.spawn_load(asdict(request))

    def evict(self, model_id: str) -> None:
        """A deleted model leaves the workers' memory when they are replaced (generation bump)."""
        self.config.bump_generation()

    def loaded_models(self) -> list[str]:
        return []  # in the GPU containers' memory, not visible from here

    def unload_models(self) -> list[str]:
        self.config.bump_generation()
        return []

    def restart(self) -> list[str]:
        self.config.bump_generation()
        return []

    def estimate(self, params: JobParams) -> float:
        """Seconds a job with these params will take on a warm worker (the setting initial_seconds_per_step:
        the web tier does not see the workers' timings)."""
        return self.settings.initial_seconds_per_step * params.work_units()
