"""The `JobStore` protocol (infra/jobs/store.py), one suite run against every implementation: the
local `SqliteJobStore` and the Modal side's `DictJobStore` on in-memory `modal.Dict` stand-ins
(tests/modal/standins.py). A behaviour difference between local and Modal is a failing test here.
The Dict store's own mechanics (claim keys, the index, staleness) are in test_dict_store.py."""

from __future__ import annotations

import threading
import time

import pytest

from infra.jobs.dict_store import DictJobStore
from infra.jobs.job import FAILED, MAX_ID, PROCESSING, SUCCESS
from infra.jobs.store import SqliteJobStore
from tests.conftest import new_job, race
from tests.modal.standins import FakeDict

PNG = b"\x89PNG\r\n\x1a\n-not-really"


def finish(store, job_id: int, status: str = SUCCESS, at: float | None = None) -> None:
    store.update(job_id, status=status, finished_at=time.time() if at is None else at)


@pytest.fixture(params=["sqlite", "modal-dict"])
def store(request, tmp_path):
    """Every job store the runtime can be built with: the local one and the Modal one (on Dict stand-ins)."""
    if request.param == "sqlite":
        return SqliteJobStore(tmp_path / "jobs.sqlite3")
    return DictJobStore(FakeDict(), FakeDict(), FakeDict())


def recover_dead(store, max_attempts: int, message: str):
    """`recover` where every started job's worker is dead: at start-up for SQLite; for the Dict,
    the jobs started more than `stale_after` (here 0) seconds ago, every job handed to Modal (its
    dispatcher hands a job out before anything can start it; one the fair queue still holds is not
    lost, and its dispatcher hands it out: tests/jobs/test_dispatcher_conformance.py)."""
    if isinstance(store, DictJobStore):
        for job_id, entry in store.open_jobs().items():
            store.mark_spawned(job_id, store.claim_spawn(job_id, entry))
        time.sleep(0.01)  # strictly older than the claim
        return store.recover(max_attempts, message, stale_after=0)
    return store.recover(max_attempts, message)


def test_create_get_update_round_trip(store):
    job = store.create(new_job(eta=2.5, width=64), {"init_image": PNG})
    assert 0 < job.id <= MAX_ID
    got = store.get(job.id)
    assert got == job and got.status == PROCESSING and got.params.width == 64 and got.eta == 2.5
    assert store.inputs(job.id) == {"init_image": PNG}

    store.update(job.id, meta={"seed": 8, "facts": [1, 2]}, webhook_status="delivering")
    got = store.get(job.id)
    assert got.meta == {"seed": 8, "facts": [1, 2]} and got.webhook_status == "delivering"
    got.meta["seed"] = "changed on the returned copy only"
    assert store.get(job.id).meta["seed"] == 8
    assert store.get(12345678) is None
    store.update(12345678, status=FAILED)  # an unknown id changes nothing
    assert store.get(12345678) is None


@pytest.mark.parametrize("status", [SUCCESS, FAILED])
def test_inputs_are_dropped_when_the_job_ends(store, status):
    job = store.create(new_job(), {"init_image": PNG, "mask_image": PNG[::-1]})
    other = store.create(new_job(), {"init_image": PNG})
    finish(store, job.id, status)
    assert store.inputs(job.id) == {}
    assert store.inputs(other.id) == {"init_image": PNG}


def test_ids_are_unique(store):
    ids = {store.create(new_job()).id for _ in range(200)}
    assert len(ids) == 200 and all(isinstance(i, int) for i in ids)


def test_claim_succeeds_exactly_once_with_8_threads_racing(store):
    for _ in range(5):
        job = store.create(new_job())
        assert race(8, lambda: store.claim(job.id)).count(True) == 1
        got = store.get(job.id)
        assert got.attempts == 1 and got.started_at is not None and got.status == PROCESSING


def test_claim_refuses_finished_and_unknown_jobs(store):
    job = store.create(new_job())
    finish(store, job.id, FAILED)
    assert store.claim(job.id) is False
    assert store.claim(12345678) is False


def test_cancel_queued_cancels_only_jobs_not_started(store):
    queued = [store.create(new_job(), {"init_image": PNG}).id for _ in range(3)]
    running = store.create(new_job(), {"init_image": PNG}).id
    done = store.create(new_job()).id
    assert store.claim(running)
    finish(store, done)

    cancelled = store.cancel_queued("cancelled by clear_queue")
    assert sorted(cancelled) == sorted(queued)
    for job_id in queued:
        job = store.get(job_id)
        assert job.status == FAILED and job.message == "cancelled by clear_queue" and job.finished_at
        assert store.inputs(job_id) == {}
        assert store.claim(job_id) is False  # a worker spawned for it finds nothing to do
    assert store.get(running).status == PROCESSING and store.inputs(running) == {"init_image": PNG}
    assert store.get(done).status == SUCCESS
    assert store.cancel_queued("again") == []


