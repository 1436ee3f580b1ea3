"""Webhook delivery against real receivers on loopback: the payload and its signature, retries
with growing backoff, refusals, dead receivers that must not stall others, shutdown."""

from __future__ import annotations

import json
import time

import pytest

from infra.jobs.job import FAILED, SUCCESS, Job
from infra.jobs.store import SqliteJobStore
from infra.jobs.webhooks import WebhookSender, sign, verify
from infra.settings import Settings
from models.responses import job_response
from tests.conftest import free_port, generation_params

SECRET = "test-webhook-secret"


@pytest.fixture
def store(tmp_path):
    return SqliteJobStore(tmp_path / "jobs.db")


@pytest.fixture
def senders(store, tmp_path):
    made = []

    def make(attempts=5, backoff=0.05, timeout=2.0) -> WebhookSender:
        settings = Settings(data_dir=tmp_path, webhook_attempts=attempts, webhook_backoff=backoff, webhook_timeout=timeout,
                            webhook_secret=SECRET, fetch_allowlist=["127.0.0.1"])  # the receivers run on loopback
        made.append(WebhookSender(store, settings))
        return made[-1]

    yield make
    for sender in made:
        sender.stop(timeout=1.0)


def finished_job(store, url, status=SUCCESS, message=None, track_id="order-7") -> Job:
    """A job record as `execute_job` leaves it: stored, then ended `success` or `failed`."""
    job = store.create(
        Job(
            id=0,
            endpoint="text2img",
            params=generation_params(prompt="a cat"),
            meta={"prompt": "a cat", "seed": 42, "lora": None},
            output_keys=["a.png"],
            future_links=["http://example.test/files/a.png"],
            webhook=url,
            track_id=track_id,
        )
    )
    if status == SUCCESS:
        store.update(job.id, status=SUCCESS, generation_time=1.25, finished_at=time.time())
    else:
        store.update(job.id, status=FAILED, message=message, finished_at=time.time())
    return store.get(job.id)


def expected_payload(job: Job) -> dict:
    """The ModelsLab webhook payload: the fetch body of the finished job plus `track_id`."""
    payload = job_response(job, fetch_result="").model_dump(mode="json", exclude_none=True)
    return {**payload, "track_id": job.track_id}


# --------------------------------------------------------------------------- payload and signature


def test_success_payload_is_the_modelslab_body_plus_track_id_and_is_signed(store, senders, receivers):
    receiver = receivers()
    sender = senders()
    job = finished_job(store, receiver.url)
    sender.job_finished(job)
    assert sender.wait_idle(30)

    [request] = receiver.requests
    payload = json.loads(request.body)
    assert payload == expected_payload(job)
    assert payload["status"] == "success" and payload["id"] == job.id and payload["track_id"] == "order-7"
    assert payload["output"] == ["http://example.test/files/a.png"] and payload["generationTime"] == 1.25
    assert "webhook_status" not in payload
    headers = request.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Webhook-Id"] == f"job-{job.id}-success" and headers["X-Webhook-Attempt"] == "1"
    assert abs(int(headers["X-Webhook-Timestamp"]) - time.time()) < 60
    assert headers["X-Webhook-Signature"] == sign(SECRET, headers["X-Webhook-Timestamp"], request.body)
    assert headers["X-Webhook-Signature"].startswith("sha256=")

    timestamp, signature = headers["X-Webhook-Timestamp"], headers["X-Webhook-Signature"]
    assert verify(SECRET, timestamp, request.body, signature)
    assert not verify(SECRET, timestamp, request.body.replace(b"order-7", b"order-8"), signature)
    assert not verify("another-secret", timestamp, request.body, signature)
    assert not verify(SECRET, str(int(timestamp) + 1), request.body, signature)
    old = str(int(time.time()) - 3600)  # a correctly signed but old (replayed) delivery
    assert not verify(SECRET, old, request.body, sign(SECRET, old, request.body))
    assert verify(SECRET, old, request.body, sign(SECRET, old, request.body), tolerance=7200)
    assert store.get(job.id).webhook_status == "delivered"


def test_verify_rejects_malformed_input():
    now = str(int(time.time()))
    good = sign(SECRET, now, b"{}")
    assert verify(SECRET, now, "{}", good)  # str bodies are the same bytes
    assert not verify(SECRET, "yesterday", b"{}", good)
    assert not verify(SECRET, None, b"{}", good)
    assert not verify(SECRET, now, b"{}", good.removeprefix("sha256="))
    assert not verify(SECRET, now, b"{}", "sha256=\u00e9")
    assert not verify(SECRET, now, b"{}", "")
    future = str(int(time.time()) + 3600)
    assert not verify(SECRET, future, b"{}", sign(SECRET, future, b"{}"))


