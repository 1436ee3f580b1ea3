"""Models fetched on first use: the well-known upscalers, the face restorer and the AnimateDiff
motion adapter (`infra.catalog.known.KNOWN_MODELS`).

Two steps, so a request never starts a download it then refuses: `require_known` checks (no side
effect) and says what the job would wait for; `start` begins those loads once the job is accepted
(`handlers.submit.submit_job`), through the same path as load_model (so verify_model and
get_all_models show them). The job names them in `await_models`; the worker waits for the loads
before it runs the job, and a failed load fails the job with the load's reason. With the setting
`fetch_known_models` off, a missing model is a clear error naming the load_model_v2 call that adds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infra.catalog.known import KNOWN_MODELS
from infra.catalog.weights import FAILED, LOADING, READY, LoadRequest, ModelEntry, validate_model_id
from models.errors import BadInput, Conflict, NotFound

if TYPE_CHECKING:
    from infra.runtime import Runtime


@dataclass(frozen=True)
class Pending:
    """A model a job will wait for: loading already (`load` None), or to fetch once the job is accepted."""

    model_id: str
    load: LoadRequest | None = None


def known_source(model_id: str, settings) -> str | None:
    known = KNOWN_MODELS.get(model_id)
    return settings.known_model_urls.get(model_id) or (known[0] if known else None)


def require_known(model_id: str, category: str, field: str, rt: Runtime) -> ModelEntry | Pending:
    """The ready `category` model `model_id`, or what the job must wait for. Anything else is a
    clear error. Starts nothing."""
    entry = rt.weights.get(validate_model_id(model_id, field))
    if entry is not None and entry.status == READY:
        if entry.category != category:
            raise BadInput(f"{field}: model {model_id} is a {entry.category} model, not {category}")
        return entry
    if entry is not None and entry.status == LOADING:
        return Pending(model_id)
    source = known_source(model_id, rt.settings)
    if source is None or KNOWN_MODELS.get(model_id, (None, category))[1] != category:
        state = f"failed to load ({entry.message})" if entry is not None else "is not on this server"
        raise NotFound(
            f"{field}: {category.replace('_', ' ')} {model_id} {state}",
            tip=f'Load it with load_model_v2 (model_category "{category}", model_id "{model_id}"), '
            "or use one get_all_models lists.",
        )
    if not rt.settings.fetch_known_models:
        raise NotFound(
            f"{field}: {category.replace('_', ' ')} {model_id} is not on this server",
            tip=f'Load it first: load_model_v2 with url "{source}", model_category "{category}", '
            f'model_id "{model_id}".',
        )
    return Pending(model_id, LoadRequest(model_id, source, category))  # precision: the store's default (run_load)


def require_default(model_id: str, source: str, rt: Runtime) -> ModelEntry | Pending:
    """A default model with a configured source (a fresh deployment has none yet): its entry when it
    is ready, else what the job must wait for (its load, started once the job is accepted)."""
    entry = rt.weights.get(validate_model_id(model_id, "model_id"))
    if entry is not None and entry.status == READY:
        return entry
    if entry is not None and entry.status == LOADING:
        return Pending(model_id)
    return Pending(model_id, LoadRequest(model_id, source, None))  # a pipeline: its family is detected


def waiting(*needed: ModelEntry | Pending) -> list[Pending]:
    """Of what require_known / require_default answered, what the job must wait for (the Pendings)."""
    return [item for item in needed if isinstance(item, Pending)]


def start(pending: Iterable[Pending], rt: Runtime) -> list[str]:
    """Begin the fetches among `pending` (the job was accepted); the ids the job waits for."""
    waiting = []
    for item in pending:
        waiting.append(item.model_id)
        if item.load is None:
            continue
        entry = rt.weights.get(item.model_id)
        if entry is not None and entry.status == FAILED:
            rt.weights.delete(item.model_id)  # an earlier fetch failed: try again
        try:
            rt.weights.begin(item.load.entry())
        except Conflict:
            continue  # another request started the same fetch a moment ago
        rt.dispatcher.load(item.load)
    return waiting
