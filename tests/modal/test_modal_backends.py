"""The Modal side of the job store, config store and dispatcher (infra/modal_backends.py), tested
through the same interface tests as the local side.

No Modal here: tests have no token and no network. `tests/modal/standins.py` provides in-memory
STAND-INS for the cloud objects (`modal.Dict`, `Function.spawn`, `FunctionCall.get`) that keep
the semantics the code relies on: values copied on put/get, `put(skip_if_exists=True)` as the one
atomic primitive, `get(timeout=0)` raising TimeoutError while a call runs.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from infra.catalog.loader import LoadRequest
from infra.catalog.weights import WeightsStore
from infra.jobs.dict_store import INDEX_LOCK_KEY, UNFINISHED_KEY, DictJobStore, claim_key, dict_lock
from infra.jobs.dispatch import execute_job
from infra.jobs.job import FAILED, MAX_ID, PROCESSING, SUCCESS, Job
from infra.jobs.modal_dispatch import ModalDispatcher
from infra.jobs.store import SqliteJobStore
from infra.storage.config_store import DictConfigStore, FileConfigStore
from infra.storage.outputs import LocalStorage
from tests.conftest import generation_params
from tests.modal.standins import FakeDict, FakeFunction

PNG = b"\x89PNG\r\n\x1a\n-not-really"


def new_job(eta: float = 1.0, **params) -> Job:
    keys = ["generations/out-1.png"]
    return Job(0, "text2img", generation_params(**params), {"seed": 7}, keys, [f"http://t/files/{keys[0]}"], eta=eta)


def finish(store, job_id: int, status: str = SUCCESS, at: float | None = None) -> None:
    store.update(job_id, status=status, finished_at=time.time() if at is None else at)


def race(n: int, target) -> list:
    """`target()` on `n` threads released at once; their results."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def run(i):
        barrier.wait()
        results[i] = target()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


@pytest.fixture(params=["sqlite", "modal-dict"])
def store(request, tmp_path):
    """Every job store the runtime can be built with: the local one and the Modal one (on Dict stand-ins)."""
    if request.param == "sqlite":
        return SqliteJobStore(tmp_path / "jobs.sqlite3")
    return DictJobStore(FakeDict(), FakeDict())


def recover_dead(store, max_attempts: int, message: str):
    """`recover` where every started job's worker is dead: at start-up for SQLite; for the Dict,
    the jobs started more than `stale_after` (here 0) seconds ago."""
    if isinstance(store, DictJobStore):
        time.sleep(0.01)  # strictly older than the claim
        return store.recover(max_attempts, message, stale_after=0)
    return store.recover(max_attempts, message)


# --------------------------------------------------------------------------- the shared interface


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


# --------------------------------------------------------------------------- DictJobStore only


def dict_store(stale_after: float = 60.0) -> tuple[DictJobStore, FakeDict, FakeDict]:
    jobs, inputs = FakeDict(), FakeDict()
    return DictJobStore(jobs, inputs, stale_after=stale_after), jobs, inputs


def test_dict_records_are_plain_dicts_of_primitives():
    """Values are cloudpickled on Modal: a record must not need our classes to be read."""
    store, jobs, _ = dict_store()
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
    assert jobs.get(UNFINISHED_KEY) == {job.id: 1.0}


def test_dict_claim_key_decides_and_the_claimed_attempt_is_recorded():
    store, jobs, _ = dict_store()
    job = store.create(new_job())
    assert store.claim(job.id)
    assert claim_key(job.id, 1) in jobs and claim_key(job.id, 2) not in jobs
    # a container that won the key for attempt 2 elsewhere: nobody else may start that attempt
    store.update(job.id, started_at=None)
    jobs.put(claim_key(job.id, 2), time.time())
    assert store.claim(job.id) is False
    assert store.cancel_queued("cancelled") == []  # it is running: left alone


def test_dict_recover_leaves_running_jobs_alone_until_stale():
    store, _, _ = dict_store(stale_after=60)
    job = store.create(new_job())
    assert store.claim(job.id)
    assert store.recover(2, "gave up") == ([], [])
    assert store.get(job.id).started_at is not None
    # with the claim long ago and no heartbeat, the worker is taken for dead
    store.update(job.id, started_at=time.time() - 120)
    assert store.recover(2, "gave up") == ([job.id], [])
    assert store.get(job.id).started_at is None and store.get(job.id).attempts == 1


def test_dict_heartbeat_keeps_a_long_job_alive():
    store, _, _ = dict_store(stale_after=60)
    job = store.create(new_job())
    assert store.claim(job.id)
    store.update(job.id, started_at=time.time() - 3600)
    store.heartbeat(job.id)
    assert store.recover(2, "gave up") == ([], [])
    assert store.get(job.id).started_at is not None


