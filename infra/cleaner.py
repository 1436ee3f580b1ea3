"""The cache cleaner: deletes outputs past their expiry (`temp: yes` outputs, uploads).

Locally it runs on a timer thread (setting `cleanup_interval`); on Modal a scheduled function
runs the same `clean`. Expired objects are already refused by the file route the moment they
expire; the cleaner frees their space.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class CacheCleaner:
    def __init__(self, storage, interval: float):
        self.storage = storage
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def clean(self) -> dict:
        """One pass; what it freed."""
        removed, freed = self.storage.remove_expired()
        if removed:
            log.info("cache cleaner: removed %d expired outputs (%d bytes)", removed, freed)
        return {"expired_outputs": removed, "bytes_freed": freed}

    def start(self) -> None:
        if self.interval > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True, name="cache-cleaner")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.clean()
            except Exception:  # a failed pass must not end the timer
                log.exception("cache cleaner pass failed")
