"""The `Dispatcher` protocol (infra/jobs/dispatch.py), one suite run against both implementations:
`LocalDispatcher` (worker threads in this process, over SQLite) and `ModalDispatcher` (the web
tier's side on Modal: jobs spawned to a GPU 'container', a FakeFunction running `execute_job` as
the Worker class does, over a DictJobStore; loads spawned to the download function). Both run
the test stand-in engine (tests/engine/standin.py). What only the Modal side does (the generation
bumps that retire workers, the primitive fields a spawned load carries) is tested at the end."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from infra.catalog.loader import run_load
from infra.catalog.weights import READY, LoadRequest, WeightsStore
from infra.jobs.dict_store import DictJobStore
from infra.jobs.dispatch import LocalDispatcher, execute_job
from infra.jobs.job import SUCCESS, Job
from infra.jobs.modal_dispatch import ModalDispatcher, ModalHandles
from infra.jobs.store import SqliteJobStore
from infra.net.inputs import encode_input
from infra.settings import Settings
from infra.storage.config_store import DictConfigStore
from infra.storage.outputs import LocalStorage
from tests.conftest import generation_params, new_job, scene
from tests.engine.standin import StandInEngine
from tests.modal.standins import FakeDict, FakeFunction

PNG = b"\x89PNG\r\n\x1a\n"


class Webhooks:
    def __init__(self):
        self.finished, self.events, self.job_events = [], [], []

    def job_finished(self, job):
        self.finished.append(job)

    def job_event(self, job, event, progress=None):
        self.job_events.append((event, job.id))

    def post_event(self, url, payload):
        self.events.append((url, payload))


class Outputs(LocalStorage):
    """LocalStorage taking execute_job's `storage_id` (OutputStorage's put signature)."""

    def put(self, key, data, content_type, expires_at=None, storage_id=None):
        super().put(key, data, content_type, expires_at=expires_at)


def prepare(category, download, out, precision, upcast_attention, base=None) -> dict:
    """The engine side of a load, standing in for infra.engine.files.convert: the file, as is."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.safetensors").write_bytes(download.read_bytes())
    return {"category": category, "format": "safetensors", "file": "lora.safetensors"}


@pytest.fixture(params=["local", "modal"])
def side(request, tmp_path):
    """A dispatcher with everything it hands work to: (dispatcher, jobs, engine, webhooks, weights, settings)."""
    engine, webhooks = StandInEngine(), Webhooks()
    storage, weights = Outputs(tmp_path / "outputs"), WeightsStore(tmp_path / "weights")
    settings = Settings(_env_file=None, data_dir=tmp_path, initial_seconds_per_step=0.02, allow_local_model_paths=True)
    if request.param == "local":
        jobs = SqliteJobStore(tmp_path / "jobs.sqlite3")
        dispatcher = LocalDispatcher(settings, jobs, storage, weights, webhooks, None, make_engine=lambda: engine,
                                     prepare_model=prepare)
        config = None

        def drain():  # the queued submissions are taken before the stop sentinels
            dispatcher.stop()
    else:
        handles = modal_handles()
        jobs = DictJobStore(handles.jobs, handles.inputs, handles.queue)
        config = DictConfigStore(handles.config)
        worker = FakeFunction(lambda job_id: execute_job(job_id, jobs, storage, lambda: engine, webhooks, weights).status)

        def download_body(fields):  # as modal_app.download_model: the load, then the jobs that waited
            status = run_load(LoadRequest(**fields), weights, settings, webhooks.post_event, prepare).status
            dispatcher.model_loaded(fields["model_id"])
            return status

        download = FakeFunction(download_body)
        handles.spawn_job = lambda job_id: worker.spawn(job_id).object_id
        handles.spawn_load = download.spawn
        dispatcher = ModalDispatcher(handles, jobs, weights, config, settings, webhooks)

        def drain():  # every spawned call has returned
            for _, call in worker.calls:
                call.get(timeout=30)
    dispatcher.start()
    yield SimpleNamespace(dispatcher=dispatcher, jobs=jobs, engine=engine, webhooks=webhooks, weights=weights,
                          storage=storage, config=config, drain=drain)
    dispatcher.stop()


