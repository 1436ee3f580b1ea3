"""What only the Modal side's job store does (infra/jobs/dict_store.py): records as plain dicts,
claim keys (re-claimed by the same runner), the queue of open jobs (no lock), staleness and
heartbeats, refreshing the records it keeps, on `modal.Dict` stand-ins. The behaviour it shares
with SQLite is held by test_store_conformance.py."""

from __future__ import annotations

import time

from infra.jobs.dict_store import DictJobStore, claim_key
from infra.jobs.job import FAILED, PROCESSING, SUCCESS
from tests.conftest import new_job, race
from tests.modal.standins import FakeDict

PNG = b"\x89PNG\r\n\x1a\n-not-really"


def finish(store, job_id: int, status: str = SUCCESS, at: float | None = None) -> None:
    store.update(job_id, status=status, finished_at=time.time() if at is None else at)


def dict_store(stale_after: float = 60.0) -> tuple[DictJobStore, FakeDict, FakeDict, FakeDict]:
    jobs, inputs, queue = FakeDict(), FakeDict(), FakeDict()
    return DictJobStore(jobs, inputs, queue, stale_after=stale_after), jobs, inputs, queue


def test_dict_records_are_plain_dicts_of_primitives():
    """Values are cloudpickled on Modal: a record must not need our classes to be read."""
    store, jobs, _, queue = dict_store()
    job = store.create(new_job())
    record = jobs.get(job.id)
    assert type(record) is dict and record["status"] == PROCESSING and record["params"]["prompt"] == "x"

    def primitive(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and primitive(v) for k, v in value.items())
        if isinstance(value, list):
            return all(primitive(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    assert primitive(record)
    assert primitive(queue.get(job.id)) and queue.get(job.id)["eta"] == 1.0


def test_dict_claim_key_decides_and_the_claimed_attempt_is_recorded():
    store, jobs, _, _ = dict_store()
    job = store.create(new_job())
    assert store.claim(job.id)
    assert claim_key(job.id, 1) in jobs and claim_key(job.id, 2) not in jobs
    # a container that won the key for attempt 2 elsewhere: nobody else may start that attempt
    store.update(job.id, started_at=None)
    jobs.put(claim_key(job.id, 2), {"at": time.time(), "runner": "in-elsewhere"})
    assert store.claim(job.id) is False
    assert store.cancel_queued("cancelled") == []  # it is running: left alone


def test_dict_recover_leaves_running_jobs_alone_until_stale():
    store, _, _, _ = dict_store(stale_after=60)
    job = store.create(new_job())
    assert store.claim(job.id)
    assert store.recover(2, "gave up") == ([], [])
    assert store.get(job.id).started_at is not None
    # with the claim long ago and no heartbeat, the worker is taken for dead
    store.update(job.id, started_at=time.time() - 120)
    assert store.recover(2, "gave up") == ([job.id], [])
    assert store.get(job.id).started_at is None and store.get(job.id).attempts == 1


def test_dict_heartbeat_keeps_a_long_job_alive():
    store, _, _, _ = dict_store(stale_after=60)
    job = store.create(new_job())
    assert store.claim(job.id)
    store.update(job.id, started_at=time.time() - 3600)
    store.heartbeat(job.id)
    assert store.recover(2, "gave up") == ([], [])
    assert store.get(job.id).started_at is not None


def test_dict_recover_spawns_a_job_never_started_again_once_per_stale_period():
    store, jobs, _, queue = dict_store(stale_after=60)
    job = store.create(new_job())
    queue.put(job.id, {**queue.get(job.id), "queued_at": time.time() - 120})
    assert store.recover(2, "gave up") == ([], [])  # held in the fair queue, however long: not lost
    spawn = store.claim_spawn(job.id, queue.get(job.id))
    assert spawn == 1 and store.claim_spawn(job.id, queue.get(job.id)) is None  # one container takes it
    assert store.mark_spawned(job.id, spawn)  # handed to Modal
    assert store.recover(2, "gave up") == ([], [])  # just spawned: on its way
    queue.put(job.id, {**queue.get(job.id), "spawned_at": time.time() - 120})  # two minutes ago, never started
    assert store.recover(2, "gave up") == ([job.id], [])
    assert store.recover(2, "gave up") == ([], [])  # not again on the next run
    assert store.claim(job.id)  # the duplicate spawn that finds it taken does nothing
    assert store.claim(job.id) is False


def test_dict_recover_counts_a_claim_whose_worker_died_before_recording_it():
    store, jobs, _, queue = dict_store(stale_after=60)
    job = store.create(new_job())
    jobs.put(claim_key(job.id, 1), {"at": time.time() - 120, "runner": "in-dead"})  # won attempt 1, then died
    assert store.claim(job.id) is False
    assert store.recover(1, "gave up") == ([], [job.id])
    assert store.get(job.id).status == FAILED and store.get(job.id).attempts == 1

    job = store.create(new_job())
    jobs.put(claim_key(job.id, 1), {"at": time.time() - 120, "runner": "in-dead"})
    assert store.recover(2, "gave up") == ([job.id], [])
    assert store.claim(job.id) and store.get(job.id).attempts == 2


def test_dict_recover_drops_ended_or_vanished_jobs_from_the_queue():
    """The queue is a hint: an id whose record ended or expired (7 days idle on Modal) goes."""
    store, jobs, _, queue = dict_store()
    kept = store.create(new_job()).id
    vanished = store.create(new_job()).id
    jobs.pop(vanished)
    assert store.unfinished()[0] == 2
    assert [job.id for job in store.processing()] == [kept]
    store.recover(2, "gave up")
    assert store.unfinished() == (1, 1.0)


def test_dict_queue_survives_concurrent_creates_and_finishes_without_a_lock():
    store, _, _, _ = dict_store()
    done: list[int] = []

    def make_and_finish():
        job = store.create(new_job())
        if job.id % 2:
            finish(store, job.id)
            done.append(job.id)
        return job.id

    ids = race(8, lambda: [make_and_finish() for _ in range(5)])
    all_ids = {job_id for batch in ids for job_id in batch}
    count, eta = store.unfinished()
    assert count == len(all_ids) - len(done) and eta == float(count)
    assert {job.id for job in store.processing()} == all_ids - set(done)


def test_dict_the_same_runner_claims_its_job_again_and_another_does_not():
    """Modal delivers an input again, same id, after its container died: it takes its job up again
    (the next attempt); a duplicate spawn (another input) finds the job taken."""
    store, _, _, _ = dict_store()
    job = store.create(new_job())
    assert store.claim(job.id, runner="in-1")
    assert store.claim(job.id, runner="in-2") is False and store.claim(job.id) is False
    assert store.claim(job.id, runner="in-1")
    assert store.get(job.id).attempts == 2 and store.get(job.id).runner == "in-1"


def test_dict_records_kept_are_written_again_before_they_could_expire():
    from infra.jobs.dict_store import REFRESH_SECONDS, TOUCHED

    store, jobs, _, _ = dict_store()
    job = store.create(new_job())
    finish(store, job.id)
    written = jobs.get(job.id)[TOUCHED]
    assert store.delete_finished_before(time.time() - 3600) == 0
    assert jobs.get(job.id)[TOUCHED] == written  # written lately: left as it is
    jobs.put(job.id, {**jobs.get(job.id), TOUCHED: time.time() - REFRESH_SECONDS - 1})
    assert store.delete_finished_before(time.time() - 3600) == 0
    assert jobs.get(job.id)[TOUCHED] > written  # written again: its 7 idle days start over


def test_dict_delete_finished_before_removes_the_jobs_claims_and_inputs():
    store, jobs, inputs, _ = dict_store()
    job = store.create(new_job(), {"init_image": PNG})
    assert store.claim(job.id)
    store.heartbeat(job.id)
    finish(store, job.id, at=time.time() - 100)
    other = store.create(new_job())
    before = set(jobs.keys())
    assert store.delete_finished_before(time.time() - 50) == 1
    assert not [key for key in jobs.keys() if str(job.id) in str(key)]
    assert job.id not in inputs
    assert {key for key in before if str(job.id) not in str(key)} == set(jobs.keys())
    assert store.get(other.id).status == PROCESSING
