"""Kill-and-restart: a real server process killed (SIGKILL) while a job runs. After a restart on
the same data dir the job ends `success` (retried: SDAPI_JOB_ATTEMPTS allows a second start) or,
with no attempts left, `failed` with a message — never `processing` forever."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from infra.jobs.store import SqliteJobStore
from tests.conftest import ServerProcess as Server


@pytest.fixture
def dirs(models_dir, tmp_path):
    shutil.copytree(models_dir, tmp_path / "models")
    return tmp_path / "data", tmp_path / "models"


def kill_mid_job(data_dir: Path, models_dir: Path) -> tuple[int, int]:
    """Start a server, give it a long job, kill the process once the job is running.
    Returns (job id, the server's port: the restarted server takes it again, as a real one would)."""
    server = Server(data_dir, models_dir)
    try:
        # long enough to be killed running (seconds), short enough to run again after the restart
        job_id = server.post("text2img", prompt="x", width=256, height=256, steps=50, instant_response="yes")["id"]
        jobs = SqliteJobStore(data_dir / "jobs.sqlite3")
        deadline = time.monotonic() + 60
        while jobs.get(job_id).started_at is None:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        time.sleep(0.5)
        assert jobs.get(job_id).status == "processing"
        server.kill()
    finally:
        server.stop()
    return job_id, server.port


def wait_done(server: Server, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (result := server.post("fetch", request_id=job_id))["status"] == "processing":
        assert time.monotonic() < deadline, "still processing after the restart"
        time.sleep(0.2)
    return result


@pytest.mark.slow
def test_a_job_killed_mid_run_is_retried_after_the_restart(dirs):
    data_dir, models_dir = dirs
    job_id, port = kill_mid_job(data_dir, models_dir)
    server = Server(data_dir, models_dir, port, job_attempts=2)
    try:
        result = wait_done(server, job_id)
        assert result["status"] == "success"
        assert httpx.get(result["output"][0]).status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_a_job_killed_with_no_attempts_left_fails_with_a_message(dirs):
    data_dir, models_dir = dirs
    job_id, port = kill_mid_job(data_dir, models_dir)
    server = Server(data_dir, models_dir, port, job_attempts=1)
    try:
        result = wait_done(server, job_id, timeout=30)
        assert result["status"] == "failed" and "stopped while this job was running" in result["message"]
    finally:
        server.stop()