def wait_done(jobs, job_id: int, timeout: float = 30) -> Job:
    job = jobs.wait(job_id, timeout)
    assert job is not None and job.done, f"job {job_id} did not end"
    return job


def test_a_submitted_job_runs_to_success_with_its_outputs_stored(side):
    init = encode_input(scene(64, 64))
    job = side.jobs.create(new_job(task="img2img", strength=0.5, seeds=(3, 4)), {"init_image": init})
    job.output_keys = ["generations/a-0.png", "generations/a-1.png"]
    side.jobs.update(job.id, output_keys=job.output_keys)
    side.dispatcher.submit(job)
    done = wait_done(side.jobs, job.id)
    assert done.status == SUCCESS and done.generation_time is not None
    for key in job.output_keys:
        assert (side.storage.root / key).read_bytes()[:8] == PNG
    assert side.engine.runs == [job.params] and side.jobs.inputs(job.id) == {}
    assert [finished.id for finished in side.webhooks.finished] == [job.id]


def test_a_job_submitted_twice_runs_once(side):
    job = side.jobs.create(new_job())
    for _ in range(3):
        side.dispatcher.submit(job)
    assert wait_done(side.jobs, job.id).status == SUCCESS
    side.drain()  # the other submissions have been taken (and found the job claimed)
    assert len(side.engine.runs) == 1 and len(side.webhooks.finished) == 1


def test_a_job_the_engine_cannot_run_ends_failed_with_the_engines_message(side):
    side.engine.sdxl_models = frozenset({"tiny-sd"})
    job = side.jobs.create(new_job(panorama=True))
    side.dispatcher.submit(job)
    done = wait_done(side.jobs, job.id)
    assert done.status == "failed" and "panorama" in done.message and "SDXL" in done.message


def test_a_load_lands_in_the_weights_store_and_reports_its_outcome(side, tmp_path):
    source = tmp_path / "style.safetensors"
    source.write_bytes(b"weights")
    request = LoadRequest("style", str(source), "lora", webhook="https://hook.example")
    side.weights.begin(request.entry())
    side.dispatcher.load(request)
    deadline = time.monotonic() + 30
    while side.weights.get("style").status != READY:
        assert time.monotonic() < deadline, side.weights.get("style")
        time.sleep(0.05)
    assert side.weights.payload("style").read_bytes() == b"weights"
    while not side.webhooks.events:  # the outcome is posted just after the store says ready
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert side.webhooks.events[0][1]["status"] == "success"


def test_the_estimate_is_the_speed_times_the_work(side):
    params = generation_params(steps=20, width=512, height=512, seeds=(1, 2))
    assert side.dispatcher.estimate(params) == pytest.approx(0.02 * params.work_units())
    assert side.dispatcher.estimate(generation_params(steps=40, width=512, height=512, seeds=(1, 2))) == pytest.approx(
        2 * side.dispatcher.estimate(params))


def test_jobs_run_after_a_restart_an_unload_and_an_evict(side):
    first = side.jobs.create(new_job())
    side.dispatcher.submit(first)
    assert wait_done(side.jobs, first.id).status == SUCCESS
    assert isinstance(side.dispatcher.restart(), list) and isinstance(side.dispatcher.unload_models(), list)
    side.dispatcher.evict("tiny-sd")
    again = side.jobs.create(new_job())
    side.dispatcher.submit(again)
    assert wait_done(side.jobs, again.id).status == SUCCESS
    assert isinstance(side.dispatcher.loaded_models(), list) and side.dispatcher.device


# --------------------------------------------------------------------------- each side's own


def test_the_local_dispatcher_drops_evicted_models_from_the_engine(tmp_path):
    engine = StandInEngine()
    settings = Settings(_env_file=None, data_dir=tmp_path)
    dispatcher = LocalDispatcher(settings, SqliteJobStore(tmp_path / "j.sqlite3"), Outputs(tmp_path / "o"),
                                 WeightsStore(tmp_path / "w"), Webhooks(), None, lambda: engine, prepare)
    dispatcher.engine().warm("tiny-sd")
    assert dispatcher.loaded_models() == ["tiny-sd"]
    dispatcher.evict("tiny-sd")
    assert dispatcher.loaded_models() == []


