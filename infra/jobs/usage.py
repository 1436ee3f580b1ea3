"""Per-key usage metering for operators who bill per call.

What is counted, per key (as `infra.limits.key_id`), endpoint and UTC day:
- `requests`: calls that passed the key check, whatever their answer; `errors`: those of them
  answered with an error envelope (bad input, unknown model, rate limit, ...).
- `jobs_succeeded` / `jobs_failed`: queued work that ended `success` / `failed`.
- `images`: images delivered by successful jobs; `video_seconds`: seconds of video delivered
  (frames / fps); `gpu_seconds`: the engine's time on the job, successful or not (GPU seconds on a
  GPU worker, CPU seconds locally); `steps`: the denoising steps that ran (a cancelled job counts
  only the steps before it stopped).

A `UsageMeter` adds counts up in memory and writes them to its store every
`usage_flush_seconds` (and when the process stops, and before a report): a request pays no write.
Job usage is written when the job ends. Stores: SQLite locally (one upsert per row); on Modal a
`modal.Dict`, where every flush is one new entry (the Dict has no atomic increment) and the
scheduled cleaner folds old entries into one.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from infra.jobs.params import VIDEO_KINDS
from infra.jobs.timer import Repeating

log = logging.getLogger(__name__)

COUNTERS = ("requests", "errors", "jobs_succeeded", "jobs_failed", "images", "video_seconds", "gpu_seconds", "steps")

Row = tuple[str, str, str]  # (day "YYYY-MM-DD", key id, endpoint)


def today(now: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y-%m-%d")


def add_counts(into: dict[str, float], counts: dict[str, float]) -> None:
    for name, value in counts.items():
        into[name] = into.get(name, 0) + value


@dataclass
class UsageTotals:
    """Summed rows, ready for the usage endpoint."""

    rows: dict[Row, dict[str, float]]

    def by_key(self, by_day: bool = False) -> list[dict]:
        keys: dict[str, dict] = {}
        for (day, key, endpoint), counts in sorted(self.rows.items()):
            entry = keys.setdefault(key, {"key_id": key, "total": dict.fromkeys(COUNTERS, 0), "endpoints": {}})
            add_counts(entry["total"], counts)
            add_counts(entry["endpoints"].setdefault(endpoint, dict.fromkeys(COUNTERS, 0)), counts)
            if by_day:
                add_counts(entry.setdefault("days", {}).setdefault(day, dict.fromkeys(COUNTERS, 0)), counts)
        return [_rounded(entry) for entry in keys.values()]


def _rounded(value, name: str = ""):
    """Counts as integers, seconds to the millisecond."""
    if isinstance(value, dict):
        return {k: _rounded(v, k) for k, v in value.items()}
    if name.endswith("_seconds"):
        return round(value, 3)
    if name in COUNTERS:
        return int(value)
    return value


# --------------------------------------------------------------------------- stores


class UsageStore(Protocol):
    """Where counts land: `SqliteUsageStore` locally, `DictUsageStore` on Modal
    (tests/jobs/test_usage_conformance.py holds both to the same behaviour)."""

    def add(self, rows: dict[Row, dict[str, float]]) -> None:
        """Add these counts to what is stored (never replace it)."""

    def rows(self, first_day: str, last_day: str) -> dict[Row, dict[str, float]]:
        """The summed counts of every row between two days, inclusive."""

    def compact(self) -> int:
        """Fold the store's entries into fewer without changing any sum; how many were folded."""


