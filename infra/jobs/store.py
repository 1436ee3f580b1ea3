"""Where job records live: the `JobStore` protocol every store implements, and `SqliteJobStore`,
the local side (WAL mode, safe across threads and restarts). The Modal side is
`infra.jobs.dict_store.DictJobStore`; tests/jobs/test_store_conformance.py holds both to the same
behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from infra.jobs.job import (
    FAILED,
    IDEMPOTENCY_SECONDS,
    JOB_FIELDS,
    MAX_ID,
    MIN_ID,
    PROCESSING,
    SUCCESS,
    TERMINAL,
    Job,
    wait_until_done,
)


class JobStore(Protocol):
    """Job records, their input images, and the few atomic steps a job's life needs."""

    def create(self, job: Job, inputs: dict[str, bytes] | None = None) -> Job:
        """Store a new job under a fresh random id (the id on `job` is replaced); its inputs beside it."""

    def update(self, job_id: int, **changes: Any) -> None:
        """Change fields of a record; a terminal status also drops the job's inputs."""

    def claim(self, job_id: int, runner: str | None = None) -> bool:
        """Start a queued job: True for exactly one caller, False when it was cancelled, finished or
        started by another runner. The `runner` that started the job may claim it again (a Modal
        input delivered again after its container died). Counts the attempt."""

    def cancel_queued(self, message: str) -> list[int]:
        """End every job not yet started as `failed` with `message`; running jobs are left alone."""

    def recover(self, max_attempts: int, message: str) -> tuple[list[int], list[int]]:
        """Jobs a dead worker left `processing`: (ids to run again, ids ended `failed` with `message`)."""

    def delete_finished_before(self, cutoff: float) -> int:
        """Forget finished jobs older than `cutoff`; how many."""

    def get(self, job_id: int) -> Job | None: ...

    def inputs(self, job_id: int) -> dict[str, bytes]: ...

    def unfinished(self, owner: str | None = None) -> tuple[int, float]:
        """(number of jobs queued or running, their summed eta in seconds); of one key with `owner`."""

    def processing(self) -> list[Job]:
        """Every job queued or running."""

    def wait(self, job_id: int, timeout: float) -> Job | None:
        """The job's record once it is terminal, or after `timeout` seconds."""

    async def wait_async(self, job_id: int, timeout: float) -> Job | None:
        """`wait`, holding no thread while it waits (the web tier waits for many jobs at once)."""

    def change_count(self) -> int:
        """A number that changes with every change the store can tell of (0 where it tells none)."""

    async def wait_change(self, job_id: int, timeout: float, since: int | None = None) -> None:
        """Return after the job changed (its record or its progress), or after `timeout` seconds,
        holding no thread (a stream sleeps on it between looks); at once when `change_count()`
        is no longer `since` (a change between the caller's look and this wait is not slept through)."""

    # --- a running job's progress, preview and cancel request (infra.jobs.progress)
    def set_progress(self, job_id: int, history: list[dict]) -> None:
        """The job's progress snapshots so far (one writer: the worker running it)."""

    def progress(self, job_id: int) -> list[dict]:
        """The job's progress snapshots, oldest first ([] before it started)."""

    def set_preview(self, job_id: int, jpeg: bytes) -> None:
        """The job's latest preview (dropped when the job ends)."""

    def preview(self, job_id: int) -> bytes | None: ...

    def request_cancel(self, job_id: int, message: str) -> str:
        """Cancel a job: "cancelled" (it was queued: it ended `failed` with `message` and
        `cancelled`, and never starts), "stopping" (it runs: its worker stops it at its next step),
        "ended" (it had ended already) or "missing"."""

    def cancel_requested(self, job_id: int) -> str | None:
        """The message of a cancel requested for a running job, or None."""

    # --- idempotency keys: (owner, key) -> the job the first request created
    def remember_request(self, owner: str, key: str, digest: str, ttl: float) -> tuple[str, int | None]:
        """Reserve `key` of `owner` for a request whose body has `digest`: ("new", None) when this
        caller reserved it (then `bind_request` or `forget_request`), ("same", job id or None while
        the first request is still creating its job) or ("different", job id). A reservation older
        than `ttl` seconds counts as absent."""

    def bind_request(self, owner: str, key: str, job_id: int) -> None: ...

    def forget_request(self, owner: str, key: str) -> None:
        """The reserving request created no job (refused): the key is free again."""

