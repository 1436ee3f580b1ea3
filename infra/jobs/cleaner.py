"""The cache cleaner: outputs past their expiry (`temp: yes` outputs, uploads), job records past
their retention (`SDAPI_JOB_RETENTION_SECONDS`) and download scratch folders no load owns.

`clean()` is one pass. Locally it runs on a timer thread every `cleanup_interval` seconds (read
live: 0 pauses it, update_server can start or stop it); on Modal a scheduled function runs the
same pass; `clear_cache` runs it and also unloads the models from
memory (the timer does not: that would make the next job after every pass a cold one). Expired
objects are refused by the file route the moment they expire; the cleaner frees their space.
"""

from __future__ import annotations

import logging
import time

from infra.jobs.timer import Repeating

log = logging.getLogger(__name__)


class CacheCleaner:
    def __init__(self, storage, jobs, weights, settings):
        self.storage, self.jobs, self.weights, self.settings = storage, jobs, weights, settings
        self._timer = Repeating("cache-cleaner", lambda: settings.cleanup_interval, self.clean)

    def clean(self) -> dict:
        """One pass; what it freed."""
        outputs, output_bytes = self.storage.remove_expired()
        jobs = self.jobs.delete_finished_before(time.time() - self.settings.job_retention_seconds)
        scratch, scratch_bytes = self.weights.remove_stale_scratch()
        report = {
            "expired_outputs": outputs,
            "old_jobs": jobs,
            "download_scratch": scratch,
            "bytes_freed": output_bytes + scratch_bytes,
        }
        refused = getattr(self.storage, "cleanup_errors", [])  # OutputStorage: a bucket that refused, per bucket
        if refused:
            report["storage_errors"] = list(refused)
        if outputs or jobs or scratch:
            log.info("cache cleaner: %s", report)
        return report

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()