def test_failed_job_notifies_with_status_failed_id_message_track_id(store, senders, receivers):
    receiver = receivers()
    sender = senders()
    job = finished_job(store, receiver.url, status=FAILED, message="Generation failed: RuntimeError: boom")
    sender.job_finished(job)
    assert sender.wait_idle(30)

    [request] = receiver.requests
    payload = json.loads(request.body)
    assert payload == expected_payload(job)
    assert {k: payload[k] for k in ("status", "id", "message", "track_id")} == {
        "status": "failed", "id": job.id, "message": "Generation failed: RuntimeError: boom", "track_id": "order-7",
    }
    assert request.headers["X-Webhook-Id"] == f"job-{job.id}-failed"
    assert verify(SECRET, request.headers["X-Webhook-Timestamp"], request.body, request.headers["X-Webhook-Signature"])
    assert store.get(job.id).webhook_status == "delivered"


def test_post_event_is_signed_and_retried_with_one_event_id(store, senders, receivers):
    receiver = receivers(script=[(503, {}, 0.0)])
    sender = senders()
    event = {"status": "success", "event": "model_load", "model_id": "hooked", "category": "lora", "load_time": 1.5}
    sender.post_event(receiver.url, event)
    assert sender.wait_idle(30)

    first, second = receiver.requests
    assert json.loads(second.body) == event and second.body == first.body
    assert first.headers["X-Webhook-Id"] == second.headers["X-Webhook-Id"]
    assert first.headers["X-Webhook-Id"].startswith("event-")
    assert [r.headers["X-Webhook-Attempt"] for r in (first, second)] == ["1", "2"]
    assert verify(SECRET, second.headers["X-Webhook-Timestamp"], second.body, second.headers["X-Webhook-Signature"])
    sender.post_event(receiver.url, event)  # another event: another id
    assert sender.wait_idle(30)
    assert receiver.requests[2].headers["X-Webhook-Id"] != first.headers["X-Webhook-Id"]


def test_jobs_without_a_webhook_send_nothing(store, senders):
    sender = senders()
    job = finished_job(store, None)
    sender.job_finished(job)
    assert sender.wait_idle(1)
    assert store.get(job.id).webhook_status == ""


# --------------------------------------------------------------------------- retries


def test_500_twice_then_200_is_delivered_exactly_once(store, senders, receivers):
    jobs = []
    receiver = receivers(
        script=[(500, {}, 0.0), (500, {}, 0.0)],
        observe=lambda: store.get(jobs[0].id).webhook_status if jobs else None,
    )
    sender = senders(attempts=5)
    jobs.append(finished_job(store, receiver.url))
    sender.job_finished(jobs[0])
    assert sender.wait_idle(30)
    time.sleep(0.3)  # nothing more arrives after the delivery

    requests = receiver.requests
    assert len(requests) == 3
    assert len({r.headers["X-Webhook-Id"] for r in requests}) == 1
    assert [r.headers["X-Webhook-Attempt"] for r in requests] == ["1", "2", "3"]
    assert all(r.body == requests[0].body for r in requests)  # the same bytes every time, each signed anew
    assert all(verify(SECRET, r.headers["X-Webhook-Timestamp"], r.body, r.headers["X-Webhook-Signature"]) for r in requests)
    assert [r.observed for r in requests] == [
        "pending",
        "retrying: attempt 2 of 5 after HTTP 500",
        "retrying: attempt 3 of 5 after HTTP 500",
    ]
    assert store.get(jobs[0].id).webhook_status == "delivered after 3 attempts"


def test_always_500_gives_up_after_the_attempts_with_growing_gaps(store, senders, receivers):
    receiver = receivers(default=(500, {}, 0.0))
    backoff = 0.2
    sender = senders(attempts=3, backoff=backoff)
    job = finished_job(store, receiver.url)
    sender.job_finished(job)
    assert sender.wait_idle(30)
    time.sleep(3 * backoff)  # and no fourth attempt comes later

    arrived = [r.arrived for r in receiver.requests]
    assert len(arrived) == 3
    first_gap, second_gap = arrived[1] - arrived[0], arrived[2] - arrived[1]
    assert first_gap >= 0.75 * backoff  # backoff * 2**0, jitter at most -25 %
    assert second_gap >= 0.75 * 2 * backoff  # backoff * 2**1
    assert store.get(job.id).webhook_status == "failed: gave up after 3 attempts: HTTP 500"