def test_cancel_and_claim_racing_never_both_win(store):
    """Workers claiming while clear_queue cancels: every job is either run (claimed once, not
    cancelled) or cancelled (never claimed)."""
    ids = [store.create(new_job()).id for _ in range(20)]
    claimed: list[int] = []
    lock = threading.Lock()

    def work():
        for job_id in ids:
            if store.claim(job_id):
                with lock:
                    claimed.append(job_id)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    cancelled = store.cancel_queued("cancelled")
    for thread in threads:
        thread.join(30)
    assert len(claimed) == len(set(claimed))
    assert not set(claimed) & set(cancelled)
    assert set(claimed) | set(cancelled) == set(ids)
    for job_id in cancelled:
        assert store.get(job_id).status == FAILED
    for job_id in claimed:
        assert store.get(job_id).status == PROCESSING and store.get(job_id).attempts == 1


def test_wait_returns_at_the_terminal_state(store):
    job = store.create(new_job())
    timer = threading.Timer(0.1, finish, args=(store, job.id))
    timer.start()
    try:
        got = store.wait(job.id, timeout=30)
    finally:
        timer.cancel()
    assert got.status == SUCCESS


def test_wait_returns_the_job_still_processing_at_the_timeout(store):
    job = store.create(new_job())
    started = time.monotonic()
    got = store.wait(job.id, timeout=0.3)
    assert got.status == PROCESSING and got.id == job.id
    assert time.monotonic() - started >= 0.3
    assert store.wait(job.id, timeout=0).status == PROCESSING
    assert store.wait(12345678, timeout=5) is None


def test_unfinished_and_processing_count_queued_and_running_jobs(store):
    assert store.unfinished() == (0, 0)
    ids = [store.create(new_job(eta=eta)).id for eta in (1.0, 2.0, 4.0)]
    assert store.claim(ids[0])
    assert store.unfinished() == (3, 7.0)
    finish(store, ids[1])
    count, eta = store.unfinished()
    assert (count, eta) == (2, 5.0)
    assert sorted(job.id for job in store.processing()) == sorted([ids[0], ids[2]])
    finish(store, ids[0], FAILED)
    finish(store, ids[2])
    assert store.unfinished() == (0, 0) and store.processing() == []


def test_recover_queues_dead_jobs_again_or_fails_them(store):
    never_started = store.create(new_job()).id
    retried = store.create(new_job()).id
    exhausted = store.create(new_job(), {"init_image": PNG}).id
    assert store.claim(retried)
    assert store.claim(exhausted)
    store.update(exhausted, attempts=2)

    queued, failed = recover_dead(store, 2, "gave up")
    assert retried in queued and never_started in queued and failed == [exhausted]
    assert store.get(exhausted).status == FAILED and store.get(exhausted).message == "gave up"
    assert store.inputs(exhausted) == {}
    assert store.get(retried).started_at is None and store.get(retried).attempts == 1
    assert store.claim(retried)  # the second attempt
    assert store.get(retried).attempts == 2
    queued, failed = recover_dead(store, 2, "gave up")
    assert failed == [retried]


def test_delete_finished_before_forgets_old_finished_jobs_only(store):
    now = time.time()
    old = store.create(new_job()).id
    old_failed = store.create(new_job()).id
    recent = store.create(new_job()).id
    running = store.create(new_job()).id
    finish(store, old, SUCCESS, at=now - 100)
    finish(store, old_failed, FAILED, at=now - 100)
    finish(store, recent, SUCCESS, at=now)
    assert store.delete_finished_before(now - 50) == 2
    assert store.get(old) is None and store.get(old_failed) is None
    assert store.get(recent).status == SUCCESS and store.get(running).status == PROCESSING
    assert store.delete_finished_before(now - 50) == 0


# --------------------------------------------------------------------------- lifecycle (issue 17)


def test_new_job_fields_round_trip(store):
    job = new_job()
    job.priority, job.deadline_at, job.webhook_events, job.preview = "high", time.time() + 30, ["started", "completed"], True
    created = store.create(job)
    got = store.get(created.id)
    assert (got.priority, got.webhook_events, got.preview, got.cancelled) == ("high", ["started", "completed"], True, False)
    assert got.deadline_at == pytest.approx(job.deadline_at)


