"""The repeating timer behind the cache cleaner and the usage meter (infra/jobs/timer.py): its
interval is read live, so update_server can change, pause (0) and resume it."""

from __future__ import annotations

import threading
import time

from infra.jobs import timer
from infra.jobs.timer import Repeating


def test_an_interval_of_0_pauses_the_timer_and_a_positive_one_resumes_it(monkeypatch):
    monkeypatch.setattr(timer, "PAUSED_POLL_SECONDS", 0.01)
    interval = [0.0]
    rounds, ran = [], threading.Event()

    def action():
        rounds.append(1)
        ran.set()

    repeating = Repeating("test-timer", lambda: interval[0], action)
    repeating.start()
    try:
        time.sleep(0.2)  # paused: many polls, no round (and no busy loop of rounds)
        assert rounds == []
        interval[0] = 0.01  # update_server sets a positive interval: rounds begin
        assert ran.wait(10)
        interval[0] = 0.0
        time.sleep(0.1)  # let a round in flight finish
        paused_at = len(rounds)
        time.sleep(0.2)
        assert len(rounds) == paused_at  # paused again
    finally:
        repeating.stop()


def test_a_failing_round_does_not_end_the_timer():
    calls, twice = [], threading.Event()

    def failing():
        calls.append(1)
        if len(calls) >= 2:
            twice.set()
        raise RuntimeError("boom")

    repeating = Repeating("failing-timer", lambda: 0.01, failing)
    repeating.start()
    try:
        assert twice.wait(10)
    finally:
        repeating.stop()
