"""What the job layer needs from an engine, and the errors an engine raises. No torch here: the
dispatchers, the Modal worker and the tests are written against this `Engine` protocol;
`infra.engine.engine.DiffusersEngine` is the implementation (torch, diffusers), and test stand-ins
implement it too (tests/engine/test_engine_conformance.py holds them to it).

An engine turns one job's typed parameters (`infra.jobs.params.JobParams`) and its input images
into output files, in the order of the job's output keys, plus facts for the job's `meta`. A job it
cannot run as asked raises `EngineError` with a message for the client; `execute_job` ends the job
`failed` with that message. There are no HTTP statuses down here: a failed job is a job state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

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


class Engine(Protocol):
    device_name: str

    def run(self, params: JobParams, inputs: Mapping[str, bytes]) -> EngineResult:
        """One job's outputs; raises EngineError for a job that cannot run as asked."""

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
