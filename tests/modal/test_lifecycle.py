"""A job's lifecycle (issue 17) on the deployment on the Modal stand-in (tests/modal/cloud.py):
progress the GPU worker writes is read by another web container, a cancel reaches a running
worker through the jobs Dict (its GPU container stays for the next job), a queued job's cancel
cancels its Modal call (its input never runs), idempotency keys hold across web containers, and
the event stream goes through the web tier, reconnecting inside the web function's limits. The
GPU class runs the stand-in engine (tests/engine/standin.py) with steps that take time, so a
cancel lands between two of them. (The same behaviours on the local server: tests/web/test_lifecycle.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import modal
import pytest

from tests.conftest import KEY, sse_events
from tests.modal.cloud import Cloud, WebContainer
from tests.modal.conftest import API

ROOT = Path(__file__).resolve().parents[2]
STEP_SECONDS = 0.02
FAST = {"SDAPI_PROGRESS_SECONDS": 0.02}  # the worker writes its progress (and reads cancels) this often
QUICK = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
LONG = {"steps": 50, "samples": 2}  # 100 steps (a job may ask 50 per image at most)
LONG_STEPS = 100
LONG_STEP_SECONDS = 0.1  # 10 s: far longer than any test lets it run


def t2i(steps: int = 2, **fields) -> dict:
    return {**QUICK, "steps": steps, **fields}


class Engines(list):
    """The engines the GPU containers built; `step_seconds`: what each of their steps takes (set it
    before the first job: the first GPU container builds the engine its snapshot keeps)."""

    step_seconds = STEP_SECONDS


@pytest.fixture
def engines(monkeypatch) -> Engines:
    """The GPU class's engine is the stand-in engine, its steps taking time."""
    from infra.engine import engine as engine_module
    from tests.engine.standin import StandInEngine

    built = Engines()

    class Engine(StandInEngine):
        def __init__(self, settings, weights, device=None, **options):
            super().__init__(device=device or "cpu", step_seconds=built.step_seconds)
            built.append(self)

    monkeypatch.setattr(engine_module, "DiffusersEngine", Engine)
    return built


def call(web: WebContainer, endpoint: str, headers: dict | None = None, **body) -> httpx.Response:
    """A request to one chosen web container."""
    return web.run(web.request("POST", f"{API}/{endpoint}", json={"key": KEY, **body}, headers=headers or {}))


def fetch(web: WebContainer, job_id: int) -> dict:
    return call(web, "fetch", request_id=job_id).json()


