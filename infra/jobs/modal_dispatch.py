"""The dispatcher on Modal, for every container that hands out work (the web tier, the downloader,
the scheduled passes): jobs go to the GPU worker class, model loads to the download function.
Nothing here imports `modal` or torch: modal_app passes Modal's objects in (`ModalHandles`), and the
tests pass the stand-ins of tests/modal/.

What Modal's semantics ask of it (../shared/notes/modal-semantics.md):
- Every spawn's call id (`fc-...`) is kept with its job. A job whose call failed (Modal gave up
  re-delivering it) is ended `failed` with the reason as soon as anyone looks (`check`, on fetch)
  or at the next recovery pass (`recover`, every few minutes); a job whose spawn was lost (the web
  container died between creating and spawning it) is spawned again by that pass.
- A job that waits for a model still loading (fetched on first use) is not spawned: no GPU
  container sits polling for a download. The downloader, when a load ends, releases the jobs that
  waited for it (`model_loaded`); the recovery pass catches any it missed.
- Fair queueing. Modal starts a function's inputs in the order they were spawned, so a burst of one
  key spawned at once would run before anything submitted after it. Jobs are therefore handed to
  Modal only into a free GPU slot: SDAPI_MODAL_MAX_CONTAINERS slots (plus SDAPI_MODAL_SPAWN_AHEAD
  kept in Modal's own queue), each a `slot:{n}` key of the queue Dict that one job holds from its
  spawn to its end (its ender frees it). The other jobs wait in the queue Dict, held. Whenever a
  slot may have freed (a submit, a job's end on its worker, a cancel, a failed call, a load's end,
  the recovery pass) `fill` hands out held jobs in `fair_order`: the highest priority first, then
  round-robin across keys, the key served longest ago first. Taking a job's spawn
  (`spawn:{id}:{n}`) and taking a slot are each a claim (`skip_if_exists`), so containers filling
  at once never exceed the slots nor spawn a job twice. Nothing held is lost: any container's next
  `fill`, at the latest the recovery pass (every few minutes, which also frees a slot a dead
  container left taken), hands it out.
- GPU classes per family: a job whose model's family has a GPU class of its own (`spawn_job_for_family`,
  from SDAPI_MODAL_FAMILY_GPUS) is spawned there, every other job to the default class. The slots are
  one pool across the classes (the burst ceiling is the deployment's, whatever the cards).
- The web tier cannot see the workers' memory: `loaded_models()` is empty, and evict /
  unload_models / restart bump the config generation (workers finish their input, then stop taking
  new ones; fresh containers load models again on demand).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from infra.catalog.weights import FAILED, READY, LoadRequest
from infra.jobs.dict_store import is_held, is_spawned
from infra.jobs.dispatch import fair_order
from infra.jobs.job import FAILED as JOB_FAILED
from infra.jobs.job import PRIORITIES, PROCESSING, Job
from infra.jobs.params import JobParams
from infra.jobs.progress import deadline_message

if TYPE_CHECKING:
    from infra.catalog.weights import WeightsStore
    from infra.jobs.dict_store import DictJobStore
    from infra.storage.config_store import DictConfigStore

log = logging.getLogger(__name__)

# config store name: per model, what the GPU containers' engines applied (ModalWorker._report_memory)
MEMORY_REPORT = "memory_report"
LOST_SPAWN_SECONDS = 60.0  # a queued job with no call for this long lost its spawn
PENDING, DONE = "pending", "done"


@dataclass
class ModalHandles:
    """What modal_app hands the runtime: Modal's objects (or a test's stand-ins)."""

    jobs: Any  # modal.Dict: job records, claim and call keys, load outcomes
    inputs: Any  # modal.Dict: a job's input images
    queue: Any  # modal.Dict: the jobs queued or running
    config: Any  # modal.Dict: run-time config (the update_s3 bucket, the restart generation)
    usage: Any  # modal.Dict: per-key usage
    spawn_job: Callable[[int], str | None]  # Worker().run.spawn(job_id) -> its call id
    spawn_load: Callable[[dict], Any]  # download_model.spawn(the LoadRequest's fields)
    spawn_webhook: Callable[[int], Any] | None = None  # deliver_webhook.spawn(job_id); None: deliver in this container
    call_status: Callable[[str], str] = lambda call_id: PENDING  # "pending" | "done" | "failed: <why>"
    cancel_call: Callable[[str], None] | None = None  # modal.FunctionCall.from_id(call_id).cancel()
    device_label: str = "modal"
    commit_outputs: Callable[[], None] | None = None
    reload_outputs: Callable[[], None] | None = None
    commit_weights: Callable[[], None] | None = None
    reload_weights: Callable[[], None] | None = None
    # model family -> spawn on that family's GPU class (SDAPI_MODAL_FAMILY_GPUS); other families: spawn_job
    spawn_job_for_family: dict[str, Callable[[int], str | None]] = field(default_factory=dict)


def load_key(model_id: str) -> str:
    """The outcome of a model's last load ("ready" or "failed: <why>"), written by the downloader:
    a Dict is seen alike by every container, a Volume only after a reload."""
    return f"load:{model_id}"


class ModalDispatcher:
    """The `Dispatcher` protocol on Modal (see the module docstring)."""

    def __init__(self, handles: ModalHandles, jobs: DictJobStore, weights: WeightsStore, config: DictConfigStore,
                 settings, webhooks=None):
        self.handles, self.jobs, self.weights, self.config, self.settings = handles, jobs, weights, config, settings
        self.webhooks = webhooks  # the runtime sets it (jobs this dispatcher ends get their webhook)
        self.device = handles.device_label

    # --- lifecycle: nothing runs in this container
    def start(self) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> None:
        pass

    # --- jobs
    def submit(self, job: Job) -> None:
        """Queue the job for the GPU class: it is spawned as soon as its turn comes and a slot is
        free (`fill`), unless models it waits for are still loading: then when they are (nothing
        holds a GPU meanwhile)."""
        waiting = [model_id for model_id in job.await_models if self._load_state(model_id) != READY]
        if waiting:
            self.jobs.set_waiting(job.id, waiting)
            # the load may have ended between the look and the mark: look once more
            if all(self._load_state(model_id) == READY for model_id in waiting):
                self.jobs.set_waiting(job.id, [])
            else:
                return
        self.fill()

    def hand_back(self, job: Job) -> None:
        """A worker gave the job back unstarted (its container is outdated, or a model it needs is
        loading again): it is queued again like a new submit (its turn among the others)."""
        self.jobs.hold(job.id)
        self.submit(job)

    def fill(self) -> list[int]:
        """Hand held jobs to Modal in the fair order, one per free GPU slot; a held job past its
        deadline is ended instead (as if cancelled). The ids spawned. Containers filling at once
        each take a job's spawn, then a slot, with a claim: a lost job costs one round trip (the
        next job is tried), a lost slot one more (the next slot); no slot left gives the spawn back."""
        entries, served, taken = self.jobs.queue_state()
        free = [slot for slot in range(self.slots()) if slot not in taken]
        if not free:
            return []
        random.shuffle(free)  # containers filling at once start at different slots
        held = {job_id: entry for job_id, entry in entries.items() if is_held(entry)}
        spawned, now = [], time.time()
        for job_id in fair_order(held, served):
            if not free:
                break
            if held[job_id].get("deadline_at") is not None and now > held[job_id]["deadline_at"]:
                self._expire(job_id)
                continue
            spawn = self.jobs.claim_spawn(job_id, held[job_id])
            if spawn is None:
                continue  # another container is handing this one out
            slot = None
            while free and slot is None:
                candidate = free.pop()
                slot = candidate if self.jobs.claim_slot(candidate, job_id) else None
            if slot is None:  # every slot was taken meanwhile: the job stays held
                self.jobs.unclaim_spawn(job_id, spawn)
                break
            if self._launch(job_id, spawn, slot):
                spawned.append(job_id)
        return spawned

    def slots(self) -> int:
        """Jobs handed to Modal at once: what the GPU class runs at once, plus the spawn-ahead."""
        return max(1, self.settings.modal_max_containers + self.settings.modal_spawn_ahead)

    def model_loaded(self, model_id: str) -> list[int]:
        """A load ended (in the downloader): record its outcome where every container sees it, then
        queue the jobs that waited for it (or end them `failed` with the load's reason). Their ids."""
        entry = self.weights.get(model_id)
        state = READY if entry is not None and entry.status == READY else f"{FAILED}: " + (
            entry.message if entry is not None else "it was deleted")
        self.handles.jobs.put(load_key(model_id), state)
        released = []
        for job_id, queued in self.jobs.open_jobs().items():
            waiting = queued.get("waiting_for") or []
            if model_id in waiting:
                released.append(job_id)
                self._release(job_id, [m for m in waiting if m != model_id], model_id, state)
        if released:
            self.fill()
        return released

    def check(self, job: Job) -> Job:
        """A job still `processing` whose call failed is ended `failed` with the call's reason (fetch
        says so at once, not after the next recovery pass)."""
        if job.status != PROCESSING:
            return job
        call_id = self.jobs.call_of(job.id)
        if call_id is None:
            return job
        status = self.handles.call_status(call_id)
        if not status.startswith(FAILED):
            return job
        ended = self._end(job.id, self._call_failed(status))
        self._notify(ended)
        self.fill()  # its slot is free
        return ended or job

    def cancelled(self, job: Job) -> None:
        """A queued job was cancelled: its call is cancelled too, so no GPU container starts for it
        (one that already took the input has it interrupted by Modal, `InputCancellation`, before it
        could claim the job: the cancel already ended it)."""
        call_id = self.jobs.call_of(job.id)
        if call_id and self.handles.cancel_call is not None:
            try:
                self.handles.cancel_call(call_id)
            except Exception:  # the job is ended in the store whatever Modal says
                log.exception("could not cancel call %s of job %s", call_id, job.id)
        if call_id:
            self.fill()  # its slot is free

    def queue_position(self, job: Job) -> int:
        """How many jobs start before this queued one: those already handed to Modal and not started
        (Modal starts them in spawn order), then, for a held job, those before it in the fair order."""
        entries, served, _ = self.jobs.queue_state()
        mine = entries.get(job.id)
        handed = [entry for job_id, entry in entries.items()
                  if job_id != job.id and is_spawned(entry) and not entry.get("started")]
        if mine is None or not is_held(mine):
            spawned_at = (mine or {}).get("spawned_at") or float("inf")
            return sum(1 for entry in handed if (entry.get("spawned_at") or 0.0) < spawned_at)
        order = fair_order({job_id: entry for job_id, entry in entries.items() if is_held(entry)}, served)
        return len(handed) + order.index(job.id)

    def queue_lengths(self) -> dict[str, int]:
        lengths = dict.fromkeys(PRIORITIES, 0)
        for entry in self.jobs.open_jobs().values():
            if not entry.get("started"):
                lengths[entry.get("priority", "normal")] = lengths.get(entry.get("priority", "normal"), 0) + 1
        return lengths

    def recover(self, max_attempts: int, message: str) -> tuple[list[int], list[int]]:
        """The recovery pass (scheduled every few minutes): jobs waiting for loads that ended are
        released; a lost spawn is spawned again; a failed call is spawned again while the job has
        attempts left, else the job ends `failed`; then the store's own pass for jobs that went
        silent (no call to ask); last, held jobs are handed out into the slots that are free (a job
        the fair queue holds is not a lost spawn). Returns (ids spawned, ids failed); the caller
        sends the failed ones' webhooks."""
        spawned, failed = [], []
        now = time.time()
        entries, _, taken = self.jobs.queue_state()
        for slot, holder in taken.items():  # a slot whose job ended (or was never handed out in it) by a container that died
            entry = entries.get(holder.get("job"))
            if (entry is None or entry.get("slot") != slot) and now - holder.get("at", 0.0) > LOST_SPAWN_SECONDS:
                self.jobs.release_slot(slot, holder.get("job"))
        for job_id, queued in entries.items():
            job = self.jobs.get(job_id)
            if job is None or job.status != PROCESSING:
                continue
            waiting = queued.get("waiting_for") or []
            if waiting:
                states = {model_id: self._load_state(model_id) for model_id in waiting}
                if all(state == READY for state in states.values()):
                    self.jobs.set_waiting(job_id, [])  # held now: `fill` below hands it out in its turn
                elif any(state.startswith(FAILED) for state in states.values()):
                    model_id, state = next((m, s) for m, s in states.items() if s.startswith(FAILED))
                    self._end(job_id, f"{model_id} could not be loaded: {state[len(FAILED) + 2:]}")
                    failed.append(job_id)
                continue
            if is_held(queued):
                continue
            call_id = self.jobs.call_of(job_id)
            if call_id is None:
                handed_at = max(queued.get("spawned_at") or 0.0, queued.get("queued_at", job.created_at))
                if now - handed_at > LOST_SPAWN_SECONDS:  # the container died between the claim and the spawn
                    self.jobs.requeue(job_id)
                    if self._spawn(job_id, queued):
                        spawned.append(job_id)
                continue
            status = self.handles.call_status(call_id)
            if status.startswith(FAILED):  # Modal gave up on the input (its deliveries counted as attempts)
                self._end(job_id, self._call_failed(status))
                failed.append(job_id)
            elif status == DONE and job.started_at is None and self._spawn(job_id, queued):
                spawned.append(job_id)  # the worker gave it back unstarted: spawned again
        again, gone = self.jobs.recover(max_attempts, message)
        for job_id in again:
            self._spawn(job_id, entries.get(job_id, {}))
        filled = self.fill()
        return spawned + again + filled, failed + gone

    def estimate(self, params: JobParams) -> float:
        """Seconds a job with these params will take on a warm worker (the setting initial_seconds_per_step:
        the web tier does not see the workers' timings)."""
        return self.settings.initial_seconds_per_step * params.work_units()

    # --- models
    def load(self, request: LoadRequest) -> None:
        """The load runs on the download function; it takes the request as a dict of primitives."""
        self.handles.jobs.pop(load_key(request.model_id), None)
        self.handles.spawn_load(asdict(request))

    def evict(self, model_id: str) -> None:
        """A deleted model leaves the workers' memory when they are replaced (generation bump)."""
        self.config.bump_generation()

    def loaded_models(self) -> list[str]:
        return []  # in the GPU containers' memory, not visible from here

    def memory_report(self) -> dict[str, dict]:
        """As the GPU containers of the current generation last reported it (`MEMORY_REPORT`)."""
        try:
            known = json.loads(self.config.get(MEMORY_REPORT) or "{}")
        except ValueError:
            return {}
        if known.get("generation") != self.config.generation():
            return {}
        return known.get("models", {})

    def unload_models(self) -> list[str]:
        self.config.bump_generation()
        return []

    def restart(self) -> list[str]:
        self.config.bump_generation()
        return []

    # --- internals
    def _spawn(self, job_id: int, seen: dict) -> bool:
        """Spawn the job on the GPU class again (it keeps its slot), unless another container took
        this spawn first (`seen`: its queue entry as the caller read it)."""
        spawn = self.jobs.claim_spawn(job_id, seen)
        return spawn is not None and self._launch(job_id, spawn, None)

    def _launch(self, job_id: int, spawn: int, slot: int | None) -> bool:
        """The spawn itself, once taken: the entry marked, the call made and its id kept."""
        if not self.jobs.mark_spawned(job_id, spawn, slot):  # it ended meanwhile
            if slot is not None:
                self.jobs.release_slot(slot, job_id)
            return False
        call_id = self._spawner(job_id)(job_id)
        if call_id:
            self.jobs.set_call(job_id, call_id)
        return True

    def _spawner(self, job_id: int) -> Callable[[int], str | None]:
        """The GPU class a job goes to: its model's family's, where SDAPI_MODAL_FAMILY_GPUS gives that
        family one (one more read of the job record), else the default class."""
        routes = self.handles.spawn_job_for_family
        if routes:
            job = self.jobs.get(job_id)
            model_id = getattr(getattr(job, "params", None), "model_id", None)
            try:
                entry = self.weights.get(model_id) if model_id else None
            except Exception:  # (an id the catalog refuses: the default class, whose run fails the job with why)
                entry = None
            if entry is not None and entry.family in routes:
                return routes[entry.family]
        return self.handles.spawn_job

    def _expire(self, job_id: int) -> None:
        """A held job whose deadline passed ends as if cancelled (no GPU starts for it)."""
        job = self.jobs.get(job_id)
        if job is not None and self.jobs.request_cancel(job_id, deadline_message(job)) == "cancelled":
            self._notify(self.jobs.get(job_id))

    def _load_state(self, model_id: str) -> str:
        entry = self.weights.get(model_id)
        if entry is not None and entry.status == READY:
            return READY
        return self.handles.jobs.get(load_key(model_id)) or "loading"

    def _release(self, job_id: int, still_waiting: list[str], model_id: str, state: str) -> None:
        if state.startswith(FAILED):
            self._notify(self._end(job_id, f"{model_id} could not be loaded: {state[len(FAILED) + 2:]}"))
        elif still_waiting:
            self.jobs.set_waiting(job_id, still_waiting)
        else:
            self.jobs.set_waiting(job_id, [])  # held: the caller's `fill` hands it out in its turn

    @staticmethod
    def _call_failed(status: str) -> str:
        return f"The GPU worker running this job failed ({status[len(FAILED) + 2:]}); please submit it again."

    def _end(self, job_id: int, message: str) -> Job | None:
        self.jobs.update(job_id, status=JOB_FAILED, message=message, finished_at=time.time())
        return self.jobs.get(job_id)

    def _notify(self, job: Job | None) -> None:
        if self.webhooks is not None and job is not None:
            self.webhooks.job_finished(job)