def modal_handles(**changes) -> ModalHandles:
    handles = ModalHandles(jobs=FakeDict(), inputs=FakeDict(), queue=FakeDict(), config=FakeDict(), usage=FakeDict(),
                           spawn_job=lambda job_id: None, spawn_load=lambda fields: None, device_label="modal: A100-80GB")
    for name, value in changes.items():
        setattr(handles, name, value)
    return handles


def modal_dispatcher(tmp_path, handles: ModalHandles) -> ModalDispatcher:
    return ModalDispatcher(handles, DictJobStore(handles.jobs, handles.inputs, handles.queue),
                           WeightsStore(tmp_path / "weights"), DictConfigStore(handles.config),
                           SimpleNamespace(initial_seconds_per_step=0.02, modal_max_containers=10, modal_spawn_ahead=0))


def test_the_modal_dispatcher_retires_workers_on_restart_unload_and_evict(tmp_path):
    handles = modal_handles()
    dispatcher = modal_dispatcher(tmp_path, handles)
    config = dispatcher.config
    assert dispatcher.device == "modal: A100-80GB" and dispatcher.loaded_models() == []
    for action in (dispatcher.restart, dispatcher.unload_models, lambda: dispatcher.evict("deleted-model")):
        seen = config.generation()
        action()
        assert config.generation() > seen  # a worker that started at `seen` stops taking inputs


def test_a_spawned_load_carries_primitive_fields_only(tmp_path):
    spawned = []
    dispatcher = modal_dispatcher(tmp_path, modal_handles(spawn_load=spawned.append))
    request = LoadRequest("my-model", "https://example.com/m.safetensors", None, webhook="https://hook")
    dispatcher.load(request)
    assert spawned == [{"model_id": "my-model", "source": "https://example.com/m.safetensors", "category": None,
                        "precision": None, "upcast_attention": False, "webhook": "https://hook", "base_model": None}]
    assert LoadRequest(**spawned[0]) == request


# --------------------------------------------------------------------------- the Modal side's fair queue


def fair_dispatcher(tmp_path, slots: int, spawned: list, **settings) -> ModalDispatcher:
    """A Modal dispatcher with `slots` GPU slots whose spawns are recorded in `spawned` (nothing runs)."""
    handles = modal_handles(spawn_job=lambda job_id: spawned.append(job_id) or f"fc-{len(spawned)}")
    return ModalDispatcher(handles, DictJobStore(handles.jobs, handles.inputs, handles.queue),
                           WeightsStore(tmp_path / "weights"), DictConfigStore(handles.config),
                           SimpleNamespace(initial_seconds_per_step=0.02, modal_max_containers=slots,
                                           modal_spawn_ahead=0, **settings))


def queue_job(dispatcher: ModalDispatcher, owner: str, priority: str = "normal") -> int:
    job = new_job()
    job.owner, job.priority = owner, priority
    job = dispatcher.jobs.create(job)
    dispatcher.submit(job)
    return job.id


def finish(dispatcher: ModalDispatcher, job_id: int) -> None:
    """The job's worker ended it, then handed out the next job (as ModalWorker.run does)."""
    dispatcher.jobs.update(job_id, status=SUCCESS, finished_at=time.time())
    dispatcher.fill()