def test_progress_history_and_preview_while_running_preview_dropped_at_the_end(store):
    job = store.create(new_job())
    assert store.progress(job.id) == [] and store.preview(job.id) is None
    assert store.claim(job.id)
    history = [{"seq": 1, "percent": 0, "stage": "loading_model"}, {"seq": 2, "percent": 50, "stage": "denoising"}]
    store.set_progress(job.id, history)
    store.set_preview(job.id, b"jpeg-1")
    store.set_preview(job.id, b"jpeg-2")  # overwritten in place
    assert store.progress(job.id) == history and store.preview(job.id) == b"jpeg-2"
    finish(store, job.id)
    assert store.preview(job.id) is None
    assert store.progress(job.id) == history  # kept for a stream that reconnects after the end


def test_cancel_of_a_queued_job_ends_it_and_no_worker_starts_it(store):
    job = store.create(new_job(), {"init_image": PNG})
    assert store.request_cancel(job.id, "Cancelled by the client") == "cancelled"
    got = store.get(job.id)
    assert (got.status, got.message, got.cancelled) == (FAILED, "Cancelled by the client", True)
    assert not store.claim(job.id) and store.inputs(job.id) == {}
    assert store.request_cancel(job.id, "again") == "ended"
    assert store.request_cancel(12345678, "x") == "missing"


def test_cancel_of_a_running_job_is_a_request_its_worker_reads(store):
    job = store.create(new_job())
    assert store.claim(job.id)
    assert store.cancel_requested(job.id) is None
    assert store.request_cancel(job.id, "Cancelled by the client") == "stopping"
    assert store.get(job.id).status == PROCESSING  # the worker ends it
    assert store.cancel_requested(job.id) == "Cancelled by the client"


def test_cancel_and_claim_racing_on_one_job_one_of_them_wins(store):
    for _ in range(10):
        job = store.create(new_job())
        turns = iter([lambda: store.claim(job.id), lambda: store.request_cancel(job.id, "c")])
        lock = threading.Lock()

        def one(turns=turns, lock=lock):
            with lock:
                act = next(turns)
            return act()

        outcomes = race(2, one)
        claimed = next(o for o in outcomes if isinstance(o, bool))
        cancel = next(o for o in outcomes if isinstance(o, str))
        # either the worker started it (and the cancel became a request) or the cancel ended it unstarted
        assert (claimed, cancel) in ((True, "stopping"), (False, "cancelled"))


def test_idempotency_key_reserve_bind_replay_and_mismatch(store):
    assert store.remember_request("owner-a", "k1", "digest-1", ttl=60) == ("new", None)
    assert store.remember_request("owner-a", "k1", "digest-1", ttl=60) == ("same", None)  # first still creating
    store.bind_request("owner-a", "k1", 42)
    assert store.remember_request("owner-a", "k1", "digest-1", ttl=60) == ("same", 42)
    assert store.remember_request("owner-a", "k1", "digest-2", ttl=60) == ("different", 42)
    assert store.remember_request("owner-b", "k1", "digest-2", ttl=60) == ("new", None)  # keys are per API key
    store.forget_request("owner-b", "k1")  # refused: the key is free again
    assert store.remember_request("owner-b", "k1", "digest-3", ttl=60) == ("new", None)
    time.sleep(0.02)
    assert store.remember_request("owner-a", "k1", "digest-2", ttl=0.01) == ("new", None)  # expired: new


def test_idempotency_reservation_is_won_by_exactly_one_racer(store):
    outcomes = race(8, lambda: store.remember_request("owner", "same-key", "d", ttl=60))
    assert sorted(state for state, _ in outcomes) == ["new"] + ["same"] * 7


def test_wait_change_returns_on_the_jobs_progress_and_at_once_for_a_change_it_would_miss(store):
    import asyncio

    job = store.create(new_job())
    store.claim(job.id)

    async def scenario():
        since = store.change_count()
        store.set_progress(job.id, [{"seq": 1}])  # between the look and the wait
        started = time.monotonic()
        await store.wait_change(job.id, 5.0, since)
        missed_wait = time.monotonic() - started
        waiting = asyncio.create_task(store.wait_change(job.id, 5.0))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(store.set_progress, job.id, [{"seq": 1}, {"seq": 2}])
        started = time.monotonic()
        await asyncio.wait_for(waiting, 5.0)
        return missed_wait, time.monotonic() - started

    missed_wait, woken_after = asyncio.run(scenario())
    assert missed_wait < 1.0 and woken_after < 1.0  # neither sleeps its 5 s out
