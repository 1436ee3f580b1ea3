"""The Modal side of the job store: `SqliteJobStore`'s interface on `modal.Dict`s.

Nothing here imports `modal` or torch: the `modal.Dict`s are passed in,
so the same code runs against in-memory stand-ins in the tests (`tests/modal/standins.py`).

What a `modal.Dict` gives us, and what follows from it:
- `get`, `put`, `pop`, `__contains__`, `update`, `items()`; values are cloudpickled, so records are
  plain dicts of primitives (never our dataclasses: a record must stay readable after a deploy
  that changed the class).
- No transactions. The one atomic primitive is `put(key, value, skip_if_exists=True)`, which
  returns True for exactly one writer. Every decision that must be made by one container only
  (which worker runs an attempt of a job, whether clear_queue cancels it) is a claim key written
  that way. Everything else is read-modify-write, arranged so that the remaining races are
  harmless or repaired (the unfinished index, see `DictJobStore`).
- Iterating a Dict streams every entry: the hot paths never iterate the jobs Dict. The jobs that
  are queued or running are the keys of a Dict of their own (`queue`), small by nature, which the
  hot paths (fetch's eta, system_details, the per-key job cap) read in one streaming call. Nothing
  takes a lock: a create and a finish are each a few independent writes.
- Entries expire after 7 days without reads or writes. The scheduled cleaner re-writes the records
  it keeps (`delete_finished_before`), so a record lives as long as the job retention says.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from infra.jobs.job import (
    FAILED,
    IDEMPOTENCY_SECONDS,
    JOB_FIELDS,
    MAX_ID,
    MIN_ID,
    PROCESSING,
    TERMINAL,
    Job,
    wait_until_done,
)

POLL_SECONDS = 0.25  # how often `wait` looks at a job
REFRESH_SECONDS = 4 * 24 * 3600  # a kept record is re-written when it was last written longer ago (Dict expiry: 7 days)
TOUCHED = "_written_at"  # a record's last write, kept in the record beside the job's fields


def claim_key(job_id: int, attempt: int) -> str:
    """Written once (skip_if_exists) by whoever starts attempt `attempt` of a job, or cancels it."""
    return f"claim:{job_id}:{attempt}"


def _beat_key(job_id: int) -> str:
    return f"beat:{job_id}"


def progress_key(job_id: int) -> str:
    """The job's progress snapshots (written by its worker's reporter, read by every web container)."""
    return f"progress:{job_id}"


def preview_key(job_id: int) -> str:
    return f"preview:{job_id}"


def cancel_key(job_id: int) -> str:
    """A cancel requested for a running job: its message (the worker's reporter reads it)."""
    return f"cancel:{job_id}"


def idempotency_key(owner: str, key: str) -> str:
    return f"idem:{owner}:{key}"


def spawn_key(job_id: int, spawn: int) -> str:
    """Written once (skip_if_exists) by the container that hands spawn number `spawn` of a job to Modal."""
    return f"spawn:{job_id}:{spawn}"


def slot_key(slot: int) -> str:
    """In the queue Dict: GPU slot number `slot` (0 .. slots-1), held by the job handed to Modal in it."""
    return f"slot:{slot}"


def served_key(owner: str) -> str:
    """In the queue Dict: when a key's last job was handed to Modal (the fair order's turn)."""
    return f"served:{owner}"


def is_held(entry: dict) -> bool:
    """A queue entry of a job kept back in the fair queue: not handed to Modal, not waiting for a
    load. (An entry written before the fair queue has no `spawned_at`: it was spawned at once.)"""
    return "spawned_at" in entry and entry["spawned_at"] is None and not entry.get("waiting_for")


def is_spawned(entry: dict) -> bool:
    """A queue entry whose job was handed to Modal (queued there or running)."""
    return entry.get("spawned_at", entry.get("queued_at")) is not None and not entry.get("waiting_for")


def call_key(job_id: int) -> str:
    """The id of the Modal call (`fc-...`) that runs the job (written by the dispatcher after its spawn)."""
    return f"call:{job_id}"


class DictJobStore:
    """`SqliteJobStore`'s interface on three `modal.Dict`s: `jobs` (records, claim and call keys),
    `inputs` (the input images of a job, deleted when the job ends) and `queue` (job id -> eta,
    owner, priority, deadline, when it was queued, the models it waits for, when it was handed to
    Modal and in which GPU slot, for every job queued or running; `served:{owner}` -> when that
    key's last job was handed to Modal, and `slot:{n}` -> the job holding GPU slot n, for the fair
    queue of `infra.jobs.modal_dispatch`).

    Claims. A job's record holds `attempts` (starts so far), `started_at` (None while queued) and
    `runner` (the Modal input that started the current attempt). Starting attempt n+1 means winning
    `claim:{id}:{n+1}` with `put(..., skip_if_exists=True)`; exactly one container wins it, then
    copies the start into the record. Modal delivers an input at least once: the same input, same
    id, delivered again after its container was pre-empted or crashed, may claim the job it had
    started (the next attempt); any other caller finds it taken. `cancel_queued` writes the next
    claim key to cancel a queued job, so a worker and clear_queue cannot both win. The claim key is
    the truth when the record disagrees (a worker that died between winning the key and writing the
    record).

    Recover. `recover` (the scheduled pass) takes a started job for dead when it was started more
    than `stale_after` seconds ago with no heartbeat since (above the worker's timeout: Modal killed
    it), and returns jobs handed to Modal longer than `stale_after` ago that never started, to be
    spawned again (a duplicate spawn is harmless: the claim lets only one run); a job the fair queue
    holds back is not lost, however long it waits. The Modal dispatcher looks at the
    jobs' calls first (`infra.jobs.modal_dispatch`), which finds a lost spawn or a failed call in
    minutes; this is the pass of last resort.
    """

    def __init__(self, jobs, inputs, queue, stale_after: float = 2 * 3600):
        self._jobs, self._inputs, self._queue = jobs, inputs, queue
        self.stale_after = stale_after

    # --- writing
    def create(self, job: Job, inputs: dict[str, bytes] | None = None) -> Job:
        """Store a new job under a fresh random id (the id on `job` is replaced)."""
        now = time.time()
        while True:
            job.id = MIN_ID + secrets.randbelow(MAX_ID - MIN_ID)
            if self._jobs.put(job.id, {**job.to_record(), TOUCHED: now}, skip_if_exists=True):
                break
        if inputs:
            self._inputs.put(job.id, dict(inputs))
        self._queue.put(job.id, {"eta": job.eta, "owner": job.owner, "queued_at": now, "priority": job.priority,
                                 "deadline_at": job.deadline_at, "spawned_at": None, "spawns": 0})
        return job

    def update(self, job_id: int, **changes: Any) -> None:
        unknown = set(changes) - set(JOB_FIELDS)
        if unknown:
            raise ValueError(f"not job fields: {', '.join(sorted(unknown))}")
        if "params" in changes:
            changes["params"] = changes["params"].model_dump(mode="json")
        record = self._jobs.get(job_id)
        if record is None:
            return
        record.update(changes, **{TOUCHED: time.time()})
        self._jobs.put(job_id, record)
        if changes.get("status") in TERMINAL:
            self._forget([job_id])
            self._jobs.pop(preview_key(job_id), None)

    def claim(self, job_id: int, runner: str | None = None) -> bool:
        """Start a queued job: True for exactly one caller, False when it was cancelled, finished or
        started by another runner. `runner` (the Modal input id) may claim again a job it started:
        Modal delivered that input again after its container died. Counts the attempt."""
        record = self._jobs.get(job_id)
        if record is None or record["status"] != PROCESSING:
            return False
        if record["started_at"] is not None and not (runner and record.get("runner") == runner):
            return False
        attempt = record["attempts"] + 1
        now = time.time()
        if not self._jobs.put(claim_key(job_id, attempt), {"at": now, "runner": runner}, skip_if_exists=True):
            return False
        self.update(job_id, started_at=now, attempts=attempt, runner=runner or "")
        entry = self._queue.get(job_id)
        if entry is not None:  # queue_position counts the jobs not started yet
            self._queue.put(job_id, {**entry, "started": True})
        return True

    def heartbeat(self, job_id: int) -> None:
        """A running job's worker is alive (optional: call it from a long job's worker so `recover`
        does not take the job for dead before `stale_after` has passed since the last beat)."""
        self._jobs.put(_beat_key(job_id), time.time())

    def request_cancel(self, job_id: int, message: str) -> str:
        """A queued job is cancelled by winning its next claim key (no worker can start it then);
        a running one gets the `cancel:` key its worker's reporter reads."""
        record = self._jobs.get(job_id)
        if record is None:
            return "missing"
        if record["status"] in TERMINAL:
            return "ended"
        if record["started_at"] is None and self._jobs.put(
                claim_key(job_id, record["attempts"] + 1), {"at": time.time(), "runner": "cancel"}, skip_if_exists=True):
            self.update(job_id, status=FAILED, message=message, finished_at=time.time(), cancelled=True)
            return "cancelled"
        self._jobs.put(cancel_key(job_id), message)  # started (or a worker is starting it right now)
        return "stopping"

    def cancel_requested(self, job_id: int) -> str | None:
        return self._jobs.get(cancel_key(job_id))

    def set_progress(self, job_id: int, history: list[dict]) -> None:
        self._jobs.put(progress_key(job_id), history)

    def progress(self, job_id: int) -> list[dict]:
        return list(self._jobs.get(progress_key(job_id)) or [])

    def set_preview(self, job_id: int, jpeg: bytes) -> None:
        self._jobs.put(preview_key(job_id), jpeg)

    def preview(self, job_id: int) -> bytes | None:
        return self._jobs.get(preview_key(job_id))

    def remember_request(self, owner: str, key: str, digest: str, ttl: float) -> tuple[str, int | None]:
        """The reservation is a `skip_if_exists` put: exactly one web container wins a key. One
        older than `ttl` is taken out first (two requests racing at that very moment could both
        win: a replay exactly 24 h later, accepted as new)."""
        name = idempotency_key(owner, key)
        entry = {"digest": digest, "job_id": None, "at": time.time()}
        if self._jobs.put(name, entry, skip_if_exists=True):
            return "new", None
        found = self._jobs.get(name)
        if found is None or time.time() - found["at"] > ttl:
            self._jobs.pop(name, None)
            if self._jobs.put(name, entry, skip_if_exists=True):
                return "new", None
            found = self._jobs.get(name) or found
        return ("same" if found["digest"] == digest else "different"), found.get("job_id")

    def bind_request(self, owner: str, key: str, job_id: int) -> None:
        name = idempotency_key(owner, key)
        found = self._jobs.get(name)
        if found is not None:
            self._jobs.put(name, {**found, "job_id": job_id})

    def forget_request(self, owner: str, key: str) -> None:
        name = idempotency_key(owner, key)
        found = self._jobs.get(name)
        if found is not None and found.get("job_id") is None:
            self._jobs.pop(name, None)

    def cancel_queued(self, message: str) -> list[int]:
        """End every job not yet started as `failed` with `message`; running jobs are left alone.
        A job is cancelled by winning its next claim key, the one its worker would need."""
        cancelled = []
        for job_id in self.open_jobs():
            record = self._jobs.get(job_id)
            if record is None or record["status"] != PROCESSING or record["started_at"] is not None:
                continue
            if self._jobs.put(claim_key(job_id, record["attempts"] + 1), {"at": time.time(), "runner": "cancel"},
                              skip_if_exists=True):
                self.update(job_id, status=FAILED, message=message, finished_at=time.time())
                cancelled.append(job_id)
        return cancelled

    def recover(self, max_attempts: int, message: str, stale_after: float | None = None) -> tuple[list[int], list[int]]:
        """The jobs whose worker is dead (started more than `stale_after` seconds ago, default the
        store's, with no heartbeat since): queued again while started fewer than `max_attempts`
        times, else ended `failed` with `message`. Also returns jobs queued for more than
        `stale_after` seconds and never started, to be spawned again. Returns (ids to spawn,
        ids failed), oldest first; see the class docstring."""
        stale_after = self.stale_after if stale_after is None else stale_after
        now = time.time()
        queued, failed, gone = [], [], []
        for job_id, entry in self.open_jobs().items():
            record = self._jobs.get(job_id)
            if record is None or record["status"] != PROCESSING:
                gone.append(job_id)
                continue
            started_at, attempts = self.started(job_id, record)
            if started_at is None:  # handed to Modal but not started: spawn it again if it waited too long
                handed = max(entry.get("spawned_at") or 0.0, entry.get("queued_at", record["created_at"]))
                if is_spawned(entry) and now - handed > stale_after:
                    self.requeue(job_id)
                    queued.append((record["created_at"], job_id))
                continue
            alive_at = max(started_at, self._jobs.get(_beat_key(job_id), 0.0))
            if now - alive_at <= stale_after:
                continue  # running
            if attempts >= max_attempts:
                self.update(job_id, status=FAILED, message=message, finished_at=now, attempts=attempts)
                failed.append((record["created_at"], job_id))
            else:
                self.update(job_id, started_at=None, attempts=attempts)
                self.requeue(job_id)
                queued.append((record["created_at"], job_id))
        if gone:
            self._forget(gone)
        return [job_id for _, job_id in sorted(queued)], [job_id for _, job_id in sorted(failed)]

    def started(self, job_id: int, record: dict) -> tuple[float | None, int]:
        """(when the current attempt started, attempts so far), a claim the record does not show
        yet included (its worker is starting, or died between the claim and the record)."""
        started_at, attempts = record["started_at"], record["attempts"]
        if started_at is None:
            claim = self._jobs.get(claim_key(job_id, attempts + 1))
            if claim is not None:
                return (claim["at"] if isinstance(claim, dict) else claim), attempts + 1
        return started_at, attempts

    def requeue(self, job_id: int) -> None:
        """The job is queued again from now (its queue entry's clock restarts)."""
        entry = self._queue.get(job_id)
        if entry is not None:
            self._queue.put(job_id, {**entry, "queued_at": time.time()})

    def claim_slot(self, slot: int, job_id: int) -> bool:
        """Take GPU slot number `slot` for the job: True for exactly one caller while the slot is free."""
        return self._queue.put(slot_key(slot), {"job": job_id, "at": time.time()}, skip_if_exists=True)

    def release_slot(self, slot: int, job_id: int) -> None:
        """Free the slot, if the job still holds it."""
        holder = self._queue.get(slot_key(slot))
        if isinstance(holder, dict) and holder.get("job") == job_id:
            self._queue.pop(slot_key(slot), None)

    def claim_spawn(self, job_id: int, seen: dict) -> int | None:
        """Take the job's next spawn (the one after the `spawns` of its queue entry as `seen`):
        its number for exactly one container (the `spawn:{id}:{n}` key), which then spawns it;
        None when another container took it."""
        spawn = seen.get("spawns", 0) + 1
        if not self._jobs.put(spawn_key(job_id, spawn), time.time(), skip_if_exists=True):
            return None
        return spawn

    def unclaim_spawn(self, job_id: int, spawn: int) -> None:
        """Give a spawn taken with `claim_spawn` back unused (no GPU slot was left for it)."""
        self._jobs.pop(spawn_key(job_id, spawn), None)

    def mark_spawned(self, job_id: int, spawn: int, slot: int | None = None) -> bool:
        """The job is handed to Modal now (spawn number `spawn`, in `slot`; a spawn again keeps the
        slot it holds) and its key counts as served now (the fair order's turn). False when the
        job ended meanwhile."""
        entry = self._queue.get(job_id)
        if entry is None:
            return False
        now = time.time()
        changes = {"spawned_at": now, "spawns": max(spawn, entry.get("spawns", 0))}
        if slot is not None:
            changes["slot"] = slot
        self._queue.put(job_id, {**entry, **changes})
        self._queue.put(served_key(entry.get("owner", "")), now)
        return True

    def hold(self, job_id: int) -> None:
        """The job is back in the fair queue, not handed to Modal (its worker gave it back
        unstarted); its slot is free."""
        entry = self._queue.get(job_id)
        if entry is not None:
            self._queue.put(job_id, {**entry, "spawned_at": None, "slot": None})
            if entry.get("slot") is not None:
                self.release_slot(entry["slot"], job_id)

    def queue_state(self) -> tuple[dict[int, dict], dict[str, float], dict[int, dict]]:
        """One streaming read of the queue: (job id -> entry for every job queued or running,
        owner -> when its last job was handed to Modal, slot -> its holder {"job", "at"})."""
        entries, served, slots = {}, {}, {}
        for key, value in self._queue.items():
            if isinstance(key, int):
                entries[key] = value
            elif isinstance(key, str) and key.startswith("served:"):
                served[key[len("served:"):]] = value
            elif isinstance(key, str) and key.startswith("slot:"):
                slots[int(key[len("slot:"):])] = value
        return entries, served, slots

    def delete_finished_before(self, cutoff: float) -> int:
        """Forget finished jobs older than `cutoff` (their fetch results); returns how many. The
        records kept are re-written when their last write is older than REFRESH_SECONDS, so that
        none expires (a Dict entry does after 7 idle days) before the retention says. Iterates the
        whole Dict: for the scheduled cleaner, not for requests."""
        now, removed = time.time(), 0
        for key, record in list(self._jobs.items()):
            if isinstance(key, str) and key.startswith("idem:") and now - record.get("at", 0) > IDEMPOTENCY_SECONDS:
                self._jobs.pop(key, None)
                continue
            if not isinstance(key, int) or not isinstance(record, dict):
                continue
            if record.get("status") in TERMINAL and (record.get("finished_at") or 0) < cutoff:
                self._jobs.pop(key, None)
                for attempt in range(1, record.get("attempts", 0) + 2):
                    self._jobs.pop(claim_key(key, attempt), None)
                for spawn in range(1, record.get("attempts", 0) + 3):  # the usual spawns; any more expire
                    self._jobs.pop(spawn_key(key, spawn), None)
                for extra in (_beat_key(key), call_key(key), progress_key(key), preview_key(key), cancel_key(key)):
                    self._jobs.pop(extra, None)
                self._inputs.pop(key, None)
                removed += 1
            elif now - record.get(TOUCHED, 0) > REFRESH_SECONDS:
                self._jobs.put(key, {**record, TOUCHED: now})
        return removed

    # --- reading
    def get(self, job_id: int) -> Job | None:
        record = self._jobs.get(job_id)
        return Job.from_record(record) if record is not None else None

    def inputs(self, job_id: int) -> dict[str, bytes]:
        return dict(self._inputs.get(job_id) or {})

    def unfinished(self, owner: str | None = None) -> tuple[int, float]:
        """(number of jobs queued or running, their summed eta in seconds), of one key when `owner`
        is given: one streaming read of the queue."""
        entries = [entry for entry in self.open_jobs().values() if owner is None or entry.get("owner") == owner]
        return len(entries), float(sum(entry.get("eta", 0.0) for entry in entries))

    def processing(self) -> list[Job]:
        """Every job queued or running (one read per job in the queue)."""
        jobs = (self.get(job_id) for job_id in self.open_jobs())
        return [job for job in jobs if job is not None and job.status == PROCESSING]

    def open_jobs(self) -> dict[int, dict]:
        """The queue: job id -> its entry, for every job queued or running."""
        return {job_id: entry for job_id, entry in self._queue.items() if isinstance(job_id, int)}

    def wait(self, job_id: int, timeout: float) -> Job | None:
        """Poll until the job is terminal or `timeout` seconds pass; return its latest record."""
        return wait_until_done(self.get, job_id, timeout, lambda remaining: time.sleep(min(POLL_SECONDS, remaining)))

    async def wait_async(self, job_id: int, timeout: float) -> Job | None:
        """`wait` holding no thread while it waits (each look is one Dict read, in a worker thread)."""
        deadline = time.monotonic() + timeout
        job = await asyncio.to_thread(self.get, job_id)
        while job is not None and not job.done and time.monotonic() < deadline:
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            job = await asyncio.to_thread(self.get, job_id)
        return job

    def change_count(self) -> int:
        return 0  # a Dict tells nobody of a change

    async def wait_change(self, job_id: int, timeout: float, since: int | None = None) -> None:
        """A Dict tells nobody of a change: the next look is after POLL_SECONDS."""
        await asyncio.sleep(max(0.0, min(POLL_SECONDS, timeout)))

    # --- the Modal dispatcher's
    def set_call(self, job_id: int, call_id: str) -> None:
        self._jobs.put(call_key(job_id), call_id)

    def call_of(self, job_id: int) -> str | None:
        return self._jobs.get(call_key(job_id))

    def set_waiting(self, job_id: int, model_ids: list[str]) -> None:
        """The job waits for these models to load before it is spawned (nothing holds a GPU meanwhile)."""
        entry = self._queue.get(job_id)
        if entry is not None:
            self._queue.put(job_id, {**entry, "waiting_for": list(model_ids)})

    def _forget(self, job_ids: list[int]) -> None:
        """Ended jobs leave the queue (and free the GPU slot they held)."""
        for job_id in job_ids:
            self._inputs.pop(job_id, None)
            entry = self._queue.pop(job_id, None)
            if isinstance(entry, dict) and entry.get("slot") is not None:
                self.release_slot(entry["slot"], job_id)