def test_dict_recover_spawns_a_job_never_started_again_once_per_stale_period():
    store, jobs, _ = dict_store(stale_after=60)
    job = store.create(new_job())
    assert store.recover(2, "gave up") == ([], [])  # just queued: its spawn is on its way
    jobs.put(f"queued:{job.id}", time.time() - 120)  # queued two minutes ago and never started
    assert store.recover(2, "gave up") == ([job.id], [])
    assert store.recover(2, "gave up") == ([], [])  # not again on the next run
    assert store.claim(job.id)  # the duplicate spawn that finds it taken does nothing
    assert store.claim(job.id) is False


def test_dict_recover_counts_a_claim_whose_worker_died_before_recording_it():
    store, jobs, _ = dict_store(stale_after=60)
    job = store.create(new_job())
    jobs.put(claim_key(job.id, 1), time.time() - 120)  # won attempt 1, then died
    assert store.claim(job.id) is False
    assert store.recover(1, "gave up") == ([], [job.id])
    assert store.get(job.id).status == FAILED and store.get(job.id).attempts == 1

    job = store.create(new_job())
    jobs.put(claim_key(job.id, 1), time.time() - 120)
    assert store.recover(2, "gave up") == ([job.id], [])
    assert store.claim(job.id) and store.get(job.id).attempts == 2


def test_dict_recover_drops_ended_or_vanished_jobs_from_the_index():
    """The index is a hint: an id whose record ended or expired (7 days idle on Modal) goes."""
    store, jobs, _ = dict_store()
    kept = store.create(new_job()).id
    vanished = store.create(new_job()).id
    jobs.pop(vanished)
    assert store.unfinished()[0] == 2
    assert [job.id for job in store.processing()] == [kept]
    store.recover(2, "gave up")
    assert store.unfinished() == (1, 1.0)


def test_dict_index_survives_concurrent_creates_and_finishes():
    store, _, _ = dict_store()
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


def test_dict_lock_is_taken_over_when_its_holder_died():
    d = FakeDict()
    d.put(INDEX_LOCK_KEY, {"token": "dead container", "expires": time.time() - 1})
    with dict_lock(d, INDEX_LOCK_KEY):
        assert d.get(INDEX_LOCK_KEY)["token"] != "dead container"
    assert INDEX_LOCK_KEY not in d


def test_dict_delete_finished_before_removes_the_jobs_claims_and_inputs():
    store, jobs, inputs = dict_store()
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


# --------------------------------------------------------------------------- config stores


@pytest.fixture(params=["file", "modal-dict"])
def config(request, tmp_path):
    if request.param == "file":
        return FileConfigStore(tmp_path / "config")
    return DictConfigStore(FakeDict())


def test_config_get_put_delete(config):
    assert config.get("storage") is None
    config.put("storage", '{"bucket": "a"}')
    assert config.get("storage") == '{"bucket": "a"}'
    config.put("storage", '{"bucket": "b"}')
    assert config.get("storage") == '{"bucket": "b"}'
    config.delete("storage")
    assert config.get("storage") is None
    config.delete("storage")  # deleting what is not there is fine


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "__generation__"])
def test_config_refuses_names_that_are_not_plain(config, name):
    with pytest.raises(ValueError):
        config.put(name, "x")


def test_config_generation_starts_at_0_and_each_bump_raises_it(config):
    assert config.generation() == 0
    assert config.bump_generation() == 1
    assert config.bump_generation() == 2
    assert config.generation() == 2


def test_file_config_is_private_to_the_owner(tmp_path):
    config = FileConfigStore(tmp_path / "config")
    config.put("storage", "secret key inside")
    config.bump_generation()
    for path in (tmp_path / "config").iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert FileConfigStore(tmp_path / "config").get("storage") == "secret key inside"  # survives a restart


def test_dict_generation_bumps_racing_are_distinct_and_never_go_back():
    d = FakeDict()
    config = DictConfigStore(d)
    bumps = race(8, config.bump_generation)
    assert sorted(bumps) == list(range(1, 9))
    assert config.generation() == 8
    # a bump whose publishing write was overtaken by an older one is still seen
    d.put("generation:9", time.time())
    assert config.generation() == 9 and config.bump_generation() == 10


# --------------------------------------------------------------------------- dispatcher


class FakeEngine:
    """What the GPU worker's engine looks like to execute_job."""

    def __init__(self):
        self.runs = []

    def run(self, params, inputs):
        self.runs.append((params, inputs))
        return [b"output-of-" + params.task.encode()], {"seed": 42, "device": "fake"}


class Webhooks:
    def __init__(self):
        self.finished = []

    def job_finished(self, job):
        self.finished.append(job)


class Outputs(LocalStorage):
    """LocalStorage taking execute_job's `storage_id` (OutputStorage's put signature)."""

    def put(self, key, data, content_type, expires_at=None, storage_id=None):
        super().put(key, data, content_type, expires_at=expires_at)


