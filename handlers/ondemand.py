"""Models fetched on first use: the well-known upscalers, the face restorer and the AnimateDiff
motion adapter (`infra.catalog.known.KNOWN_MODELS`).

A request that needs one that is not in the store starts its load through the same path as
load_model (so verify_model and get_all_models show it) and names it in the job's
`await_models`; the worker waits for the load before it runs the job, and a failed load fails
the job with the load's reason. With the setting `fetch_known_models` off, a missing model is a
clear error naming the load_model_v2 call that adds it.
"""

from __future__ import annotations

from infra.catalog.loader import LoadRequest
from infra.catalog.known import KNOWN_MODELS
from infra.catalog.weights import FAILED, LOADING, READY, validate_model_id
from models.errors import BadInput, Conflict, NotFound


def known_source(model_id: str, settings) -> str | None:
    known = KNOWN_MODELS.get(model_id)
    return settings.known_model_urls.get(model_id) or (known[0] if known else None)


def require_model(model_id: str, category: str, field: str, rt) -> list[str]:
    """Check that `model_id` is (or will be) a ready `category` model: [] when it is ready now,
    [model_id] when the job must wait for its load. Anything else is a clear error."""
    entry = rt.weights.get(validate_model_id(model_id, field))
    if entry is not None and entry.status == READY:
        if entry.category != category:
            raise BadInput(f"{field}: model {model_id} is a {entry.category} model, not {category}")
        return []
    if entry is not None and entry.status == LOADING:
        return [model_id]
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
    if entry is not None and entry.status == FAILED:
        rt.weights.delete(model_id)  # an earlier fetch failed: try again
    request = LoadRequest(model_id, source, category)  # precision: the store's default (run_load)
    try:
        rt.weights.begin(request.entry())
    except Conflict:
        return [model_id]  # another request started the same fetch a moment ago
    rt.dispatcher.load(request)
    return [model_id]
