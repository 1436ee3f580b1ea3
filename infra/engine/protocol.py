"""What the job layer needs from an engine, and the errors an engine raises. No torch here: the
dispatchers, the Modal worker and the tests are written against this `Engine` protocol;
`infra.engine.engine.DiffusersEngine` is the implementation (torch, diffusers), and test stand-ins
implement it too (tests/engine/test_engine_conformance.py holds them to it).

An engine turns one job's typed parameters (`infra.jobs.params.JobParams`) and its input images
into output files, in the order of the job's output keys, plus facts for the job's `meta`. A job it
cannot run as asked raises `EngineError` with a message for the client; `execute_job` ends the job
`failed` with that message. There are no HTTP statuses down here: a failed job is a job state.

While it runs, an engine tells the job's `Progress` what it is doing: the stage it is in, the image
it is making, every denoising step, and (when the job asked for previews) a small JPEG of the
latents every few steps. `Progress.step` raises
`Cancelled` when the client cancelled the job or its deadline passed: the engine lets it propagate,
so a cancelled job stops at its next step and frees the device. `execute_job` ends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

if TYPE_CHECKING:
    from infra.catalog.weights import WeightsStore
    from infra.jobs.params import JobParams
    from infra.settings import Settings


class EngineResult(NamedTuple):
    files: list[bytes]  # one per output key of the job, in order
    facts: dict[str, Any]  # merged into the job's meta (e.g. nsfw_content_detected)


class EngineError(Exception):
    """A job the engine cannot run as asked; the message says why and what to change."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Unsupported(EngineError):
    """The model cannot do what the job asks (a variant its family lacks, video on an SDXL model)."""


class DoesNotFit(EngineError):
    """An adapter, LoRA, embedding, motion module or option that does not fit the job's model."""


class Cancelled(Exception):  # noqa: N818 - a state, not an error of the engine's
    """Raised by `Progress.step` (from inside the engine) when the job must stop: cancelled by its
    client, or past its deadline. The message says which, for the job's failed answer."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


Stage = Literal["queued", "loading_model", "denoising", "decoding", "postprocessing", "storing"]


class Progress(Protocol):
    """Where an engine reports a job's progress (`infra.jobs.progress.ProgressReporter`). Every
    call is cheap (no I/O on the engine's thread); `step` may raise `Cancelled`."""

    def stage(self, stage: Stage) -> None:
        """The job entered `stage`."""

    def image(self, index: int) -> None:
        """Image `index` (0-based) of the job's images is being made."""

    def adjust(self, extra_steps: int) -> None:
        """A pass runs `extra_steps` more steps than the job's `total_steps()` planned (a
        second-order scheduler calls back twice per step)."""

    def step(self, count: int = 1) -> None:
        """`count` denoising steps ran (a batched pass advances every image in it). Raises
        `Cancelled` to stop the job."""

    def wants_preview(self) -> bool:
        """True when a preview of the current latents is due (the job asked for previews, and the
        setting's number of steps passed since the last one)."""

    def preview(self, jpeg: bytes) -> None:
        """A small JPEG of the current latents (a cheap latent-to-RGB approximation)."""


class Engine(Protocol):
    device_name: str

    def run(self, params: JobParams, inputs: Mapping[str, bytes], progress: Progress | None = None) -> EngineResult:
        """One job's outputs; raises EngineError for a job that cannot run as asked, and lets the
        `Cancelled` its `progress` raises propagate."""

    def warm(self, model_id: str) -> None:
        """Load a model ahead of its first job."""

    def move_to(self, device: str) -> None:
        """Run on `device` from now on, with the loaded models moved there."""

    def rebind(self, settings: Settings, weights: WeightsStore) -> None:
        """Read these settings and this weights store from now on; the loaded models stay (a Modal
        container restored from a memory snapshot has its own environment and Volume view)."""

    def evict(self, model_id: str) -> None:
        """Forget a deleted model (and its adapters in every loaded model)."""

    def unload_all(self) -> list[str]:
        """Drop every loaded model; their ids."""

    def loaded(self) -> list[str]:
        """Ids of the models in memory, least recently used first."""