def test_the_modal_dispatcher_hands_modal_no_more_jobs_than_its_gpus_and_the_rest_in_fair_order(tmp_path):
    spawned = []
    dispatcher = fair_dispatcher(tmp_path, slots=2, spawned=spawned)
    a = [queue_job(dispatcher, "a") for _ in range(3)]
    b = [queue_job(dispatcher, "b") for _ in range(2)]
    urgent = queue_job(dispatcher, "c", priority="high")
    assert spawned == a[:2]  # two GPUs: two jobs handed to Modal, the others held
    held = [a[2], *b, urgent]
    # after the two handed out: the high one, then b (never served) before a's third, then b's second
    assert [dispatcher.queue_position(dispatcher.jobs.get(job_id)) for job_id in held] == [4, 3, 5, 2]
    assert dispatcher.queue_lengths() == {"high": 1, "normal": 5, "low": 0}
    for running in spawned[:]:  # (each end hands out the next job, which joins `spawned`)
        finish(dispatcher, running)
    assert spawned == [*a[:2], urgent, b[0]]  # then the key served longest ago: b before a's third
    finish(dispatcher, urgent)
    finish(dispatcher, b[0])
    assert spawned == [*a[:2], urgent, b[0], a[2], b[1]]


def one_running_one_held(tmp_path) -> tuple[ModalDispatcher, list, int, int]:
    """One GPU slot: key a's job handed out (running), key b's held behind it."""
    spawned = []
    dispatcher = fair_dispatcher(tmp_path, slots=1, spawned=spawned)
    return dispatcher, spawned, queue_job(dispatcher, "a"), queue_job(dispatcher, "b")


def test_a_held_job_is_not_a_lost_spawn_and_the_recovery_pass_hands_out_one_nobody_did(tmp_path):
    from infra.jobs.modal_dispatch import LOST_SPAWN_SECONDS

    dispatcher, spawned, running, held = one_running_one_held(tmp_path)
    queue = dispatcher.handles.queue
    for job_id in (running, held):  # long ago, as far as the recovery pass can tell
        queue.put(job_id, {**queue.get(job_id), "queued_at": time.time() - 10 * LOST_SPAWN_SECONDS})
    assert dispatcher.recover(3, "gave up") == ([], []) and spawned == [running]
    # the running job's worker ended it but died before its hand-out: the next pass hands the held one out
    dispatcher.jobs.update(running, status=SUCCESS, finished_at=time.time())
    assert dispatcher.recover(3, "gave up") == ([held], []) and spawned == [running, held]
    assert dispatcher.recover(3, "gave up") == ([], []) and spawned == [running, held]


def test_containers_filling_at_once_never_spawn_a_job_twice_nor_exceed_the_slots(tmp_path):
    from tests.conftest import race

    spawned = []
    dispatcher = fair_dispatcher(tmp_path, slots=12, spawned=spawned)
    handles = dispatcher.handles
    held = []
    for owner in ("a", "b") * 10:  # queued by web containers that died before handing them out
        job = new_job()
        job.owner = owner
        held.append(dispatcher.jobs.create(job).id)
    # eight containers (each its own dispatcher on the same Dicts) hand out the held jobs at once
    containers = [ModalDispatcher(handles, DictJobStore(handles.jobs, handles.inputs, handles.queue),
                                  dispatcher.weights, dispatcher.config, dispatcher.settings) for _ in range(8)]
    race(8, lambda: containers.pop().fill())
    assert len(spawned) == len(set(spawned)) == 12  # each once, twelve slots
    assert set(spawned) <= set(held)
    for job_id in spawned[:]:
        finish(dispatcher, job_id)
    assert sorted(spawned) == sorted(held)  # the rest as the first ones ended


def test_the_recovery_pass_frees_a_slot_a_dead_container_left_taken(tmp_path):
    from infra.jobs.dict_store import slot_key
    from infra.jobs.modal_dispatch import LOST_SPAWN_SECONDS

    dispatcher, spawned, running, held = one_running_one_held(tmp_path)
    queue = dispatcher.handles.queue
    queue.pop(running)  # its worker ended it and died before freeing its slot
    dispatcher.handles.jobs.put(running, {**dispatcher.handles.jobs.get(running), "status": SUCCESS})
    assert dispatcher.recover(3, "gave up") == ([], []) and spawned == [running]  # just now: it may be on its way
    queue.put(slot_key(0), {**queue.get(slot_key(0)), "at": time.time() - 2 * LOST_SPAWN_SECONDS})
    assert dispatcher.recover(3, "gave up") == ([held], []) and spawned == [running, held]
    assert queue.get(slot_key(0))["job"] == held
