"""Job lifecycle: ids, failures that end `failed` with a message, restarts, webhooks."""

from __future__ import annotations

import time

from infra.jobs.job import MAX_ID, Job
from infra.jobs.store import SqliteJobStore
from tests.conftest import KEY, generation_params


def wait_done(client, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = client.post(f"/api/v1/enterprise/fetch/{job_id}", json={"key": KEY}).json()
        if result["status"] != "processing":
            return result
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still processing after {timeout} s")


def test_ids_are_unique_integers_below_2_53(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    ids = {store.create(Job(0, "text2img", generation_params(), {}, [], [])).id for _ in range(500)}
    assert len(ids) == 500 and all(isinstance(i, int) and 0 < i <= MAX_ID for i in ids)


def test_a_job_that_breaks_ends_failed_with_a_message(make_client, monkeypatch):
    client = make_client(sync_timeout=0)
    from infra.engine.engine import DiffusersEngine

    def explode(self, params, inputs, progress=None):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(DiffusersEngine, "generate", explode)
    job = client.post("/api/v1/enterprise/text2img", json={"key": KEY, "prompt": "x", "width": 64, "height": 64}).json()
    result = wait_done(client, job["id"])
    assert result["status"] == "failed"
    assert result["id"] == job["id"]
    assert "CUDA out of memory (simulated)" in result["message"]
    assert result["output"] == []


def test_jobs_fail_cleanly_when_the_engine_cannot_start(make_client, monkeypatch):
    from infra.engine.engine import DiffusersEngine

    def broken(self, settings, weights, device=None):
        raise ImportError("libcudart.so.12: cannot open shared object file (simulated)")

    monkeypatch.setattr(DiffusersEngine, "__init__", broken)
    client = make_client(sync_timeout=0)
    jobs = [client.post("/api/v1/enterprise/text2img", json={"key": KEY, "prompt": "x"}).json() for _ in range(2)]
    for job in jobs:
        result = wait_done(client, job["id"])
        assert result["status"] == "failed" and "libcudart" in result["message"]


def _orphans(client, data_dir, started_attempts: list[int]) -> list[int]:
    """Jobs a dead server left `processing` in `data_dir`'s database: copies of a real text2img
    job, one per entry of `started_attempts` (0 = still queued, n = started n times)."""
    done = client.post("/api/v1/enterprise/text2img",
                       json={"key": KEY, "prompt": "x", "width": 64, "height": 64, "steps": 2}).json()
    template = client.app.state.runtime.jobs.get(done["id"])
    store = SqliteJobStore(data_dir / "jobs.sqlite3")
    ids = []
    for n, attempts in enumerate(started_attempts):
        keys = [f"generations/orphan-{n}.png"]
        job = store.create(Job(0, "text2img", template.params, template.meta, keys, [f"http://testserver/files/{keys[0]}"]))
        if attempts:
            store.update(job.id, started_at=time.time(), attempts=attempts)
        ids.append(job.id)
    return ids


def test_jobs_left_processing_by_a_dead_server_are_run_again_or_failed(make_client, tmp_path):
    """Queued jobs run after the restart; a job that was running is retried while it has
    attempts left (SDAPI_JOB_ATTEMPTS), else it ends `failed` saying so."""
    queued, retried, exhausted = _orphans(make_client(), tmp_path / "dead", [0, 1, 2])
    client = make_client(data_dir=tmp_path / "dead", job_attempts=2)
    results = {}
    deadline = time.monotonic() + 60
    while len(results) < 3 and time.monotonic() < deadline:
        for job_id in (queued, retried, exhausted):
            result = client.post("/api/v1/enterprise/fetch", json={"key": KEY, "request_id": job_id}).json()
            if result["status"] != "processing":
                results[job_id] = result
        time.sleep(0.1)
    assert results[queued]["status"] == "success" and results[retried]["status"] == "success"
    assert client.get(results[retried]["output"][0]).status_code == 200
    assert results[exhausted]["status"] == "failed"
    assert "stopped while this job was running (2 attempts)" in results[exhausted]["message"]
    assert client.app.state.runtime.jobs.get(retried).attempts == 2


def test_results_survive_a_restart(make_client, tmp_path):
    first = make_client(data_dir=tmp_path / "kept")
    done = first.post("/api/v1/enterprise/text2img",
                      json={"key": KEY, "prompt": "x", "width": 64, "height": 64, "steps": 2}).json()
    assert done["status"] == "success"
    first.__exit__(None, None, None)

    second = make_client(data_dir=tmp_path / "kept")
    result = second.post("/api/v1/enterprise/fetch", json={"key": KEY, "request_id": done["id"]}).json()
    assert result["status"] == "success" and result["output"] == done["output"]
    assert second.get(done["output"][0]).status_code == 200


def test_webhook_gets_the_result_with_track_id(client, receiver):
    url, received = receiver
    job = client.post("/api/v1/enterprise/text2img", json={"key": KEY, "prompt": "x", "width": 64, "height": 64,
                                                           "steps": 2, "webhook": url, "track_id": "order-7"}).json()
    assert job["status"] == "success"
    deadline = time.time() + 30
    while not received and time.time() < deadline:
        time.sleep(0.05)
    assert received and received[0]["status"] == "success"
    assert received[0]["id"] == job["id"] and received[0]["track_id"] == "order-7"
    assert received[0]["output"] == job["output"]
    for _ in range(100):
        status = client.post("/api/v1/enterprise/fetch", json={"key": KEY, "request_id": job["id"]}).json()
        if status.get("webhook_status"):
            break
        time.sleep(0.05)
    assert status["webhook_status"] == "delivered"