def modal_side(tmp_path):
    """The web tier's dispatcher and a GPU 'container' (a FakeFunction) running execute_job, as the
    Worker class does, on a shared DictJobStore."""
    jobs = DictJobStore(FakeDict(), FakeDict())
    storage, engine, webhooks = Outputs(tmp_path / "outputs"), FakeEngine(), Webhooks()
    weights = WeightsStore(tmp_path / "weights")
    worker = FakeFunction(lambda job_id: execute_job(job_id, jobs, storage, lambda: engine, webhooks, weights).status)
    loads = FakeFunction(lambda request: request["model_id"])
    config = DictConfigStore(FakeDict())
    settings = SimpleNamespace(initial_seconds_per_step=0.02)
    dispatcher = ModalDispatcher(worker.spawn, loads.spawn, config, jobs, settings, "modal: A100-80GB")
    return SimpleNamespace(jobs=jobs, storage=storage, engine=engine, webhooks=webhooks, worker=worker,
                           loads=loads, config=config, dispatcher=dispatcher)


def test_a_spawned_worker_runs_the_job_to_success_through_execute_job(tmp_path):
    side = modal_side(tmp_path)
    job = side.jobs.create(new_job(steps=2, width=64, height=64), {"init_image": PNG})
    side.dispatcher.submit(job.id)
    [(args, call)] = side.worker.calls
    assert args == (job.id,)
    assert call.get(timeout=30) == SUCCESS

    done = side.jobs.wait(job.id, timeout=5)
    assert done.status == SUCCESS and done.meta == {"seed": 42, "device": "fake"} and done.generation_time is not None
    assert (tmp_path / "outputs" / job.output_keys[0]).read_bytes() == b"output-of-text2img"
    assert side.engine.runs == [(job.params, {"init_image": PNG})]
    assert side.jobs.inputs(job.id) == {} and side.jobs.unfinished() == (0, 0)
    assert [j.id for j in side.webhooks.finished] == [job.id]


def test_a_duplicate_spawn_does_not_run_the_job_twice(tmp_path):
    side = modal_side(tmp_path)
    job = side.jobs.create(new_job())
    for _ in range(3):
        side.dispatcher.submit(job.id)
    for _, call in side.worker.calls:
        call.get(timeout=30)  # the losers return at once with the job as they found it
    assert len(side.engine.runs) == 1 and side.jobs.get(job.id).status == SUCCESS
    assert len(side.webhooks.finished) == 1


def test_a_running_call_reports_timeout_like_modal(tmp_path):
    release = threading.Event()
    slow = FakeFunction(lambda: release.wait(30) and "done")
    call = slow.spawn()
    with pytest.raises(TimeoutError):
        call.get(timeout=0)
    release.set()
    assert call.get(timeout=30) == "done"
    failing = FakeFunction(lambda: 1 / 0).spawn()
    with pytest.raises(ZeroDivisionError):
        failing.get(timeout=30)


def test_dispatcher_load_spawns_the_download_with_primitive_fields(tmp_path):
    side = modal_side(tmp_path)
    request = LoadRequest("my-model", "https://example.com/m.safetensors", None, webhook="https://hook")
    side.dispatcher.load(request)
    [((sent,), call)] = side.loads.calls
    assert sent == {"model_id": "my-model", "source": "https://example.com/m.safetensors", "category": None,
                    "precision": None, "upcast_attention": False, "webhook": "https://hook"}
    assert LoadRequest(**sent) == request
    assert call.get(timeout=30) == "my-model"


def test_dispatcher_restart_unload_evict_bump_the_generation(tmp_path):
    side = modal_side(tmp_path)
    dispatcher = side.dispatcher
    assert dispatcher.device == "modal: A100-80GB" and dispatcher.loaded_models() == []
    dispatcher.start()
    seen = side.config.generation()
    assert dispatcher.restart() == []
    assert side.config.generation() > seen  # a worker that started at `seen` stops taking inputs
    seen = side.config.generation()
    assert dispatcher.unload_models() == []
    assert side.config.generation() > seen
    seen = side.config.generation()
    dispatcher.evict("deleted-model")
    assert side.config.generation() > seen
    dispatcher.stop()


def test_dispatcher_estimate_is_speed_times_work(tmp_path):
    dispatcher = modal_side(tmp_path).dispatcher
    params = generation_params(steps=20, width=512, height=512, seeds=(1, 2))
    assert dispatcher.estimate(params) == pytest.approx(0.02 * params.work_units())


def test_importing_the_modal_backends_needs_neither_modal_nor_torch():
    code = ("import sys, infra.jobs.dict_store, infra.jobs.modal_dispatch, infra.storage.config_store, tests.modal.standins; "
            "print(sorted(m for m in ('modal', 'torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_fake_dict_copies_values_and_claims_once():
    """The stand-in itself: mutation after put does not leak; skip_if_exists is a claim."""
    d = FakeDict()
    value = {"a": [1]}
    assert d.put("k", value)
    value["a"].append(2)
    got = d.get("k")
    got["a"].append(3)
    assert d.get("k") == {"a": [1]}
    assert race(8, lambda: d.put("claim", 1, skip_if_exists=True)).count(True) == 1
    assert d.pop("k") == {"a": [1]} and d.pop("k", None) is None and "k" not in d
    d.update({"x": 1, "y": 2})
    assert dict(d.items()) == {"claim": 1, "x": 1, "y": 2}