def test_404_is_not_retried(store, senders, receivers):
    receiver = receivers(default=(404, {}, 0.0))
    sender = senders()
    job = finished_job(store, receiver.url)
    sender.job_finished(job)
    assert sender.wait_idle(30)
    time.sleep(0.3)  # several backoffs: no retry comes

    assert len(receiver.requests) == 1
    assert store.get(job.id).webhook_status == "failed: HTTP 404 (not retried)"


def test_429_retry_after_is_honoured(store, senders, receivers):
    receiver = receivers(script=[(429, {"Retry-After": "1"}, 0.0)])
    sender = senders(backoff=0.05)
    job = finished_job(store, receiver.url)
    sender.job_finished(job)
    assert sender.wait_idle(30)

    first, second = receiver.requests
    assert second.arrived - first.arrived >= 1.0  # not the 0.05 s backoff
    assert store.get(job.id).webhook_status == "delivered after 2 attempts"


def test_a_repeated_finish_is_not_sent_twice_while_on_its_way(store, senders, receivers):
    receiver = receivers(script=[(500, {}, 0.0)])
    sender = senders(backoff=0.2)
    job = finished_job(store, receiver.url)
    sender.job_finished(job)
    sender.job_finished(job)
    assert sender.wait_idle(30)

    assert [r.headers["X-Webhook-Attempt"] for r in receiver.requests] == ["1", "2"]


# --------------------------------------------------------------------------- dead receivers


def test_a_dead_receiver_neither_blocks_the_caller_nor_stalls_other_webhooks(store, senders, receivers):
    dead = receivers(default=(200, {}, 30.0))  # answers long after the sender's timeout
    stuck = finished_job(store, dead.url, track_id="stuck")
    healthy = receivers(observe=lambda: store.get(stuck.id).webhook_status)
    sender = senders(attempts=2, backoff=0.05, timeout=1.0)

    sender.job_finished(stuck)
    assert store.get(stuck.id).webhook_status == "pending"  # returned at once: the POST runs elsewhere
    dead.wait_for(1)

    fine = finished_job(store, healthy.url, track_id="fine")
    sender.job_finished(fine)
    [request] = healthy.wait_for(1)
    assert request.observed == "pending"  # the dead receiver's first attempt was still running: not queued behind it
    assert json.loads(request.body)["track_id"] == "fine"

    assert sender.wait_idle(30)
    assert len(dead.requests) == 2
    assert store.get(stuck.id).webhook_status == "failed: gave up after 2 attempts: no answer within 1 s"
    assert store.get(fine.id).webhook_status == "delivered"


def test_a_closed_port_is_retried_then_given_up(store, senders):
    sender = senders(attempts=3, backoff=0.05)
    job = finished_job(store, f"http://127.0.0.1:{free_port()}/hook")
    sender.job_finished(job)
    assert store.get(job.id).webhook_status == "pending"
    assert sender.wait_idle(30)

    status = store.get(job.id).webhook_status
    assert status.startswith("failed: gave up after 3 attempts: could not connect"), status


def test_an_unusable_url_is_not_retried(store, senders):
    sender = senders()
    job = finished_job(store, "ftp://example.test/hook")
    sender.job_finished(job)
    assert sender.wait_idle(30)
    status = store.get(job.id).webhook_status
    assert status.startswith("failed: invalid webhook URL") and status.endswith("(not retried)"), status


# --------------------------------------------------------------------------- shutdown


def test_stop_gives_up_scheduled_retries_and_records_it(store, senders, receivers):
    receiver = receivers(default=(500, {}, 0.0))
    sender = senders(attempts=5, backoff=30.0)
    job = finished_job(store, receiver.url)
    sender.job_finished(job)
    receiver.wait_for(1)
    deadline = time.monotonic() + 5
    while not store.get(job.id).webhook_status.startswith("retrying") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.get(job.id).webhook_status == "retrying: attempt 2 of 5 after HTTP 500"

    sender.stop(timeout=2.0)  # the 30 s retry is given up, not waited for
    assert sender.wait_idle(0)
    assert len(receiver.requests) == 1
    assert store.get(job.id).webhook_status == "failed: not retried, the server stopped (after 1 of 5 attempts)"

    again = finished_job(store, receiver.url, track_id="after-stop")  # a later delivery restarts the senders
    receiver.default = (200, {}, 0.0)
    sender.job_finished(again)
    assert sender.wait_idle(30)
    assert store.get(again.id).webhook_status == "delivered"
