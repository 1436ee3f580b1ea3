"""The progress reporter (infra/jobs/progress.py) on a real job store, the local workers' fair queue
(infra/jobs/dispatch.FairQueue), and the Cancel-After duration syntax."""

from __future__ import annotations

import time

import pytest

from infra.engine.protocol import Cancelled
from infra.jobs.dispatch import FairQueue
from infra.jobs.progress import ProgressReporter, queued_snapshot, wire
from infra.jobs.store import SqliteJobStore
from models.fields import parse_duration
from tests.conftest import new_job


@pytest.fixture
def jobs(tmp_path):
    return SqliteJobStore(tmp_path / "jobs.sqlite3")


def started(jobs, **params):
    job = jobs.create(new_job(**params))
    assert jobs.claim(job.id)
    return jobs.get(job.id)


def test_the_history_is_numbered_monotonic_and_ends_at_100(jobs):
    job = started(jobs, steps=10, seeds=(1, 2))
    reporter = ProgressReporter(job, jobs, interval=0.01).start()
    reporter.stage("denoising")
    for index in range(2):
        reporter.image(index)
        for _ in range(10):
            reporter.step()
            time.sleep(0.003)
    reporter.finish()
    reporter.close()
    history = jobs.progress(job.id)
    assert [entry["seq"] for entry in history] == list(range(1, len(history) + 1))
    percents = [entry["percent"] for entry in history]
    assert percents == sorted(percents) and percents[-1] == 100 and max(percents[:-1]) <= 99
    assert history[-1]["step"] == history[-1]["total_steps"] == 20 and history[-1]["images"] == 2
    assert any(entry["image"] == 2 for entry in history)
    running = [entry for entry in history if entry["eta"] is not None]
    assert running and all(entry["eta"] >= 0 for entry in running)
    assert set(wire(history[-1])) == {"percent", "step", "total_steps", "image", "images", "stage"}


def test_a_second_attempt_goes_on_numbering_and_never_shows_less(jobs):
    job = started(jobs, steps=10)
    first = ProgressReporter(job, jobs, interval=0.01).start()
    first.stage("denoising")
    for _ in range(6):
        first.step()
    first.close()  # the worker died here; the job runs again from the start
    second = ProgressReporter(jobs.get(job.id), jobs, interval=0.01).start()
    second.step()
    second.close()
    history = jobs.progress(job.id)
    assert [entry["seq"] for entry in history] == list(range(1, len(history) + 1))
    assert [entry["percent"] for entry in history] == sorted(entry["percent"] for entry in history)


def test_a_cancel_request_or_a_passed_deadline_makes_the_next_step_raise(jobs):
    job = started(jobs, steps=50)
    reporter = ProgressReporter(job, jobs, interval=0.01).start()
    reporter.step()
    assert jobs.request_cancel(job.id, "Cancelled by the client") == "stopping"
    deadline = time.monotonic() + 5
    with pytest.raises(Cancelled, match="Cancelled by the client"):
        while time.monotonic() < deadline:
            reporter.step()
            time.sleep(0.005)
    reporter.close()

    late = new_job(steps=50)
    late.deadline_at = time.time() - 1
    late = jobs.create(late)
    jobs.claim(late.id)
    reporter = ProgressReporter(jobs.get(late.id), jobs, interval=0.01)
    with pytest.raises(Cancelled, match="deadline passed"):
        reporter.step()


def test_previews_are_due_every_n_steps_only_for_jobs_that_asked(jobs):
    job = new_job(steps=20)
    job.preview = True
    job = jobs.create(job)
    jobs.claim(job.id)
    reporter = ProgressReporter(jobs.get(job.id), jobs, interval=0.01, preview_every=5).start()
    due = []
    for _ in range(20):
        reporter.step()
        if reporter.wants_preview():
            due.append(reporter.steps_done)
            reporter.preview(b"jpeg-%d" % reporter.steps_done)
    reporter.close()
    assert due == [5, 10, 15, 20]
    assert jobs.preview(job.id) == b"jpeg-20" and jobs.progress(job.id)[-1]["previewed"] is True
    plain = started(jobs, steps=20)
    assert not ProgressReporter(plain, jobs, interval=0.01, preview_every=1).wants_preview()


def test_a_queued_job_shows_stage_queued_at_zero():
    assert queued_snapshot(new_job(steps=7, seeds=(1, 2, 3))) == {
        "percent": 0, "step": 0, "total_steps": 21, "image": 0, "images": 3, "stage": "queued"}


def test_the_fair_queue_takes_keys_in_turn_within_a_priority():
    queue = FairQueue()
    for n in range(3):
        queue.put(100 + n, "a", "normal")
    for n in range(2):
        queue.put(200 + n, "b", "normal")
    queue.put(300, "c", "low")
    queue.put(400, "a", "high")
    assert queue.lengths() == {"high": 1, "normal": 5, "low": 1}
    assert queue.order() == [400, 100, 200, 101, 201, 102, 300]
    queue.discard(200)
    assert [queue.get() for _ in range(6)] == [400, 100, 201, 101, 102, 300]
    queue.stop_one()
    assert queue.get() is None


@pytest.mark.parametrize(("text", "seconds"), [("30", 30), ("2.5", 2.5), ("45s", 45), ("5m", 300), ("1h30m", 5400),
                                               ("1.5h", 5400), ("500ms", 0.5), (" 2M ", 120)])
def test_cancel_after_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "-3s", "1x", "m5"])
def test_cancel_after_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError):
        parse_duration(text)
