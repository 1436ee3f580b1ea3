"""The Modal stand-in itself (tests/modal/cloud.py), on a small app in modal_app's shape
(tests/modal/toy_app.py): it keeps the semantics of ../shared/notes/modal-semantics.md that the
deployment's tests rely on, so a test that passes on it would not fail on Modal for a reason the
stand-in hid."""

from __future__ import annotations

import os
import time

import pytest

from tests.modal import toy_app
from tests.modal.cloud import Cloud, Container, FakeVolume
from tests.modal.standins import IDLE_EXPIRY_SECONDS, FakeDict, RequestSizeError

DAY = 24 * 3600


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Cloud:
    monkeypatch.setattr(toy_app, "EVENTS", [])
    monkeypatch.setenv("TOY_SHELL", "the deploying shell")
    cloud = Cloud.deploy(toy_app, tmp_path, monkeypatch, {"TOY_SECRET": "s3cret"})
    yield cloud
    cloud.close()


def run(cloud: Cloud, what: str) -> dict:
    return toy_app.Worker().run.remote(what)


# --------------------------------------------------------------------------- containers and snapshots


def test_the_snapshot_hook_runs_once_and_restored_containers_start_from_its_state(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_app, "EVENTS", [])
    cloud = Cloud.deploy(toy_app, tmp_path, monkeypatch, {"TOY_SECRET": "s3cret"}, scaledown_window=0.1)
    try:
        first = run(cloud, "echo")
        deadline = time.monotonic() + 30
        while cloud.containers("Worker")[0].alive:  # idle past the scale-down window: it goes
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = run(cloud, "echo")
    finally:
        cloud.close()
    started, restored = cloud.containers("Worker")
    assert not started.restored and restored.restored
    assert [hook for hook, _ in toy_app.EVENTS] == ["snap=True", "snap=False", "snap=False"]
    assert first["loaded"] == second["loaded"] == ["weights"]  # what the snapshot hook left
    assert first["seen"] == second["seen"] == ["echo"]  # the snapshot is from before the first input


def test_a_container_sees_its_image_environment_and_the_secret_only(toy):
    answer = run(toy, "echo")
    assert answer["image"] == "gpu" and answer["secret"] == "s3cret" and answer["shell"] is None
    assert toy.web_request("GET", "/env").json() == {"image": "web", "secret": "s3cret"}
    assert os.environ.get("TOY_SHELL") == "the deploying shell" and "TOY_IMAGE" not in os.environ  # outside: the shell


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("death", ["crash", "preempt"])
def test_a_dead_containers_input_is_delivered_again_with_its_id_to_a_fresh_container(toy, death):
    answer = run(toy, death)
    workers = toy.containers("Worker")
    assert len(workers) == 2 and not workers[0].alive
    assert workers[0].inputs == workers[1].inputs == [answer["input"]]  # the same input id, twice
    exits = [hook for hook, _ in toy_app.EVENTS if hook == "exit"]
    assert exits == (["exit"] if death == "preempt" else [])  # a pre-emption stops gracefully, a crash does not


def test_an_input_whose_containers_keep_dying_fails_its_call(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_app, "EVENTS", [])
    cloud = Cloud.deploy(toy_app, tmp_path, monkeypatch, {}, redeliveries=2)
    try:
        toy_app.marks.put = lambda *args, **kwargs: True  # every delivery is the first: it always dies
        call = toy_app.Worker().run.spawn("crash")
        with pytest.raises(RuntimeError, match="died 3 times"):
            call.get(timeout=60)
        assert len(cloud.containers("Worker")) == 3
    finally:
        cloud.close()


def test_stop_fetching_inputs_ends_the_container_after_its_input(toy):
    run(toy, "stop")
    run(toy, "echo")
    first, second = toy.containers("Worker")
    assert not first.alive and first.inputs != second.inputs


def test_a_call_id_finds_its_call(toy):
    import modal

    call = toy_app.Worker().run.spawn("echo")
    assert call.object_id.startswith("fc-") and modal.FunctionCall.from_id(call.object_id) is call
    assert call.get(timeout=60)["input"].startswith("in-")


def test_at_most_max_containers_run_at_once(toy):
    calls = [toy_app.Worker().run.spawn("echo") for _ in range(8)]
    for call in calls:
        call.get(timeout=60)
    assert len(toy.containers("Worker")) <= toy_app.WORKER_OPTIONS["max_containers"]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_a_cancelled_waiting_call_never_runs(toy):
    import modal

    busy = [toy_app.Worker().run.spawn("long") for _ in range(toy_app.WORKER_OPTIONS["max_containers"])]
    wait_for(lambda: sum(hook == "long" for hook, _ in toy_app.EVENTS) == len(busy))
    waiting = toy_app.Worker().run.spawn("echo")  # every container is busy: it waits in the backlog
    modal.FunctionCall.from_id(waiting.object_id).cancel()
    with pytest.raises(modal.exception.RemoteError):
        waiting.get(timeout=5)
    assert waiting.cancelled and waiting.input.deliveries == 0  # its input never ran
    for call in busy:
        call.cancel()
    toy.service("Worker").drain()
    assert waiting.input.id not in [i for c in toy.containers("Worker") for i in c.inputs]


