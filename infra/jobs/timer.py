"""A background thread that runs an action every `interval()` seconds until stopped (the cache
cleaner's passes, the usage meter's flushes). The interval is read before every wait, so a
setting changed by update_server applies from the next round; an interval of 0 (or less) pauses
the timer until it is set again (looked at every `PAUSED_POLL_SECONDS`); a failing round is
logged and the timer goes on."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PAUSED_POLL_SECONDS = 1.0


class Repeating:
    def __init__(self, name: str, interval: Callable[[], float], action: Callable[[], object]):
        self.name, self.interval, self.action = name, interval, action
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True, name=self.name)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while True:
            interval = self.interval()
            if self._stop.wait(interval if interval > 0 else PAUSED_POLL_SECONDS):
                return
            if interval <= 0 or self.interval() <= 0:  # paused (or paused meanwhile)
                continue
            try:
                self.action()
            except Exception:  # a failed round must not end the timer
                log.exception("%s failed", self.name)
