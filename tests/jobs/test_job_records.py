"""Job records across releases: what the previous release stored must still load and run.

tests/fixtures/job_records_v1.json holds the jobs table and inputs exactly as release 7e31139 (the
last one with untyped params) wrote them to SQLite, one queued job per endpoint family: text2img
(2 samples, highres_fix, temp, webhook), img2img (DPM++ SDE, clip_skip), inpaint (base64 output,
no safety checker), text2video (gif) and super_resolution (waiting for its upscaler to load). They
were made by running that release's app on the built-in models; `bodies` are the requests sent.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image

from infra.jobs.dict_store import DictJobStore
from infra.jobs.job import FAILED, PROCESSING, SCHEMA_VERSION, SUCCESS, Job
from infra.jobs.params import GenerationParams, UpscaleParams, VideoParams
from infra.jobs.store import SqliteJobStore
from tests.conftest import KEY
from tests.modal.standins import FakeDict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "job_records_v1.json").read_text())
JSON_COLUMNS = ("params", "meta", "output_keys", "future_links")


def v1_records(expires_in: float = 3600.0) -> list[dict]:
    """The stored rows as records (JSON columns decoded); a temp job's expiry moved to `expires_in`
    from now, so its outputs are still served whenever the test runs."""
    records = []
    for row in FIXTURE["rows"]:
        record = {name: json.loads(value) if name in JSON_COLUMNS else value for name, value in row.items()}
        if "expires_at" in record["params"]:
            record["params"]["expires_at"] = time.time() + expires_in
        records.append(record)
    return records


def by_endpoint(records: list[dict]) -> dict[str, dict]:
    return {record["endpoint"]: record for record in records}


def test_every_record_of_the_previous_release_loads_as_typed_params():
    records = by_endpoint(v1_records())
    jobs = {endpoint: Job.from_record(record) for endpoint, record in records.items()}
    assert all(job.schema_version == SCHEMA_VERSION and job.status == PROCESSING for job in jobs.values())
    assert all(job.storage_id == "local" for job in jobs.values())

    text2img = jobs["text2img"]
    old = records["text2img"]["params"]
    assert isinstance(text2img.params, GenerationParams) and text2img.params.task == "text2img"
    assert text2img.params.seeds == (5, 6) and text2img.params.samples == old["samples"] == 2
    assert text2img.params.output_size() == (old["output_width"], old["output_height"]) == (128, 128)
    assert text2img.params.highres_fix.width == 128 and text2img.params.safety_checker.threshold == 0.5
    assert text2img.expires_at == old["expires_at"] and text2img.webhook and text2img.track_id == "t-1"

    img2img = jobs["img2img"].params
    assert (img2img.task, img2img.strength, img2img.clip_skip) == ("img2img", 0.5, 2)
    assert (img2img.scheduler, img2img.algorithm) == ("DPMSolverMultistepScheduler", "sde-dpmsolver++")
    inpaint = jobs["inpaint"].params
    assert inpaint.task == "inpaint" and inpaint.base64 and inpaint.safety_checker is None

    video = jobs["text2video"].params
    assert isinstance(video, VideoParams) and (video.num_frames, video.output_type, video.seed) == (4, "gif", 8)
    upscale = jobs["super_resolution"]
    assert isinstance(upscale.params, UpscaleParams) and upscale.params.scale == 2
    assert upscale.await_models == ["RealESRGAN_x2plus"]
    assert upscale.models_used() == {"RealESRGAN_x2plus"}


@pytest.mark.parametrize("backend", ["sqlite", "modal-dict"])
def test_both_stores_read_a_record_the_previous_release_wrote(backend, tmp_path):
    record = by_endpoint(v1_records())["img2img"]
    if backend == "sqlite":
        path = tmp_path / "jobs.sqlite3"
        _old_database(path, [record])
        store = SqliteJobStore(path)  # upgrades the table in place
    else:
        jobs = FakeDict({record["id"]: record})  # the old DictJobStore kept `asdict(job)`
        store = DictJobStore(jobs, FakeDict(), FakeDict())
    job = store.get(record["id"])
    assert job == Job.from_record(record) and job.params.prompt.startswith("a dog")
    store.update(job.id, status=SUCCESS, finished_at=time.time())
    assert store.get(job.id).status == SUCCESS and store.get(job.id).schema_version == SCHEMA_VERSION
    assert store.create(Job(0, "img2img", job.params, {}, [], [])).id != job.id  # new jobs beside old ones


def test_jobs_queued_by_the_previous_release_run_after_the_upgrade(make_client, tmp_path):
    """A server of this release started on the previous release's data dir: its database is
    upgraded, and every job that release left queued runs to its end under the links it promised."""
    data_dir = tmp_path / "data"
    records = v1_records()
    _old_database(data_dir / "jobs.sqlite3", records, FIXTURE["inputs"])
    client = make_client(data_dir=data_dir)
    ends = {record["endpoint"]: _wait(client, record["id"]) for record in records}

    for endpoint in ("text2img", "img2img", "inpaint", "text2video"):
        assert ends[endpoint]["status"] == SUCCESS, (endpoint, ends[endpoint])
        record = by_endpoint(records)[endpoint]
        assert ends[endpoint]["output"] == record["future_links"]  # the links the old release handed out
    images = [_image(client, link) for link in ends["text2img"]["output"]]
    assert [image.size for image in images] == [(128, 128), (128, 128)]  # highres_fix 2x of 64x64
    assert base64.b64decode(client.get(ends["inpaint"]["output"][0]).content)[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(ends["text2video"]["output"][0]).content[:4] == b"GIF8"
    # its upscaler never finished loading on the old server: the job ends with the reason, not stuck
    assert ends["super_resolution"]["status"] == FAILED
    assert "RealESRGAN_x2plus" in ends["super_resolution"]["message"]


def _old_database(path: Path, records: list[dict], inputs: dict | None = None) -> None:
    """A jobs database with the previous release's table, holding `records` (and their inputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute(FIXTURE["schema"])
    db.execute("CREATE TABLE job_inputs (job_id INTEGER, name TEXT, data BLOB)")
    for record in records:
        row = {name: json.dumps(value) if name in JSON_COLUMNS else value for name, value in record.items()}
        db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        for name, data in (inputs or {}).get(str(record["id"]), {}).items():
            db.execute("INSERT INTO job_inputs VALUES (?, ?, ?)", (record["id"], name, base64.b64decode(data)))
    db.commit()
    db.close()


