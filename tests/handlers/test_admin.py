"""The server admin endpoints, each judged by its effect: clear_queue, restart_server,
clear_cache, update_server, system_details."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

from tests.conftest import KEY

API = "/api/v1/enterprise"


def post(client, endpoint: str, key: str = KEY, **body):
    return client.post(f"{API}/{endpoint}", json={"key": key, **body})


def slow(**fields) -> dict:
    """A job that keeps the single worker busy for a few seconds on the tiny model."""
    return {"prompt": "x", "width": 512, "height": 512, "steps": 40, "instant_response": "yes", **fields}


def quick(**fields) -> dict:
    return {"prompt": "x", "width": 64, "height": 64, "steps": 2, "instant_response": "yes", **fields}


def wait_done(client, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = post(client, "fetch", request_id=job_id).json()
        if result["status"] != "processing":
            return result
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still processing")


def wait_started(client, job_id: int, timeout: float = 60) -> None:
    jobs = client.app.state.runtime.jobs
    deadline = time.monotonic() + timeout
    while jobs.get(job_id).started_at is None:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)


def test_clear_queue_cancels_queued_jobs_and_lets_the_running_one_finish(make_client, receiver):
    url, received = receiver
    client = make_client()
    running = post(client, "text2img", **slow()).json()["id"]
    wait_started(client, running)
    queued = [post(client, "text2img", **quick(webhook=url, track_id=f"t{n}")).json()["id"] for n in range(3)]
    result = post(client, "clear_queue").json()
    assert result["status"] == "success" and sorted(result["cancelled"]) == sorted(queued)
    for job_id in queued:
        cancelled = post(client, "fetch", request_id=job_id).json()
        assert cancelled["status"] == "failed" and "Cancelled by clear_queue" in cancelled["message"]
    assert wait_done(client, running)["status"] == "success"
    deadline = time.monotonic() + 10
    while len(received) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p["track_id"] for p in received) == ["t0", "t1", "t2"]
    assert all(p["status"] == "failed" and "Cancelled" in p["message"] for p in received)
    assert post(client, "clear_queue").json()["cancelled"] == []


def test_restart_server_gives_a_fresh_engine_and_keeps_the_queue(make_client):
    client = make_client()
    dispatcher = client.app.state.runtime.dispatcher
    assert post(client, "text2img", **quick(instant_response="no")).json()["status"] == "success"
    before = dispatcher.engine()
    running = post(client, "text2img", **slow()).json()["id"]
    wait_started(client, running)
    queued = post(client, "text2img", **quick()).json()["id"]
    result = post(client, "restart_server").json()
    assert result["status"] == "success" and result["message"] == "server restarting"
    assert "tiny-sd" in result["models_unloaded"] and result["jobs_kept"] == 2
    assert wait_done(client, running)["status"] == "success"
    assert wait_done(client, queued)["status"] == "success"
    assert dispatcher.engine() is not before  # the queued job ran on the new engine


def test_clear_cache_unloads_models_and_cleans(make_client):
    client = make_client(job_retention_seconds=0, cleanup_interval=0)
    runtime = client.app.state.runtime
    done = post(client, "text2img", **quick(instant_response="no")).json()
    assert "tiny-sd" in post(client, "system_details").json()["loaded_models"]
    scratch = runtime.weights.root / ".tmp-gone-model-abc123"
    (scratch / "sub").mkdir(parents=True)
    (scratch / "sub" / "weights.bin").write_bytes(b"x" * 1000)
    result = post(client, "clear_cache").json()
    assert result["status"] == "success" and result["message"] == "Cache cleared successfully"
    assert "tiny-sd" in result["models_unloaded"]
    assert result["old_jobs"] >= 1 and result["download_scratch"] == 1 and result["bytes_freed"] >= 1000
    assert not scratch.exists()
    assert post(client, "system_details").json()["loaded_models"] == []
    assert post(client, "fetch", request_id=done["id"]).status_code == 404  # past its retention (0 s)
    assert post(client, "text2img", **quick(instant_response="no")).json()["status"] == "success"  # loads again


def test_update_server_applies_new_settings_and_names_the_rest(make_client, monkeypatch):
    client = make_client()
    monkeypatch.setenv("SDAPI_NSFW_THRESHOLD", "0.75")
    monkeypatch.setenv("SDAPI_API_KEYS", f"{KEY},rotated-key")
    monkeypatch.setenv("SDAPI_PORT", "9999")
    result = post(client, "update_server").json()
    assert result["status"] == "success" and result["version"] == client.app.version
    assert {"nsfw_threshold", "api_keys"} <= set(result["settings_changed"])
    assert "port" in result["needs_restart"] and "port" not in result["settings_changed"]
    assert post(client, "system_details", key="rotated-key").status_code == 200
    check = post(client, "nsfw_image_check", init_image="iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4"
                                                         "nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC").json()
    assert check["threshold"] == 0.75
    assert post(client, "update", key="rotated-key").json()["settings_changed"] == []  # the SDKs' alias


def test_update_server_applies_the_webhook_settings_it_reports(make_client, receivers, monkeypatch):
    """Every setting update_server lists as changed takes effect at once: the webhook attempts and
    backoff of the next delivery, and the secret that signs it."""
    client = make_client(webhook_backoff=0.05)
    failing, ok = receivers(default=(500, {}, 0.0)), receivers()
    monkeypatch.setenv("SDAPI_FETCH_ALLOWLIST", "127.0.0.1,localhost")  # as the test client was built
    monkeypatch.setenv("SDAPI_WEBHOOK_ATTEMPTS", "2")
    monkeypatch.setenv("SDAPI_WEBHOOK_BACKOFF", "0.05")
    monkeypatch.setenv("SDAPI_WEBHOOK_SECRET", "rotated-secret")
    changed = post(client, "update_server").json()["settings_changed"]
    assert {"webhook_attempts", "webhook_secret"} <= set(changed)

    given_up = wait_done(client, post(client, "text2img", **quick(webhook=failing.url)).json()["id"])
    deadline = time.monotonic() + 30
    # (webhook_status appears once the delivery has recorded its first state: just after the job ends, under load)
    while not (post(client, "fetch", request_id=given_up["id"]).json().get("webhook_status") or "").startswith("failed"):
        assert time.monotonic() < deadline, "the webhook was never given up"
        time.sleep(0.05)
    assert len(failing.requests) == 2  # the new attempts, not the 5 the server started with

    delivered = wait_done(client, post(client, "text2img", **quick(webhook=ok.url)).json()["id"])
    [delivery] = ok.wait_for(1)
    headers, body = delivery.headers, delivery.body
    expected = hmac.new(b"rotated-secret", f"{headers['X-Webhook-Timestamp']}.".encode() + body,
                        hashlib.sha256).hexdigest()
    assert headers["X-Webhook-Signature"] == f"sha256={expected}"  # signed with the new secret
    assert json.loads(body)["id"] == delivered["id"]


def test_update_server_applies_a_smaller_model_cache_at_once(make_client, monkeypatch):
    client = make_client()
    assert post(client, "text2img", **quick(instant_response="no")).json()["status"] == "success"
    monkeypatch.setenv("SDAPI_FETCH_ALLOWLIST", "127.0.0.1,localhost")
    monkeypatch.setenv("SDAPI_MODEL_CACHE_MB", "0")
    assert "model_cache_mb" in post(client, "update_server").json()["settings_changed"]
    inpaint = {"init_image": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"}
    done = post(client, "inpaint", **quick(instant_response="no", mask_image=inpaint["init_image"], **inpaint)).json()
    assert done["status"] == "success", done
    # a budget of 0 MB keeps only the model the last job needed
    assert post(client, "system_details").json()["loaded_models"] == ["tiny-sd-inpaint"]


def test_system_details_reports_the_server(module_client):
    details = post(module_client, "system_details").json()
    assert details["status"] == "ok" and details["memory_mb"] > 0
    assert details["storage"]["kind"] == "local"
    assert isinstance(details["loaded_models"], list)
