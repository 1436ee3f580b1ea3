"""The Modal deployment, offline (no token, no network): modal_app imports and has the shape the
product card asks for (read back through `Function.info()`), and the FastAPI app built with the
Modal runtime serves requests end to end — with in-memory stand-ins for the cloud's Dicts and
`.spawn()` (tests/modal/standins.py) and a GPU-worker stand-in running the real engine on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from infra.runtime import Runtime
from infra.settings import Settings
from infra.web.api import create_app
from tests.conftest import KEY
from tests.modal.standins import FakeDict, FakeFunction

ROOT = Path(__file__).resolve().parents[2]


def deployment_shape(**env) -> dict:
    """Import modal_app in a fresh process (no Modal token) and read its functions' info."""
    script = """
import json, tomllib, modal_app
project = tomllib.loads(open(modal_app.PYPROJECT).read())["project"]  # what the images install (one place)
def info(f):
    i = f.info()
    return {"gpus": i.gpus, "volumes": sorted(i.volumes), "secrets": i.secrets, "timeout": i.timeout,
            "schedule": repr(i.schedule) if i.schedule else None, "web": i.web_info is not None,
            "max_inputs": i.concurrency_info.max_inputs if i.concurrency_info else None}
worker = modal_app.Worker._get_class_service_function()
print(json.dumps({"worker": info(worker), "web": info(modal_app.web), "download": info(modal_app.download_model),
                  "clean": info(modal_app.clean_caches), "methods": worker.info().method_names,
                  "web_packages": project["dependencies"],
                  "gpu_packages": [p for extra in modal_app.GPU_EXTRAS for p in project["optional-dependencies"][extra]]}))
"""
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**clean_env, **env, "HOME": "/nonexistent"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_deployment_has_the_shape_of_the_product_card():
    shape = deployment_shape()
    worker, web, download, clean = shape["worker"], shape["web"], shape["download"], shape["clean"]
    assert worker["gpus"] == [["A100-80GB", 1]] and shape["methods"] == ["run"] and worker["max_inputs"] == 1
    assert worker["volumes"] == ["/data", "/weights"] and worker["timeout"] == 3600
    assert web["web"] and web["gpus"] == [] and web["max_inputs"] == 100 and web["timeout"] == 150
    assert download["gpus"] == [] and download["volumes"] == ["/weights"]
    assert clean["schedule"] and "Cron" in clean["schedule"]
    for function in (worker, web, download, clean):
        assert function["secrets"] == ["modal.Secret.from_name('sd-enterprise-api')"]
    assert not any(package.startswith(("torch", "diffusers")) for package in shape["web_packages"])  # light web tier
    assert {"torch==2.13.0", "diffusers==0.42.1"} <= set(shape["gpu_packages"])


def test_gpu_type_is_chosen_at_deploy_time():
    assert deployment_shape(SDAPI_MODAL_GPU="H100")["worker"]["gpus"] == [["H100", 1]]


# --------------------------------------------------------------------------- the app on the Modal runtime


@pytest.fixture
def modal_client(models_dir, tmp_path):
    """The web app with Runtime.modal over stand-in Dicts; `spawn_job` runs a ModalWorker (the
    GPU class's body) on a thread, `spawn_load` the download function's body."""
    from infra.modal_worker import ModalWorker, run_download

    shutil.copytree(models_dir, tmp_path / "weights")
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "weights", build_tiny_models=False,
                        fetch_known_models=False, cleanup_interval=0)
    holder = {}
    run_job = FakeFunction(lambda job_id: holder["worker"].run(job_id))
    load = FakeFunction(lambda request: run_download(holder["runtime"], request))
    holder["commits"], holder["reloads"] = [], []  # what Volume.commit / Volume.reload would be asked
    runtime = Runtime.modal(FakeDict(), FakeDict(), FakeDict(), FakeDict(), run_job.spawn, load.spawn, "modal: test",
                            commit_weights=lambda: holder["commits"].append("weights"),
                            reload_weights=lambda: holder["reloads"].append("weights"),
                            commit_outputs=lambda: holder["commits"].append("outputs"), settings=settings)
    holder["runtime"] = runtime
    holder["worker"] = ModalWorker(runtime, device="cpu")
    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        yield client, holder


def test_the_web_app_on_the_modal_runtime_runs_jobs_end_to_end(modal_client):
    client, holder = modal_client
    result = client.post("/api/v1/enterprise/text2img", json={"key": KEY, "prompt": "x", "width": 64, "height": 64,
                                                              "steps": 2}).json()
    assert result["status"] == "success", result
    assert "outputs" in holder["commits"]  # the worker's file is committed for the web tier to serve
    assert client.get(result["output"][0]).content[:8] == b"\x89PNG\r\n\x1a\n"
    fetched = client.post(f"/api/v1/enterprise/fetch/{result['id']}", json={"key": KEY}).json()
    assert fetched["status"] == "success" and fetched["output"] == result["output"]
    details = client.post("/api/v1/enterprise/system_details", json={"key": KEY}).json()
    assert details["device"] == "modal: test" and details["queue_num"] == 0


@pytest.mark.parametrize("endpoint", ["restart_server", "update_server", "clear_cache"])
def test_admin_endpoints_on_modal_retire_the_workers(modal_client, endpoint):
    client, holder = modal_client
    worker = holder["worker"]
    assert not worker.outdated()
    assert client.post(f"/api/v1/enterprise/{endpoint}", json={"key": KEY}).json()["status"] == "success"
    assert worker.outdated()  # the GPU class stops fetching inputs; fresh containers take over


def test_the_web_tier_on_the_modal_runtime_never_imports_torch(tmp_path):
    script = f"""
import sys
from fastapi.testclient import TestClient
from infra.web.api import create_app
from infra.runtime import Runtime
from infra.settings import Settings
from tests.modal.standins import FakeDict
settings = Settings(data_dir={str(tmp_path)!r}, build_tiny_models=False)
runtime = Runtime.modal(FakeDict(), FakeDict(), FakeDict(), FakeDict(), lambda job_id: None, lambda request: None, "modal: test",
                        settings=settings)
with TestClient(create_app(runtime)) as client:
    assert client.post("/api/v1/enterprise/system_details", json={{"key": "{KEY}"}}).status_code == 200
    assert client.post("/api/v1/enterprise/text2img", json={{"key": "{KEY}", "prompt": "x", "instant_response": "yes",
                                                            "model_id": "missing"}}).status_code == 404
print("HEAVY:", sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY: []" in result.stdout


def test_model_loads_on_modal_go_to_the_download_function(modal_client, tmp_path):
    from tests.upscaler_files import write_esrgan

    client, holder = modal_client
    write_esrgan(tmp_path / "x2.pth", scale=2)
    runtime = holder["runtime"]
    runtime.settings.allow_local_model_paths = True  # a local file stands in for a download here
    response = client.post("/api/v1/enterprise/load_model_v2", json={
        "key": KEY, "url": str(tmp_path / "x2.pth"), "model_id": "x2", "model_category": "upscaler",
        "model_format": "pth"})
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 60
    while runtime.weights.get("x2").status == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert runtime.weights.get("x2").status == "ready"
    # every manifest change (loading -> ready) was committed for the other containers, reads reloaded
    assert holder["commits"].count("weights") >= 2 and holder["reloads"]