def _wait(client, job_id: int, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        result = client.post(f"/api/v1/enterprise/fetch/{job_id}", json={"key": KEY}).json()
        if result["status"] != "processing" or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def _image(client, link: str) -> Image.Image:
    response = client.get(link)
    assert response.status_code == 200, link
    return Image.open(io.BytesIO(response.content))


def test_a_record_no_version_reads_ends_the_job_failed_not_stuck(tmp_path):
    """A record the code cannot read (damaged, or written by a newer release) fails its job with a
    message; the worker goes on."""
    from infra.catalog.weights import WeightsStore
    from infra.jobs.dispatch import execute_job
    from tests.conftest import new_job
    from tests.engine.standin import StandInEngine

    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    job = store.create(new_job())
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET params = ? WHERE id = ?", (json.dumps({"kind": "from-a-newer-release"}), job.id))
    finished = []
    webhooks = type("Webhooks", (), {"job_finished": lambda self, job: finished.append(job)})()
    assert execute_job(job.id, store, None, StandInEngine, webhooks, WeightsStore(tmp_path / "weights")) is None
    with sqlite3.connect(path) as db:
        status, message = db.execute("SELECT status, message FROM jobs WHERE id = ?", (job.id,)).fetchone()
    assert status == FAILED and "could not be read" in message