def test_a_cancelled_running_call_is_interrupted_and_its_container_takes_the_next_input(toy):
    import modal

    call = toy_app.Worker().run.spawn("long")
    wait_for(lambda: ("long", call.input.id) in toy_app.EVENTS)
    started = time.monotonic()
    call.cancel()  # terminate_containers=False
    with pytest.raises(modal.exception.RemoteError):
        call.get(timeout=5)
    assert time.monotonic() - started < 1.0  # interrupted where it was, not after its ten seconds
    assert ("interrupted", "InputCancellation") in toy_app.EVENTS
    (container,) = toy.containers("Worker")
    assert container.alive and call.input.deliveries == 1  # the container stays; the input is not retried
    assert run(toy, "echo")["input"] in container.inputs  # and it takes the next one
    call.cancel()  # a call that ended is left as it is
    assert call.cancels == [False, False]


def test_a_call_cancelled_with_terminate_containers_ends_its_container(toy):
    call = toy_app.Worker().run.spawn("long")
    wait_for(lambda: ("long", call.input.id) in toy_app.EVENTS)
    call.cancel(terminate_containers=True)
    wait_for(lambda: not toy.containers("Worker")[0].alive)
    assert ("exit", None) in toy_app.EVENTS
    run(toy, "echo")
    assert len(toy.containers("Worker")) == 2


def test_a_finished_call_is_not_changed_by_a_cancel(toy):
    call = toy_app.Worker().run.spawn("echo")
    answer = call.get(timeout=60)
    call.cancel()
    assert not call.cancelled and call.get(timeout=0) == answer


# --------------------------------------------------------------------------- Volumes


def volume_with(tmp_path, *names: str) -> tuple[FakeVolume, list[Container]]:
    volume = FakeVolume("v", tmp_path)
    containers = [Container(name, "f", env={}) for name in names]
    for container in containers:
        volume.mount(container)
    return volume, containers


def test_a_volume_view_changes_only_on_commit_or_reload(tmp_path):
    volume, (a, b) = volume_with(tmp_path, "a", "b")
    (volume.view(a) / "x.txt").write_text("from a")
    assert not (volume.view(b) / "x.txt").exists()
    with a.active():
        volume.commit()
    assert not (volume.view(b) / "x.txt").exists()  # committed, but b has not reloaded
    with b.active():
        (volume.view(b) / "y.txt").write_text("from b")
        volume.commit()  # commit() also reloads: b now sees a's file
    assert (volume.view(b) / "x.txt").read_text() == "from a"
    assert not (volume.view(a) / "y.txt").exists()
    with a.active():
        volume.reload()
    assert (volume.view(a) / "y.txt").read_text() == "from b"
    assert volume.file_count() == 2


def test_a_reload_fails_while_the_container_holds_a_file_open(tmp_path):
    volume, (a, b) = volume_with(tmp_path, "a", "b")
    (volume.view(a) / "x.txt").write_text("x")
    with a.active():
        volume.commit()
        volume.reload()
        with open(volume.view(a) / "x.txt"), pytest.raises(RuntimeError, match="open files"):
            volume.reload()
        with open(volume.view(a) / "x.txt"), pytest.raises(RuntimeError, match="open files"):
            volume.commit()  # the reload inside commit() fails the same way
        volume.reload()  # closed: it works again
    with b.active(), open(volume.view(a) / "x.txt"):  # another container's open file does not block b
        volume.reload()


def test_commit_and_reload_only_work_inside_a_container_that_mounts_the_volume(tmp_path):
    volume, _ = volume_with(tmp_path, "a")
    with pytest.raises(RuntimeError, match="inside a container"):
        volume.commit()


def test_a_worker_write_reaches_the_web_tier_after_its_commit_and_a_reload(toy):
    run(toy, "write")
    web_view = toy.volumes["data"].view(toy._start_web().container)
    assert (web_view / "note.txt").read_text() == "hello"  # a container started after the commit sees it


# --------------------------------------------------------------------------- Dicts


def test_a_dict_entry_expires_after_seven_idle_days_and_a_read_keeps_it(toy):
    d = FakeDict(clock=toy.clock)
    d.put("read", 1)
    d.put("idle", 1)
    toy.clock.advance(IDLE_EXPIRY_SECONDS - DAY)
    assert d.get("read") == 1  # a read is a touch
    toy.clock.advance(2 * DAY)
    assert d.get("idle") is None and "idle" not in d
    assert d.get("read") == 1


def test_a_dict_value_over_the_size_limit_is_refused(toy):
    d = FakeDict(clock=toy.clock, max_value_bytes=1024)
    with pytest.raises(RequestSizeError):
        d.put("big", b"x" * 4096)
    assert d.get("big") is None


def test_every_dict_operation_is_a_round_trip(toy):
    d = FakeDict(latency=0.001)
    d.put("k", 1)
    d.get("k")
    "k" in d  # noqa: B015
    assert d.calls == 3


# --------------------------------------------------------------------------- the web tier


def test_a_request_past_the_web_limit_is_answered_with_a_303(toy):
    toy.web_timeout = 0.3
    answer = toy.web_request("GET", "/slow?seconds=2")
    assert answer.status_code == 303 and "__modal_function_call_id" in answer.headers["location"]
    assert toy.web_request("GET", "/slow?seconds=0").status_code == 200


def test_sync_handlers_share_anyios_forty_threads_and_max_inputs_admits_requests(toy):
    answers = toy.web_burst([("GET", "/sync", {}) for _ in range(90)])
    assert all(response.status_code == 200 for _, response in answers)
    assert max(response.json()["most"] for _, response in answers) == 40
    assert len(toy.web_containers) == 1  # 90 requests fit max_inputs=100 of one container
    more = toy.web_burst([("GET", "/slow?seconds=0", {}) for _ in range(150)])
    assert len(more) == 150 and len(toy.web_containers) == 2
