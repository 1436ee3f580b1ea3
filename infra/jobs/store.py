"""Jobs: the record of one generation, and where records live.

A job is created `processing` with its output keys fixed up front (so `future_links` can be
given before it runs) and ends `success` or `failed`. Ids are random integers below 2**53:
unique, JSON-safe, and not guessable from another customer's id.

`SqliteJobStore` is the local side (WAL mode, safe across threads and restarts); the Modal side
(a `modal.Dict`) implements the same methods.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROCESSING, SUCCESS, FAILED = "processing", "success", "failed"
TERMINAL = (SUCCESS, FAILED)
MIN_ID, MAX_ID = 10_000_000, 2**53 - 1


@dataclass
class Job:
    id: int
    endpoint: str
    params: dict[str, Any]
    meta: dict[str, Any]
    output_keys: list[str]
    future_links: list[str]
    status: str = PROCESSING
    message: str | None = None
    eta: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    generation_time: float | None = None
    webhook: str | None = None
    track_id: str | None = None
    webhook_status: str = ""
    attempts: int = 0  # times a worker has started it (a worker that died mid-job leaves it started)
    owner: str = ""  # the key that submitted it, as `infra.limits.key_id` (never the key itself)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def models_used(params: dict) -> set[str]:
    """Every model id a job's parameters refer to (delete_model refuses to delete these)."""
    used = {params.get("model_id"), params.get("vae"), params.get("embedding"), params.get("motion_adapter"),
            params.get("face_restorer"), (params.get("upscale") or {}).get("model_id")}
    used.update(lora_id for lora_id, _ in params.get("loras", []))
    for net in params.get("controlnets", []):
        used.update((net["model_id"], net.get("preprocessor")))
    return {model_id for model_id in used if model_id}


def wait_until_done(get, job_id: int, timeout: float, pause) -> Job | None:
    """`get(job_id)` until the job is terminal or `timeout` seconds pass, calling `pause(remaining)`
    in between (each store waits its own way); the latest record."""
    deadline = time.monotonic() + timeout
    job = get(job_id)
    while job is not None and not job.done:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        pause(remaining)
        job = get(job_id)
    return job


_JSON_FIELDS = ("params", "meta", "output_keys", "future_links")
_COLUMNS = [f for f in Job.__dataclass_fields__]


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
            " webhook_status TEXT, attempts INTEGER DEFAULT 0, owner TEXT DEFAULT '')"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in (("attempts", "INTEGER DEFAULT 0"), ("owner", "TEXT DEFAULT ''")):
            if column not in columns:  # a database from an earlier version
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status)")
        self._db.execute("CREATE TABLE IF NOT EXISTS job_inputs (job_id INTEGER, name TEXT, data BLOB)")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._changes = 0  # bumped (under the lock) with every notify: `wait` never sleeps through one

    # --- writing
    def create(self, job: Job, inputs: dict[str, bytes] | None = None) -> Job:
        """Store a new job under a fresh random id (the id on `job` is replaced)."""
        with self._lock:
            while True:
                job.id = MIN_ID + secrets.randbelow(MAX_ID - MIN_ID)
                try:
                    self._db.execute("BEGIN")
                    self._db.execute(
                        f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                        self._row(job),
                    )
                except sqlite3.IntegrityError:
                    self._db.execute("ROLLBACK")
                    continue
                for name, data in (inputs or {}).items():
                    self._db.execute("INSERT INTO job_inputs VALUES (?, ?, ?)", (job.id, name, data))
                self._db.execute("COMMIT")
                return job

    def update(self, job_id: int, **changes: Any) -> None:
        for name in _JSON_FIELDS:
            if name in changes:
                changes[name] = json.dumps(changes[name])
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._changed:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*changes.values(), job_id))
            if changes.get("status") in TERMINAL:
                self._db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
            self._notify()

    def claim(self, job_id: int) -> bool:
        """Start a queued job: True for exactly one caller, False when it was cancelled, finished or
        already started. Counts the attempt."""
        with self._changed:
            cursor = self._db.execute(
                "UPDATE jobs SET started_at = ?, attempts = attempts + 1"
                " WHERE id = ? AND status = ? AND started_at IS NULL",
                (time.time(), job_id, PROCESSING),
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
        """Forget finished jobs older than `cutoff` (their fetch results); returns how many."""
        with self._changed:
            cursor = self._db.execute(
                "DELETE FROM jobs WHERE status IN (?, ?) AND finished_at < ?", (SUCCESS, FAILED, cutoff)
            )
            return cursor.rowcount

    # --- reading
    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def inputs(self, job_id: int) -> dict[str, bytes]:
        with self._lock:
            rows = self._db.execute("SELECT name, data FROM job_inputs WHERE job_id = ?", (job_id,)).fetchall()
        return {name: bytes(data) for name, data in rows}

    def unfinished(self) -> tuple[int, float]:
        """(number of jobs queued or running, their summed eta in seconds)."""
        with self._lock:
            count, eta = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(eta), 0) FROM jobs WHERE status = ?", (PROCESSING,)
            ).fetchone()
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

    def _notify(self) -> None:
        """Wake the waiters; call with the lock held."""
        self._changes += 1
        self._changed.notify_all()

    # --- rows
    @staticmethod
    def _row(job: Job) -> tuple:
        values = asdict(job)
        return tuple(json.dumps(values[c]) if c in _JSON_FIELDS else values[c] for c in _COLUMNS)

    @staticmethod
    def _job(row: tuple) -> Job:
        values = dict(zip(_COLUMNS, row))
        for name in _JSON_FIELDS:
            values[name] = json.loads(values[name])
        return Job(**values)
