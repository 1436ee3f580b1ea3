"""Following a job over real HTTP (a uvicorn server process on the tiny built-in models): progress
by polling and by the event stream, reconnecting with Last-Event-ID, cancel (queued and running),
deadlines, idempotent replays across a restart, webhook events, and fair start order across keys.
(The same behaviours on the Modal side are in tests/modal/test_lifecycle.py.)"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import httpx
import pytest

from infra.limits import key_id
from tests.conftest import KEY, sse_events
from tests.conftest import ServerProcess as Server

OTHER, CANCELLER, FAIR_A, FAIR_B = "key-other", "key-canceller", "key-fair-a", "key-fair-b"
API = "/api/v1/enterprise"
# a job of seconds on the tiny model: long enough to be seen running, queued behind, cancelled, streamed
LONG = {"prompt": "a lighthouse", "width": 320, "height": 320, "steps": 40, "instant_response": "yes"}
QUICK = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "instant_response": "yes"}


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    process = Server(root / "data", models_dir, api_keys=",".join([KEY, OTHER, CANCELLER, FAIR_A, FAIR_B]),
                     fetch_allowlist="127.0.0.1,localhost", progress_seconds=0.05, workers=1,
                     webhook_progress_seconds=0.3, webhook_backoff=0.1)
    yield process
    process.stop()


def post(server, endpoint: str, key: str = KEY, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(f"{server.base}{API}/{endpoint}", json={"key": key, **body}, headers=headers or {}, timeout=60)


def fetch(server, job_id: int, key: str = KEY) -> dict:
    return post(server, "fetch", key, request_id=job_id).json()


def wait_done(server, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (body := fetch(server, job_id))["status"] == "processing":
        assert time.monotonic() < deadline, f"job {job_id} did not end"
        time.sleep(0.05)
    return body


def wait_running(server, job_id: int, min_step: int = 1) -> dict:
    deadline = time.monotonic() + 60
    while True:
        body = fetch(server, job_id)
        progress = body.get("progress") or {}
        if body["status"] != "processing" or (progress.get("stage") == "denoising" and progress["step"] >= min_step):
            return body
        assert time.monotonic() < deadline, "the job never started denoising"
        time.sleep(0.02)


def read_stream(server, job_id: int, key: str = KEY, last_event_id=None, stop_after: int | None = None) -> list[dict]:
    """The events of stream/{id}: [{"event", "id", "data"}], until the server closes it (or after
    `stop_after` progress events, when the client hangs up)."""
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    events = []
    with httpx.stream("GET", f"{server.base}{API}/stream/{job_id}", headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(response.iter_lines()):
            events.append(event)
            if stop_after is not None and sum(e["event"] == "progress" for e in events) >= stop_after:
                break
    return events


def progress_events(events: list[dict]) -> list[dict]:
    return [event for event in events if event["event"] == "progress" and event.get("id") not in (None, "0")]


# --------------------------------------------------------------------------- progress


def test_progress_by_polling_and_by_stream_rises_to_100_and_ends_in_fetchs_body(server):
    job_id = post(server, "text2img", **LONG).json()["id"]
    streamed: list[dict] = []
    reader = threading.Thread(target=lambda: streamed.extend(read_stream(server, job_id)))
    reader.start()
    polled = []
    while (body := fetch(server, job_id))["status"] == "processing":
        polled.append(body)
        time.sleep(0.05)
    reader.join(60)
    final = fetch(server, job_id)
    assert final["status"] == "success"

    percents = [answer["progress"]["percent"] for answer in polled]
    assert percents == sorted(percents) and len(set(percents)) >= 3, percents
    running = [answer for answer in polled if answer["progress"]["stage"] != "queued"]
    # 40 asked; a scheduler that evaluates once more (PNDM, the tiny model's) is counted from its first step on
    totals = [answer["progress"]["total_steps"] for answer in running]
    assert set(totals) <= {40, totals[-1]} and totals[-1] in (40, 41)
    assert any(answer["progress"]["stage"] == "denoising" for answer in running)
    assert all(answer["eta"] > 0 and answer["progress"]["images"] == 1 for answer in running)

    shown = progress_events(streamed)
    ids = [int(event["id"]) for event in shown]
    assert ids == sorted(set(ids)) and len(ids) >= 5
    stream_percents = [event["data"]["progress"]["percent"] for event in shown]
    assert stream_percents == sorted(stream_percents) and stream_percents[-1] == 100
    steps = [event["data"]["progress"]["step"] for event in shown]
    assert steps == sorted(steps) and steps[-1] == shown[-1]["data"]["progress"]["total_steps"] == totals[-1]
    assert all(event["data"]["status"] == "processing" and event["data"]["id"] == job_id for event in shown)
    assert streamed[-1]["event"] == "result" and streamed[-1]["data"] == final


def test_a_reconnect_with_last_event_id_replays_what_it_missed(server):
    job_id = post(server, "text2img", **LONG).json()["id"]
    first = read_stream(server, job_id, stop_after=3)  # the client drops the connection mid-job
    last_seen = int(progress_events(first)[-1]["id"])
    time.sleep(0.5)  # more progress happens while it is away
    rest = read_stream(server, job_id, last_event_id=last_seen)
    ids = [int(event["id"]) for event in progress_events(rest)]
    assert ids[0] == last_seen + 1 and ids == list(range(last_seen + 1, ids[-1] + 1))  # nothing missed, nothing twice
    assert rest[-1]["event"] == "result" and rest[-1]["data"]["status"] == "success"
    whole = read_stream(server, job_id)  # after the end: the whole history, then the result
    assert [int(event["id"]) for event in progress_events(whole)] == list(range(1, ids[-1] + 1))
    assert whole[-1] == rest[-1]


def test_a_queued_job_shows_its_place_in_the_queue(server):
    running = post(server, "text2img", **LONG).json()["id"]
    wait_running(server, running)
    queued = post(server, "text2img", **QUICK).json()
    assert queued["status"] == "processing" and queued["queue_position"] == 0
    assert queued["progress"] == {"percent": 0, "step": 0, "total_steps": 2, "image": 0, "images": 1, "stage": "queued"}
    details = post(server, "system_details").json()
    assert details["queue_by_priority"]["normal"] >= 1
    assert post(server, f"cancel/{running}").json()["cancelled"] is True  # (the blocker has done its part)
    assert wait_done(server, queued["id"])["status"] == "success"


# --------------------------------------------------------------------------- cancel and deadlines


def usage_steps(server, key: str) -> int:
    report = post(server, "usage", api_key=key).json()
    return int(report["keys"][0]["total"]["steps"]) if report["keys"] else 0


def test_cancel_a_queued_and_a_running_job(server, receivers):
    hook = receivers()
    running = post(server, "text2img", CANCELLER, **LONG, webhook=hook.url, track_id="A").json()["id"]
    queued = post(server, "text2img", CANCELLER, **LONG, webhook=hook.url, track_id="B").json()["id"]
    wait_running(server, running, min_step=3)

    # a queued job: ended at once, never started, its webhook once
    answer = post(server, f"cancel/{queued}", CANCELLER).json()
    assert answer == {**answer, "status": "failed", "id": queued, "message": "Cancelled by the client", "cancelled": True}

    # a running job: stops at its next step; the answer comes once it stopped
    seen = fetch(server, running)["progress"]["step"]
    answer = post(server, "cancel", CANCELLER, request_id=running).json()
    assert answer["status"] == "failed" and answer["cancelled"] is True and answer["message"] == "Cancelled by the client"
    ran = usage_steps(server, CANCELLER)  # the queued one ran none
    assert seen <= ran <= seen + 3 and ran < 40, (seen, ran)

    # the worker is free at once for the next job
    assert wait_done(server, post(server, "text2img", **QUICK).json()["id"])["status"] == "success"

    deliveries = hook.wait_for(2)
    time.sleep(0.5)
    bodies = sorted((json.loads(r.body) for r in hook.requests), key=lambda body: body["track_id"])
    assert [(b["track_id"], b["status"], b["message"]) for b in bodies] == [
        ("A", "failed", "Cancelled by the client"), ("B", "failed", "Cancelled by the client")]
    assert len(deliveries) == 2  # once each

    again = post(server, "cancel", CANCELLER, request_id=running)
    assert again.status_code == 409 and "already ended: failed" in again.json()["message"]
    assert post(server, "cancel", KEY, request_id=running).status_code == 404  # another key's job
    assert post(server, "cancel", request_id=12345678).status_code == 404


def test_a_deadline_ends_a_running_or_queued_job_as_cancelled(server):
    by_field = post(server, "text2img", **LONG, deadline_seconds=1).json()["id"]
    by_header = post(server, "text2img", headers={"Cancel-After": "1s"}, **LONG).json()["id"]  # queued behind the first
    for job_id in (by_field, by_header):
        ended = wait_done(server, job_id)
        assert ended["status"] == "failed" and ended["cancelled"] is True
        assert "deadline passed (1 s after it was submitted)" in ended["message"]
    bad = post(server, "text2img", headers={"Cancel-After": "soon"}, **QUICK)
    assert bad.status_code == 400 and "Cancel-After" in bad.json()["message"]


# --------------------------------------------------------------------------- idempotency


def job_count(data_dir) -> int:
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def test_idempotent_replays_survive_a_restart_and_a_different_body_is_a_409(models_dir, tmp_path):
    data = tmp_path / "data"
    first_server = Server(data, models_dir, api_keys=f"{KEY},{OTHER}")
    try:
        key = {"Idempotency-Key": "order-1234"}
        first = post(first_server, "text2img", headers=key, **QUICK).json()
        again = post(first_server, "text2img", headers=key, **QUICK).json()
        by_field = post(first_server, "text2img", **QUICK, idempotency_key="order-1234").json()
        assert again["id"] == by_field["id"] == first["id"]
        assert (again.get("output") or again["future_links"]) == (first.get("output") or first["future_links"])
        other_body = post(first_server, "text2img", headers=key, **{**QUICK, "prompt": "y"})
        assert other_body.status_code == 409 and "different request" in other_body.json()["message"]
        other_key = post(first_server, "text2img", OTHER, headers=key, **QUICK).json()
        assert other_key["id"] != first["id"]  # idempotency keys are per API key
        wait_done(first_server, first["id"])
    finally:
        first_server.stop()
    count = job_count(data)
    second_server = Server(data, models_dir, api_keys=f"{KEY},{OTHER}")
    try:
        replay = post(second_server, "text2img", headers=key, **QUICK).json()
        assert replay["id"] == first["id"] and replay["status"] == "success"
        assert replay["output"] == (first.get("output") or first["future_links"])
        assert post(second_server, "text2img", headers=key, **{**QUICK, "steps": 3}).status_code == 409
        assert job_count(data) == count  # the replays made nothing
    finally:
        second_server.stop()


# --------------------------------------------------------------------------- webhook events


def test_webhook_events_send_what_was_chosen_each_with_its_event(server, receivers):
    every = receivers()
    job_id = post(server, "text2img", **LONG, webhook=every.url, webhook_events="queued,started,progress,completed").json()["id"]
    wait_done(server, job_id)
    deadline = time.monotonic() + 10
    while not any(json.loads(r.body)["event"] == "completed" for r in every.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    bodies = [json.loads(request.body) for request in every.requests]
    events = [body["event"] for body in bodies]
    assert events[:2] == ["queued", "started"] and events[-1] == "completed", events
    assert "progress" in events and set(events) == {"queued", "started", "progress", "completed"}
    assert all(r.headers.get("X-Webhook-Signature", "").startswith("sha256=") for r in every.requests)
    progress = [body["progress"] for body in bodies if body["event"] == "progress"]
    assert [p["percent"] for p in progress] == sorted(p["percent"] for p in progress)
    assert bodies[-1]["status"] == "success" and bodies[-1]["id"] == job_id

    started_only = receivers()
    job_id = post(server, "text2img", **QUICK, webhook=started_only.url, webhook_events="started").json()["id"]
    wait_done(server, job_id)
    time.sleep(0.5)
    assert [json.loads(r.body)["event"] for r in started_only.requests] == ["started"]

    bad = post(server, "text2img", **QUICK, webhook=started_only.url, webhook_events="started,finished")
    assert bad.status_code == 422 and "finished" in json.dumps(bad.json())


# --------------------------------------------------------------------------- fair queueing


def test_two_keys_bursts_start_alternately_and_high_priority_goes_first(server):
    blocker = post(server, "text2img", **{**LONG, "width": 512, "height": 512, "steps": 50}).json()["id"]
    wait_running(server, blocker)
    ids = {FAIR_A: [], FAIR_B: []}
    for key in (FAIR_A, FAIR_B):  # A's whole burst first, then B's
        for _ in range(20):
            ids[key].append(post(server, "text2img", key, **QUICK).json()["id"])
    urgent = post(server, "text2img", **QUICK, priority="high").json()
    assert urgent["queue_position"] == 0
    assert post(server, "system_details").json()["queue_by_priority"] == {"high": 1, "normal": 40, "low": 0}
    assert post(server, f"cancel/{blocker}").json()["cancelled"] is True  # the queue starts now, in its order
    for job_id in [*ids[FAIR_A], *ids[FAIR_B], urgent["id"]]:
        wait_done(server, job_id)

    with sqlite3.connect(server.data_dir / "jobs.sqlite3") as db:
        rows = db.execute("SELECT id, owner FROM jobs WHERE id IN ({}) ORDER BY started_at".format(
            ",".join(str(i) for i in [*ids[FAIR_A], *ids[FAIR_B], urgent["id"]]))).fetchall()
    assert rows[0][0] == urgent["id"]
    owners = [owner for _, owner in rows[1:]]
    a, b = key_id(FAIR_A), key_id(FAIR_B)
    assert owners == [a, b] * 20, owners


def test_high_priority_needs_an_admin_key_where_there_are_admin_keys(make_client):
    client = make_client(api_keys=["gen-key"], admin_api_keys=["admin-key"])
    refused = client.post(f"{API}/text2img", json={"key": "gen-key", **QUICK, "priority": "high"})
    assert refused.status_code == 403 and "admin key" in refused.json()["message"]
    assert client.post(f"{API}/text2img", json={"key": "admin-key", **QUICK, "priority": "high"}).status_code == 200
    assert client.post(f"{API}/text2img", json={"key": "gen-key", **QUICK, "priority": "low"}).status_code == 200
    bad = client.post(f"{API}/text2img", json={"key": "gen-key", **QUICK, "priority": "urgent"})
    assert bad.status_code == 422 and "priority" in bad.json()["message"]
