"""`meta` is derived from the typed params (handlers/meta.py), not spelled out per handler: for the
same request it must still be, key for key, what the previous release answered (the requests and
that release's stored meta: tests/fixtures/job_records_v1.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "job_records_v1.json").read_text())
OLD_META = {row["endpoint"]: json.loads(row["meta"]) for row in FIXTURE["rows"]}
VARYING = ("file_prefix",)  # a fresh uuid per job


@pytest.fixture(scope="module")
def queued_only(models_dir, tmp_path_factory):
    """An app whose jobs are recorded, not run (meta is fixed when the job is created), on its own
    copy of the models (super_resolution begins its upscaler's load in the store)."""
    import shutil

    from tests.conftest import open_client

    own = tmp_path_factory.mktemp("meta-models") / "models"
    shutil.copytree(models_dir, own)
    client = open_client(tmp_path_factory.mktemp("meta"), own, fetch_known_models=True,
                         known_model_urls={"RealESRGAN_x2plus": "http://127.0.0.1:9/none.pth"})
    runtime = client.app.state.runtime
    runtime.dispatcher.submit = lambda job_id: None
    runtime.dispatcher.load = lambda request: None
    yield client
    client.__exit__(None, None, None)


@pytest.mark.parametrize("endpoint", list(FIXTURE["bodies"]))
def test_meta_is_what_the_previous_release_answered(queued_only, endpoint):
    answer = queued_only.post(f"/api/v1/enterprise/{endpoint}", json=FIXTURE["bodies"][endpoint]).json()
    assert answer["status"] == "processing", answer
    meta, old = answer["meta"], OLD_META[endpoint]
    for name in VARYING:
        assert (name in meta) == (name in old)
        meta.pop(name, None), old.pop(name, None)
    assert meta == old
