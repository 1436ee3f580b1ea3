"""Per-key limits: requests per minute (in this process: on Modal, per web container) and jobs
queued or running at once (counted in the job store, so across containers). Over a limit the
answer is ModelsLab's "Rate limit exceeded" with HTTP 429. Keys are identified by a short hash,
never stored or logged themselves."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict, deque

from models.errors import RateLimited

WINDOW_SECONDS = 60.0


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (what job records and limits keep)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class RateLimiter:
    """A sliding one-minute window of request times per key; the limit is read from the settings
    on every call, so update_server changes it at once."""

    def __init__(self, settings):
        self.settings = settings
        self._times: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, caller: str) -> None:
        limit = self.settings.rate_limit_per_minute
        if limit <= 0:
            return
        now = time.monotonic()
        with self._lock:
            times = self._times[caller]
            while times and times[0] <= now - WINDOW_SECONDS:
                times.popleft()
            if len(times) >= limit:
                retry = max(1, round(times[0] + WINDOW_SECONDS - now))
                raise RateLimited(
                    "Rate limit exceeded",
                    tip=f"This key may make {limit} requests a minute; try again in {retry} s.",
                )
            times.append(now)


def check_job_cap(jobs, caller: str, settings) -> None:
    """Refuse a new job while the key already has `max_jobs_per_key` queued or running."""
    cap = settings.max_jobs_per_key
    if cap <= 0:
        return
    mine, _ = jobs.unfinished(owner=caller)
    if mine >= cap:
        raise RateLimited(
            "Rate limit exceeded",
            tip=f"This key has {mine} jobs queued or running (limit {cap}); fetch their results first.",
        )