class SqliteUsageStore:
    """One row per (day, key, endpoint), incremented in place."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        columns = ", ".join(f"{name} REAL NOT NULL DEFAULT 0" for name in COUNTERS)
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS usage (day TEXT, key_id TEXT, endpoint TEXT, {columns}, "
            "PRIMARY KEY (day, key_id, endpoint))"
        )
        present = {row[1] for row in self._db.execute("PRAGMA table_info(usage)")}
        for name in COUNTERS:  # a counter added since the database was made
            if name not in present:
                self._db.execute(f"ALTER TABLE usage ADD COLUMN {name} REAL NOT NULL DEFAULT 0")
        self._lock = threading.Lock()

    def add(self, rows: dict[Row, dict[str, float]]) -> None:
        names = ", ".join(COUNTERS)
        marks = ", ".join("?" for _ in COUNTERS)
        updates = ", ".join(f"{n} = {n} + excluded.{n}" for n in COUNTERS)
        sql = (
            f"INSERT INTO usage (day, key_id, endpoint, {names}) VALUES (?, ?, ?, {marks}) "
            f"ON CONFLICT (day, key_id, endpoint) DO UPDATE SET {updates}"
        )
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row, counts in rows.items():
                    self._db.execute(sql, (*row, *(counts.get(n, 0) for n in COUNTERS)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def rows(self, first_day: str, last_day: str) -> dict[Row, dict[str, float]]:
        with self._lock:
            found = self._db.execute(
                f"SELECT day, key_id, endpoint, {', '.join(COUNTERS)} FROM usage WHERE day >= ? AND day <= ?",
                (first_day, last_day),
            ).fetchall()
        return {tuple(r[:3]): dict(zip(COUNTERS, r[3:], strict=True)) for r in found}

    def compact(self) -> int:
        return 0  # rows are already one per (day, key, endpoint)


class DictUsageStore:
    """On a `modal.Dict`: each flush is one entry `usage:<uuid>` holding its rows. `compact` (run
    by the scheduled cleaner) folds the entries into one, written anew each time: it first writes
    the sum together with the names of the entries it replaces (readers skip those), then deletes
    them, then drops the names — so a reader never counts anything twice, whenever it reads, and
    the history never sits idle long enough to expire."""

    PREFIX = "usage:"

    def __init__(self, store):
        self.store = store

    def add(self, rows: dict[Row, dict[str, float]]) -> None:
        if rows:
            self.store.put(f"{self.PREFIX}{uuid.uuid4().hex}", {"rows": _to_list(rows)})

    def rows(self, first_day: str, last_day: str) -> dict[Row, dict[str, float]]:
        entries = self._entries()
        replaced = {name for value in entries.values() for name in value.get("replaces", ())}
        total: dict[Row, dict[str, float]] = defaultdict(dict)
        for name, value in entries.items():
            if name in replaced:
                continue
            for day, key, endpoint, counts in value["rows"]:
                if first_day <= day <= last_day:
                    add_counts(total[(day, key, endpoint)], counts)
        return dict(total)

    def compact(self) -> int:
        """Fold every entry into one, written now: also what keeps a quiet store's history from expiring
        (a Dict entry goes after 7 days without a read or a write)."""
        entries = self._entries()
        if not entries:
            return 0
        replaced = {name for value in entries.values() for name in value.get("replaces", ())}
        live = {name: value for name, value in entries.items() if name not in replaced}
        total: dict[Row, dict[str, float]] = defaultdict(dict)
        for value in live.values():
            for day, key, endpoint, counts in value["rows"]:
                add_counts(total[(day, key, endpoint)], counts)
        name = f"{self.PREFIX}{uuid.uuid4().hex}"
        self.store.put(name, {"rows": _to_list(total), "replaces": sorted(live)})
        for old in [*live, *replaced]:
            self.store.pop(old, None)
        self.store.put(name, {"rows": _to_list(total)})
        return len(live)

    def _entries(self) -> dict[str, dict]:
        return {
            name: value
            for name, value in list(self.store.items())
            if isinstance(name, str) and name.startswith(self.PREFIX) and value is not None
        }


def _to_list(rows: dict[Row, dict[str, float]]) -> list:
    return [[*row, dict(counts)] for row, counts in rows.items()]


# --------------------------------------------------------------------------- the meter


class UsageMeter:
    """Counts in memory, flushed to the store on a timer, at stop and before each report."""

    def __init__(self, store: UsageStore, settings):
        self.store = store
        self.settings = settings
        self._pending: dict[Row, dict[str, float]] = defaultdict(dict)
        self._lock = threading.Lock()
        self._timer = Repeating("usage-flush", lambda: max(0.1, settings.usage_flush_seconds), self.flush)

    def count(self, key: str, endpoint: str, now: float | None = None, **counts: float) -> None:
        if not key:
            return
        with self._lock:
            add_counts(self._pending[(today(now), key, endpoint)], counts)

    def request(self, key: str, endpoint: str, error: bool) -> None:
        self.count(key, endpoint, requests=1, errors=int(error))

    def job(self, job, engine_seconds: float, steps: int = 0) -> None:
        """A finished job: what it delivered and what it cost (the steps that ran); written at once."""
        succeeded = job.status == "success"
        counts = {"jobs_succeeded": int(succeeded), "jobs_failed": int(not succeeded), "gpu_seconds": engine_seconds,
                  "steps": steps}
        if succeeded:
            if job.params.kind in VIDEO_KINDS:
                counts["video_seconds"] = job.params.seconds
            else:
                counts["images"] = len(job.output_keys)
        self.count(job.owner, job.endpoint, **counts)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(dict)
        if not pending:
            return
        try:
            self.store.add(pending)
        except Exception:  # keep the counts for the next flush rather than lose them
            log.exception("could not write usage; keeping it for the next flush")
            with self._lock:
                for row, counts in pending.items():
                    add_counts(self._pending[row], counts)

    def totals(self, first_day: str, last_day: str, keys: Iterable[str] | None = None) -> UsageTotals:
        self.flush()
        rows = self.store.rows(first_day, last_day)
        if keys is not None:
            wanted = set(keys)
            rows = {row: counts for row, counts in rows.items() if row[1] in wanted}
        return UsageTotals(rows)

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()
        self.flush()