_JSON_FIELDS = ("params", "meta", "output_keys", "future_links", "await_models", "webhook_events")
_COLUMNS = list(JOB_FIELDS)
# columns added since the first release: (name, type) for ALTER TABLE on an older database
_ADDED_COLUMNS = (("attempts", "INTEGER DEFAULT 0"), ("owner", "TEXT DEFAULT ''"), ("storage_id", "TEXT DEFAULT 'local'"),
                  ("expires_at", "REAL"), ("await_models", "TEXT DEFAULT '[]'"), ("schema_version", "INTEGER DEFAULT 1"),
                  ("runner", "TEXT DEFAULT ''"), ("priority", "TEXT DEFAULT 'normal'"), ("deadline_at", "REAL"),
                  ("webhook_events", "TEXT DEFAULT '[]'"), ("preview", "INTEGER DEFAULT 0"),
                  ("cancelled", "INTEGER DEFAULT 0"))


class SqliteJobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, endpoint TEXT, params TEXT, meta TEXT,"
            " output_keys TEXT, future_links TEXT, status TEXT, message TEXT, eta REAL, created_at REAL,"
            " started_at REAL, finished_at REAL, generation_time REAL, webhook TEXT, track_id TEXT,"
            " webhook_status TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in _ADDED_COLUMNS:
            if column not in columns:  # a new database, or one from an earlier version
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status)")
        self._db.execute("CREATE TABLE IF NOT EXISTS job_inputs (job_id INTEGER, name TEXT, data BLOB)")
        self._db.execute("CREATE TABLE IF NOT EXISTS job_state (job_id INTEGER PRIMARY KEY, history TEXT DEFAULT '[]',"
                         " preview BLOB, cancel TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS idempotency (owner TEXT, key TEXT, digest TEXT, job_id INTEGER,"
                         " created_at REAL, PRIMARY KEY (owner, key))")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._changes = 0  # bumped (under the lock) with every notify: `wait` never sleeps through one
        self._async_waiters: set = set()  # (event loop, asyncio.Event, job id) of each async wait

    # --- writing
    def create(self, job: Job, inputs: dict[str, bytes] | None = None) -> Job:
        """Store a new job under a fresh random id (the id on `job` is replaced)."""
        insert = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        with self._lock:
            while True:
                job.id = MIN_ID + secrets.randbelow(MAX_ID - MIN_ID)
                row = self._row(job)  # before the transaction: a job that cannot be stored leaves none open
                self._db.execute("BEGIN")
                try:
                    self._db.execute(insert, row)
                    for name, data in (inputs or {}).items():
                        self._db.execute("INSERT INTO job_inputs VALUES (?, ?, ?)", (job.id, name, data))
                except sqlite3.IntegrityError:
                    self._db.execute("ROLLBACK")
                    continue  # the id was taken: draw another
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return job

    def update(self, job_id: int, **changes: Any) -> None:
        if "params" in changes:
            changes["params"] = changes["params"].model_dump(mode="json")
        for name in _JSON_FIELDS:
            if name in changes:
                changes[name] = json.dumps(changes[name])
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._changed:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*changes.values(), job_id))
            if changes.get("status") in TERMINAL:
                self._db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
                self._db.execute("UPDATE job_state SET preview = NULL WHERE job_id = ?", (job_id,))
            self._notify(job_id)

    def claim(self, job_id: int, runner: str | None = None) -> bool:
        """Start a queued job: True for exactly one caller, False when it was cancelled, finished or
        started by another runner (the one that started it may claim it again). Counts the attempt."""
        with self._changed:
            cursor = self._db.execute(
                "UPDATE jobs SET started_at = ?, attempts = attempts + 1, runner = ?"
                " WHERE id = ? AND status = ? AND (started_at IS NULL OR (? != '' AND runner = ?))",
                (time.time(), runner or "", job_id, PROCESSING, runner or "", runner or ""),
            )
            return cursor.rowcount == 1  # no notify: waiters wait for the end, not the start

    def cancel_queued(self, message: str) -> list[int]:
        """End every job not yet started as `failed` with `message`; running jobs are left alone."""
        with self._changed:
            rows = self._db.execute(
                "UPDATE jobs SET status = ?, message = ?, finished_at = ? WHERE status = ? AND started_at IS NULL"
                " RETURNING id",
                (FAILED, message, time.time(), PROCESSING),
            ).fetchall()
            self._db.execute("DELETE FROM job_inputs WHERE job_id NOT IN (SELECT id FROM jobs WHERE status = ?)", (PROCESSING,))
            self._notify()
        return [row[0] for row in rows]

    def recover(self, max_attempts: int, message: str) -> tuple[list[int], list[int]]:
        """At start-up, for the jobs a dead process left `processing`: those never started, and those
        started fewer than `max_attempts` times, are queued again (oldest first); the others end
        `failed` with `message`. Returns (ids to queue, ids failed)."""
        with self._changed:
            self._db.execute("BEGIN IMMEDIATE")
            failed = [row[0] for row in self._db.execute(
                "UPDATE jobs SET status = ?, message = ?, finished_at = ?"
                " WHERE status = ? AND started_at IS NOT NULL AND attempts >= ? RETURNING id",
                (FAILED, message, time.time(), PROCESSING, max_attempts),
            ).fetchall()]
            self._db.execute("UPDATE jobs SET started_at = NULL WHERE status = ?", (PROCESSING,))
            queued = [row[0] for row in self._db.execute(
                "SELECT id FROM jobs WHERE status = ? ORDER BY created_at", (PROCESSING,)
            ).fetchall()]
            self._db.execute("DELETE FROM job_inputs WHERE job_id NOT IN (SELECT id FROM jobs WHERE status = ?)", (PROCESSING,))
            self._db.execute("COMMIT")
            self._notify()
        return queued, failed

    def delete_finished_before(self, cutoff: float) -> int:
        """Forget finished jobs older than `cutoff` (their fetch results and progress); returns how
        many. Idempotency keys older than IDEMPOTENCY_SECONDS go too."""
        with self._changed:
            cursor = self._db.execute(
                "DELETE FROM jobs WHERE status IN (?, ?) AND finished_at < ?", (SUCCESS, FAILED, cutoff)
            )
            self._db.execute("DELETE FROM job_state WHERE job_id NOT IN (SELECT id FROM jobs)")
            self._db.execute("DELETE FROM idempotency WHERE created_at < ?", (time.time() - IDEMPOTENCY_SECONDS,))
            return cursor.rowcount

    # --- progress, previews, cancel requests
    def set_progress(self, job_id: int, history: list[dict]) -> None:
        with self._changed:
            self._db.execute("INSERT INTO job_state (job_id, history) VALUES (?, ?)"
                             " ON CONFLICT (job_id) DO UPDATE SET history = excluded.history", (job_id, json.dumps(history)))
            self._notify(job_id)

    def progress(self, job_id: int) -> list[dict]:
        with self._lock:
            row = self._db.execute("SELECT history FROM job_state WHERE job_id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else []

    def set_preview(self, job_id: int, jpeg: bytes) -> None:
        with self._lock:  # only while the job runs: a late preview of an ended job is not kept
            self._db.execute("INSERT INTO job_state (job_id, preview) SELECT ?, ? WHERE EXISTS"
                             " (SELECT 1 FROM jobs WHERE id = ? AND status = ?)"
                             " ON CONFLICT (job_id) DO UPDATE SET preview = excluded.preview",
                             (job_id, jpeg, job_id, PROCESSING))

    def preview(self, job_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT preview FROM job_state WHERE job_id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def request_cancel(self, job_id: int, message: str) -> str:
        with self._changed:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ended = self._db.execute(
                    "UPDATE jobs SET status = ?, message = ?, finished_at = ?, cancelled = 1"
                    " WHERE id = ? AND status = ? AND started_at IS NULL",
                    (FAILED, message, time.time(), job_id, PROCESSING)).rowcount
                if ended:
                    self._db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
                    outcome = "cancelled"
                else:
                    row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    outcome = "missing" if row is None else "ended" if row[0] in TERMINAL else "stopping"
                    if outcome == "stopping":
                        self._db.execute("INSERT INTO job_state (job_id, cancel) VALUES (?, ?)"
                                         " ON CONFLICT (job_id) DO UPDATE SET cancel = excluded.cancel", (job_id, message))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._notify(job_id)
        return outcome

    def cancel_requested(self, job_id: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT cancel FROM job_state WHERE job_id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    # --- idempotency keys
    def remember_request(self, owner: str, key: str, digest: str, ttl: float) -> tuple[str, int | None]:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM idempotency WHERE owner = ? AND key = ? AND created_at < ?",
                                 (owner, key, now - ttl))
                added = self._db.execute("INSERT OR IGNORE INTO idempotency VALUES (?, ?, ?, NULL, ?)",
                                         (owner, key, digest, now)).rowcount
                row = self._db.execute("SELECT digest, job_id FROM idempotency WHERE owner = ? AND key = ?",
                                       (owner, key)).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if added:
            return "new", None
        return ("same" if row[0] == digest else "different"), row[1]

    def bind_request(self, owner: str, key: str, job_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE idempotency SET job_id = ? WHERE owner = ? AND key = ?", (job_id, owner, key))

    def forget_request(self, owner: str, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM idempotency WHERE owner = ? AND key = ? AND job_id IS NULL", (owner, key))

    # --- reading
    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def inputs(self, job_id: int) -> dict[str, bytes]:
        with self._lock:
            rows = self._db.execute("SELECT name, data FROM job_inputs WHERE job_id = ?", (job_id,)).fetchall()
        return {name: bytes(data) for name, data in rows}

    def unfinished(self, owner: str | None = None) -> tuple[int, float]:
        """(number of jobs queued or running, their summed eta in seconds); of one key with `owner`."""
        where, args = ("status = ? AND owner = ?", (PROCESSING, owner)) if owner is not None else ("status = ?", (PROCESSING,))
        with self._lock:
            count, eta = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(eta), 0) FROM jobs WHERE {where}", args).fetchone()
        return count, eta

    def processing(self) -> list[Job]:
        """Every job queued or running."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status = ?", (PROCESSING,)).fetchall()
        return [self._job(row) for row in rows]

    def wait(self, job_id: int, timeout: float) -> Job | None:
        """Block until the job is terminal or `timeout` seconds pass; return its latest record.
        Woken by the update that ends it: a change made between reading the record and starting to
        wait is not slept through (the change count read with the record tells)."""
        seen = [-1]

        def get(job_id: int) -> Job | None:
            with self._lock:
                seen[0] = self._changes
                row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(row) if row else None

        def pause(seconds: float) -> None:
            with self._changed:  # woken by any update, at the latest after half a second
                if self._changes == seen[0]:
                    self._changed.wait(min(seconds, 0.5))

        return wait_until_done(get, job_id, timeout, pause)

    async def wait_async(self, job_id: int, timeout: float) -> Job | None:
        """`wait` holding no thread: an asyncio event, set from the thread of every change, wakes it."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        waiter = (loop, woken, job_id)
        deadline = time.monotonic() + timeout
        with self._lock:
            self._async_waiters.add(waiter)
        try:
            while True:
                woken.clear()
                job = self.get(job_id)  # a local read: microseconds
                remaining = deadline - time.monotonic()
                if job is None or job.done or remaining <= 0:
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(remaining, 0.5))
        finally:
            with self._lock:
                self._async_waiters.discard(waiter)

    def change_count(self) -> int:
        with self._lock:
            return self._changes

    async def wait_change(self, job_id: int, timeout: float, since: int | None = None) -> None:
        """Until the job's next change (record or progress), or `timeout` seconds; at once when
        anything changed since `since`."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        waiter = (loop, woken, job_id)
        with self._lock:
            if since is not None and self._changes != since:
                return
            self._async_waiters.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout)
        finally:
            with self._lock:
                self._async_waiters.discard(waiter)

    def _notify(self, job_id: int | None = None) -> None:
        """Wake the waiters (the async ones of `job_id` only, when given); call with the lock held."""
        self._changes += 1
        self._changed.notify_all()
        for loop, woken, waits_for in self._async_waiters:
            if job_id is None or waits_for == job_id:
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                    loop.call_soon_threadsafe(woken.set)

    # --- rows
    @staticmethod
    def _row(job: Job) -> tuple:
        values = job.to_record()
        return tuple(json.dumps(values[c]) if c in _JSON_FIELDS else values[c] for c in _COLUMNS)

    @staticmethod
    def _job(row: tuple) -> Job:
        values = dict(zip(_COLUMNS, row))
        for name in _JSON_FIELDS:
            values[name] = json.loads(values[name])
        for name in ("preview", "cancelled"):
            values[name] = bool(values[name])
        return Job.from_record(values)
