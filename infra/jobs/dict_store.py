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
- Iterating a Dict is slow (it streams every entry); the hot paths (fetch's eta, system_details,
  clear_queue) read one index entry instead. Only the cache cleaner iterates.
- Entries expire after 7 days without reads or writes: about the default job retention.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from infra.jobs.job import FAILED, JOB_FIELDS, MAX_ID, MIN_ID, PROCESSING, TERMINAL, Job, wait_until_done

# keys beside the job records (which are stored under their integer id)
UNFINISHED_KEY = "index:unfinished"  # {job id: eta} of every job queued or running
INDEX_LOCK_KEY = "lock:index:unfinished"
LOCK_LEASE_SECONDS = 10.0  # a lock older than this was left by a dead container and is taken over
POLL_SECONDS = 0.25  # how often `wait` looks at a job


def claim_key(job_id: int, attempt: int) -> str:
    """Written once (skip_if_exists) by whoever starts attempt `attempt` of a job, or cancels it."""
    return f"claim:{job_id}:{attempt}"


def _beat_key(job_id: int) -> str:
    return f"beat:{job_id}"


def _queued_key(job_id: int) -> str:
    return f"queued:{job_id}"


class DictJobStore:
    """`SqliteJobStore`'s interface on two `modal.Dict`s: `jobs` (records, claims, the index) and
    `inputs` (the input images of a job, encoded image bytes by name, deleted when the job ends).

    Claims. A job's record holds `attempts` (starts so far) and `started_at` (None while queued).
    Starting attempt n+1 means winning `claim:{id}:{n+1}` with `put(..., skip_if_exists=True)`;
    exactly one container wins it, then copies the start into the record. `cancel_queued` writes
    the same key to cancel a queued job, so a worker and clear_queue cannot both win: a job whose
    key the canceller lost is running and is left alone. The claim key is the truth when the
    record disagrees (a worker that died between winning the key and writing the record).

    The unfinished index. `UNFINISHED_KEY` maps the id of every job queued or running to its eta,
    so `unfinished()` is one read. It is read-modify-written under a lock made of a
    skip_if_exists key with a lease (`LOCK_LEASE_SECONDS`), taken over when its holder died.
    Readers never trust it blindly: `processing()` re-reads each record, and `recover()` drops
    ids of jobs that ended or vanished. Two containers taking over the same dead lock at once
    could lose one update of the index; the job itself is not lost (its record is the truth), it
    only goes uncounted until it ends.

    Recover. On Modal there is no process restart that marks "everything running is dead". A job
    is dead when it was started more than `stale_after` seconds ago and its worker gave no sign
    of life since (`heartbeat`, optional). With `stale_after` above the worker function's
    timeout, a stale job is certainly dead: Modal killed its worker at the timeout. `recover`
    (run by the scheduled cleaner) queues such jobs again while they have attempts left, else
    ends them `failed`; it also returns jobs that were never started within `stale_after` of
    being queued (their `.spawn` may have been lost with the web container), to be spawned
    again — a duplicate spawn is harmless, the claim lets only one run.
    """

    def __init__(self, jobs, inputs, stale_after: float = 2 * 3600):
        self._jobs, self._inputs = jobs, inputs
        self.stale_after = stale_after

    # --- writing
    def create(self, job: Job, inputs: dict[str, bytes] | None = None) -> Job:
        """Store a new job under a fresh random id (the id on `job` is replaced)."""
        while True:
            job.id = MIN_ID + secrets.randbelow(MAX_ID - MIN_ID)
            if self._jobs.put(job.id, job.to_record(), skip_if_exists=True):
                break
        if inputs:
            self._inputs.put(job.id, dict(inputs))
        self._jobs.put(_queued_key(job.id), time.time())
        with self._index() as index:
            index[job.id] = job.eta
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
        record.update(changes)
        self._jobs.put(job_id, record)
        if changes.get("status") in TERMINAL:
            self._forget_unfinished([job_id])

    def claim(self, job_id: int) -> bool:
        """Start a queued job: True for exactly one caller, False when it was cancelled, finished or
        already started. Counts the attempt."""
        record = self._jobs.get(job_id)
        if record is None or record["status"] != PROCESSING or record["started_at"] is not None:
            return False
        attempt = record["attempts"] + 1
        now = time.time()
        if not self._jobs.put(claim_key(job_id, attempt), now, skip_if_exists=True):
            return False
        self.update(job_id, started_at=now, attempts=attempt)
        return True

    def heartbeat(self, job_id: int) -> None:
        """A running job's worker is alive (optional: call it from a long job's worker so `recover`
        does not take the job for dead before `stale_after` has passed since the last beat)."""
        self._jobs.put(_beat_key(job_id), time.time())

    def cancel_queued(self, message: str) -> list[int]:
        """End every job not yet started as `failed` with `message`; running jobs are left alone.
        A job is cancelled by winning its next claim key, the one its worker would need."""
        cancelled = []
        for job_id in list(self._read_index()):
            record = self._jobs.get(job_id)
            if record is None or record["status"] != PROCESSING or record["started_at"] is not None:
                continue
            if self._jobs.put(claim_key(job_id, record["attempts"] + 1), time.time(), skip_if_exists=True):
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
        for job_id in list(self._read_index()):
            record = self._jobs.get(job_id)
            if record is None or record["status"] != PROCESSING:
                gone.append(job_id)
                continue
            started_at, attempts = record["started_at"], record["attempts"]
            if started_at is None:  # a claim the record does not show yet: its worker is starting, or died
                started_at = self._jobs.get(claim_key(job_id, attempts + 1))  # the claim's time
                attempts += started_at is not None
            if started_at is None:  # queued: spawn it again if it waited too long
                queued_at = self._jobs.get(_queued_key(job_id), record["created_at"])
                if now - queued_at > stale_after:
                    self._jobs.put(_queued_key(job_id), now)
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
                self._jobs.put(_queued_key(job_id), now)
                queued.append((record["created_at"], job_id))
        if gone:
            self._forget_unfinished(gone)
        return [job_id for _, job_id in sorted(queued)], [job_id for _, job_id in sorted(failed)]

    def delete_finished_before(self, cutoff: float) -> int:
        """Forget finished jobs older than `cutoff` (their fetch results); returns how many.
        Iterates the whole Dict: for the scheduled cleaner, not for requests."""
        old = [
            (key, record)
            for key, record in list(self._jobs.items())
            if isinstance(key, int) and record.get("status") in TERMINAL and (record.get("finished_at") or 0) < cutoff
        ]
        for job_id, record in old:
            self._jobs.pop(job_id, None)
            for attempt in range(1, record.get("attempts", 0) + 2):
                self._jobs.pop(claim_key(job_id, attempt), None)
            self._jobs.pop(_beat_key(job_id), None)
            self._jobs.pop(_queued_key(job_id), None)
            self._inputs.pop(job_id, None)
        return len(old)

    # --- reading
    def get(self, job_id: int) -> Job | None:
        record = self._jobs.get(job_id)
        return Job.from_record(record) if record is not None else None

    def inputs(self, job_id: int) -> dict[str, bytes]:
        return dict(self._inputs.get(job_id) or {})

    def unfinished(self) -> tuple[int, float]:
        """(number of jobs queued or running, their summed eta in seconds): one read of the index."""
        index = self._read_index()
        return len(index), float(sum(index.values()))

    def processing(self) -> list[Job]:
        """Every job queued or running (one read per job in the index)."""
        jobs = (self.get(job_id) for job_id in self._read_index())
        return [job for job in jobs if job is not None and job.status == PROCESSING]

    def wait(self, job_id: int, timeout: float) -> Job | None:
        """Poll until the job is terminal or `timeout` seconds pass; return its latest record."""
        return wait_until_done(self.get, job_id, timeout, lambda remaining: time.sleep(min(POLL_SECONDS, remaining)))

    # --- the unfinished index
    def _read_index(self) -> dict[int, float]:
        return dict(self._jobs.get(UNFINISHED_KEY) or {})

    def _forget_unfinished(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            self._inputs.pop(job_id, None)
        with self._index() as index:
            for job_id in job_ids:
                index.pop(job_id, None)

    @contextmanager
    def _index(self) -> Iterator[dict[int, float]]:
        """The index to change in place, written back under the Dict lock."""
        with dict_lock(self._jobs, INDEX_LOCK_KEY):
            index = self._read_index()
            yield index
            self._jobs.put(UNFINISHED_KEY, index)


@contextmanager
def dict_lock(d, key: str, lease: float = LOCK_LEASE_SECONDS) -> Iterator[None]:
    """A lock across containers on a Dict: held by whoever wrote `key` (skip_if_exists). A lock
    older than `lease` seconds was left by a dead holder and is taken over; hold it for a few
    Dict operations only. Released only by its holder (checked by a random token)."""
    token = secrets.token_hex(8)
    pause = 0.002
    while not d.put(key, {"token": token, "expires": time.time() + lease}, skip_if_exists=True):
        held = d.get(key)
        if held is not None and held.get("expires", 0) < time.time():
            d.pop(key, None)  # two takers at once: see DictJobStore's docstring
            continue
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    try:
        yield
    finally:
        held = d.get(key)
        if held is not None and held.get("token") == token:
            d.pop(key, None)