def wait_until(web: WebContainer, job_id: int, done, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while not done(body := fetch(web, job_id)):
        assert time.monotonic() < deadline, body
        time.sleep(0.01)
    return body


def denoising(min_step: int):
    return lambda body: body["status"] != "processing" or (
        body.get("progress", {}).get("stage") == "denoising" and body["progress"]["step"] >= min_step)


def ended(body: dict) -> bool:
    return body["status"] != "processing"


def call_of(job_id: int):
    """The job's Modal call on the stand-in (the id the dispatcher kept with the job)."""
    import modal_app
    from infra.jobs.dict_store import call_key

    call_id = modal_app.jobs_dict.get(call_key(job_id))
    assert call_id, f"job {job_id} has no call"
    return modal.FunctionCall.from_id(call_id)  # the stand-in's call, as modal_app's cancel_call finds it


def two_webs(cloud: Cloud) -> tuple[WebContainer, WebContainer]:
    return cloud.start_web(), cloud.start_web()


# --------------------------------------------------------------------------- progress


def test_progress_written_by_the_gpu_worker_is_read_by_another_web_container(deploy, engines):
    cloud = deploy(secret=FAST)
    submitter, reader = two_webs(cloud)
    job = call(submitter, "text2img", **t2i(steps=40, instant_response="yes")).json()
    assert job["status"] == "processing" and job["progress"]["total_steps"] == 40
    seen = []
    while (body := fetch(reader, job["id"]))["status"] == "processing":
        seen.append(body["progress"])
        time.sleep(0.01)
    assert body["status"] == "success" and body["id"] == job["id"], body
    running = [p for p in seen if p["stage"] != "queued"]
    percents, steps = [p["percent"] for p in running], [p["step"] for p in running]
    assert percents == sorted(percents) and steps == sorted(steps), running
    assert len(set(steps)) >= 3 and max(percents) > 0, running  # rising while it ran, as the worker wrote it
    assert {p["total_steps"] for p in running} == {40} and all(p["images"] == 1 for p in running)
    assert engines and sum(engine.steps_run for engine in engines) == 40


# --------------------------------------------------------------------------- cancel


def test_a_cancel_from_another_web_container_stops_the_running_worker_which_takes_the_next_job(deploy, engines):
    engines.step_seconds = LONG_STEP_SECONDS
    cloud = deploy(secret=FAST)
    submitter, canceller = two_webs(cloud)
    job_id = call(submitter, "text2img", **t2i(**LONG, instant_response="yes")).json()["id"]
    running = wait_until(canceller, job_id, denoising(min_step=3))
    assert running["status"] == "processing", running
    started = time.monotonic()
    answer = call(canceller, "cancel", request_id=job_id)
    assert answer.status_code == 200
    body = answer.json()
    assert (body["status"], body["message"], body["cancelled"], body["id"]) == (
        "failed", "Cancelled by the client", True, job_id), body
    assert time.monotonic() - started < 5  # it stopped at its next step, read from the jobs Dict
    ran = sum(engine.steps_run for engine in engines)
    assert running["progress"]["step"] <= ran <= running["progress"]["step"] + 20 and ran < LONG_STEPS / 4, ran
    assert fetch(submitter, job_id) == {**fetch(submitter, job_id), "status": "failed", "cancelled": True}
    # the worker ended the job itself: its call returned (not cancelled at Modal), its container stays
    modal_call = call_of(job_id)
    assert modal_call.get(timeout=10) == "failed" and not modal_call.cancelled
    (worker,) = cloud.containers("Worker")
    assert worker.alive
    following = call(submitter, "text2img", **QUICK).json()  # the sync wait: the GPU container is free at once
    assert following["status"] == "success", following
    assert cloud.containers("Worker") == [worker] and len(worker.inputs) == 2
    assert call(canceller, "cancel", request_id=job_id).status_code == 409  # it has ended


def test_a_queued_job_cancelled_on_modal_cancels_its_call_whose_input_never_runs(deploy, engines):
    engines.step_seconds = LONG_STEP_SECONDS
    # one GPU container and one job handed to Modal beside it: the second job waits in Modal's backlog
    cloud = deploy(secret={**FAST, "SDAPI_MODAL_SPAWN_AHEAD": 1}, max_containers=1)
    submitter, canceller = two_webs(cloud)
    first = call(submitter, "text2img", **t2i(**LONG, instant_response="yes")).json()["id"]
    wait_until(canceller, first, denoising(min_step=1))
    queued = call(submitter, "text2img", **QUICK, instant_response="yes").json()
    assert queued["status"] == "processing" and queued["queue_position"] == 0, queued
    modal_call = call_of(queued["id"])
    assert not modal_call.done and modal_call.input.deliveries == 0  # waiting for the one container

    started = time.monotonic()
    answer = call(canceller, f"cancel/{queued['id']}").json()
    assert time.monotonic() - started < 2  # at once: nothing had to stop
    assert (answer["status"], answer["message"], answer["cancelled"]) == ("failed", "Cancelled by the client", True)
    assert modal_call.cancelled and modal_call.cancels == [False]  # FunctionCall.cancel(terminate_containers=False)
    with pytest.raises(modal.exception.RemoteError):
        modal_call.get(timeout=5)

    call(canceller, "cancel", request_id=first)  # the long one stops; the container would now be free
    cloud.service("Worker").drain()
    (worker,) = cloud.containers("Worker")
    assert modal_call.input.deliveries == 0 and modal_call.input.id not in worker.inputs  # it never ran
    assert worker.alive and len(worker.inputs) == 1
    after = fetch(submitter, queued["id"])
    assert (after["status"], after["cancelled"], after["message"]) == ("failed", True, "Cancelled by the client")
    assert sum(engine.steps_run for engine in engines) < LONG_STEPS / 4


# --------------------------------------------------------------------------- fair queueing


FAIR_A, FAIR_B = "key-fair-a", "key-fair-b"
KEYS = {"SDAPI_API_KEYS": f"{KEY},{FAIR_A},{FAIR_B}"}


def worker_calls(cloud: Cloud) -> list:
    """The calls spawned on the GPU class so far."""
    return [c for c in cloud.calls.values() if c.input and c.input.id.startswith("in-Worker")]


def record(job_id: int) -> dict:
    import modal_app

    return modal_app.jobs_dict.get(job_id)


def test_two_keys_bursts_start_alternately_on_modal_and_high_priority_goes_first(deploy, engines):
    engines.step_seconds = LONG_STEP_SECONDS
    cloud = deploy(secret={**FAST, **KEYS}, max_containers=1)  # one GPU: every job below waits for it
    first_web, second_web = two_webs(cloud)
    blocker = call(first_web, "text2img", **t2i(**LONG, instant_response="yes")).json()["id"]
    wait_until(first_web, blocker, denoising(min_step=1))
    ids = {FAIR_A: [], FAIR_B: []}
    for key, web in ((FAIR_A, first_web), (FAIR_B, second_web)):  # A's whole burst first, then B's, from another container
        for _ in range(6):
            ids[key].append(call(web, "text2img", key=key, **QUICK, instant_response="yes").json()["id"])
    urgent = call(second_web, "text2img", **QUICK, priority="high", instant_response="yes").json()
    assert urgent["queue_position"] == 0, urgent
    # the order they will start in, as fetch tells it: B's first job right after A's first
    assert [fetch(second_web, job_id)["queue_position"] for job_id in (ids[FAIR_A][0], ids[FAIR_B][0], ids[FAIR_A][1])] \
        == [1, 2, 3]
    assert call(first_web, "system_details").json()["queue_by_priority"] == {"high": 1, "normal": 12, "low": 0}
    # Modal was handed the running job only (its own queue is first come, first served); the
    # recovery pass, minutes later, takes none of the held jobs for a lost spawn
    assert len(worker_calls(cloud)) == 1
    cloud.clock.advance(150)
    cloud.run("recover_jobs")
    assert len(worker_calls(cloud)) == 1

    engines.step_seconds = STEP_SECONDS
    call(first_web, "cancel", request_id=blocker)  # the GPU is free: the worker hands out the next job, and so on
    everyone = [*ids[FAIR_A], *ids[FAIR_B], urgent["id"]]
    for job_id in everyone:
        assert wait_until(second_web, job_id, ended)["status"] == "success"
    started = sorted(everyone, key=lambda job_id: record(job_id)["started_at"])
    owners = {job_id: key for key, mine in ids.items() for job_id in mine}
    assert started[0] == urgent["id"]
    assert [owners[job_id] for job_id in started[1:]] == [FAIR_A, FAIR_B] * 6
    assert len(worker_calls(cloud)) == 1 + len(everyone)  # one spawn each: none twice
    assert cloud.containers("Worker")[0].alive and len(cloud.containers("Worker")) == 1


def test_a_held_job_past_its_deadline_ends_without_a_gpu(deploy, engines):
    import modal_app
    from infra.jobs.dict_store import call_key

    engines.step_seconds = LONG_STEP_SECONDS
    cloud = deploy(secret=FAST, max_containers=1)
    web = cloud.start_web()
    blocker = call(web, "text2img", **t2i(**LONG, instant_response="yes")).json()["id"]
    wait_until(web, blocker, denoising(min_step=1))
    late = call(web, "text2img", **QUICK, deadline_seconds=5, instant_response="yes").json()["id"]
    waiting = call(web, "text2img", **QUICK, instant_response="yes").json()["id"]
    cloud.clock.advance(10)  # the held job's deadline passes while the GPU is busy
    engines.step_seconds = STEP_SECONDS
    call(web, "cancel", request_id=blocker)
    done = wait_until(web, waiting, ended)
    assert done["status"] == "success"
    late_record = record(late)  # as the worker's hand-out left it (fetch would end it too)
    assert late_record["status"] == "failed" and late_record["cancelled"] and "deadline" in late_record["message"]
    assert modal_app.jobs_dict.get(call_key(late)) is None  # never handed to Modal
    assert len(worker_calls(cloud)) == 2


# --------------------------------------------------------------------------- idempotency


def test_an_idempotency_key_holds_across_web_containers(deploy, engines):
    cloud = deploy(secret=FAST)
    first_web, second_web = two_webs(cloud)
    key = {"Idempotency-Key": "order-1234"}
    body = {**QUICK, "instant_response": "yes"}
    first = call(first_web, "text2img", headers=key, **body).json()
    again = call(second_web, "text2img", headers=key, **body).json()
    by_field = call(second_web, "text2img", **body, idempotency_key="order-1234").json()
    assert first["id"] == again["id"] == by_field["id"], (first, again)
    links = first.get("output") or first["future_links"]
    assert (again.get("output") or again["future_links"]) == links
    assert (by_field.get("output") or by_field["future_links"]) == links
    different = call(second_web, "text2img", headers=key, **{**body, "prompt": "another"})
    assert different.status_code == 409 and "different request" in different.json()["message"]
    done = wait_until(first_web, first["id"], ended)
    assert done["status"] == "success" and done["output"] == links
    worker_calls = [c for c in cloud.calls.values() if c.input and c.input.id.startswith("in-Worker")]
    assert len(worker_calls) == 1  # one job, one GPU input
    replay = call(second_web, "text2img", headers=key, **body).json()  # after the end: the job's result
    assert replay["id"] == first["id"] and replay["status"] == "success" and replay["output"] == links


# --------------------------------------------------------------------------- the stream


def read_stream(web: WebContainer, job_id: int, last_event_id: int | None = None) -> list[dict]:
    """stream/{id} through the web container (the stand-in's ASGI client hands the body over once
    the server closed it): its events, [{"event", "id", "data"}]."""
    headers = {"Authorization": f"Bearer {KEY}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    response = web.run(web.request("GET", f"{API}/stream/{job_id}", headers=headers))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return list(sse_events(response.text.splitlines()))


def numbered(events: list[dict]) -> list[int]:
    """The ids of the progress snapshots among `events` (queue-position events carry id 0)."""
    return [int(e["id"]) for e in events if e["event"] == "progress" and e.get("id") not in (None, "0")]


def test_a_stream_through_the_web_tier_ends_with_fetchs_body(deploy, engines):
    cloud = deploy(secret=FAST)
    submitter, streamer = two_webs(cloud)
    job_id = call(submitter, "text2img", **t2i(steps=30, instant_response="yes")).json()["id"]
    events = read_stream(streamer, job_id)
    assert events[-1]["event"] == "result" and [e["event"] for e in events].count("result") == 1
    ids = numbered(events)
    assert ids == sorted(set(ids)) and len(ids) >= 3, ids
    percents = [e["data"]["progress"]["percent"] for e in events if e["event"] == "progress" and e["id"] != "0"]
    assert percents == sorted(percents) and percents[-1] == 100
    assert events[-1]["data"] == fetch(submitter, job_id) and events[-1]["data"]["status"] == "success"


def test_a_stream_at_its_time_limit_says_reconnect_and_last_event_id_goes_on_where_it_stopped(deploy, engines):
    cloud = deploy(secret={**FAST, "SDAPI_STREAM_MAX_SECONDS": 0.3})
    submitter, streamer = two_webs(cloud)
    job_id = call(submitter, "text2img", **t2i(steps=50, instant_response="yes")).json()["id"]  # 1 s of steps
    connections, last = [], None
    while True:
        events = read_stream(streamer if len(connections) % 2 else submitter, job_id, last_event_id=last)
        connections.append(events)
        if events[-1]["event"] == "result":
            break
        assert events[-1]["event"] == "reconnect", events
        last = events[-1]["data"]["last_event_id"]
        assert int(events[-1]["id"]) == last and last == (numbered(events) or [last])[-1]
        assert len(connections) < 40, "the stream never ended"
    assert len(connections) >= 2  # at least one reconnect
    ids = [i for events in connections for i in numbered(events)]
    assert ids == list(range(1, ids[-1] + 1)), ids  # across the reconnects: nothing missed, nothing twice
    assert connections[-1][-1]["data"] == fetch(streamer, job_id)


def _import_modal_app(env: dict[str, str], expression: str) -> subprocess.CompletedProcess:
    script = f"import json, modal_app; print(json.dumps({expression}))"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SDAPI_", "MODAL_"))}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**base, **env, "HOME": "/nonexistent"},
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_stream_limit_is_baked_below_the_web_functions_timeout_and_the_operator_may_choose_it():
    expression = "[modal_app.WEB_ENV['SDAPI_STREAM_MAX_SECONDS'], modal_app.web.info().timeout]"
    default = _import_modal_app({}, expression)
    assert default.returncode == 0, default.stderr
    limit, timeout = json.loads(default.stdout.strip().splitlines()[-1])
    assert 0 < float(limit) <= timeout - 15, (limit, timeout)  # a margin for the last look and the reconnect event
    chosen = _import_modal_app({"SDAPI_STREAM_MAX_SECONDS": "60"}, expression)
    assert chosen.returncode == 0 and json.loads(chosen.stdout.strip().splitlines()[-1])[0] == "60"
    too_long = _import_modal_app({"SDAPI_STREAM_MAX_SECONDS": "600"}, expression)
    assert too_long.returncode != 0 and "SDAPI_STREAM_MAX_SECONDS" in too_long.stderr
