"""The Modal deployment, offline (no token, no network): modal_app imports and has the shape the
product card asks for (read back through `Function.info()` in a fresh process), and the deployment
on the stand-in (tests/modal/cloud.py) serves requests end to end: the web function's ASGI app, the
GPU class running the real engine on the CPU, the downloader, the Volumes and Dicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import KEY
from tests.modal.conftest import API, FileServer, post, t2i

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


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
names = ("web", "download_model", "deliver_webhook", "recover_jobs", "clean_caches")
print(json.dumps({"worker": info(worker), **{name: info(getattr(modal_app, name)) for name in names},
                  "methods": worker.info().method_names, "snapshot": modal_app.WORKER_OPTIONS["enable_memory_snapshot"],
                  "web_packages": project["dependencies"],
                  "gpu_packages": [p for extra in modal_app.GPU_EXTRAS for p in project["optional-dependencies"][extra]]}))
"""
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SDAPI_"))}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**clean_env, **env, "HOME": "/nonexistent"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_deployment_has_the_shape_of_the_product_card():
    shape = deployment_shape()
    worker, web, download = shape["worker"], shape["web"], shape["download_model"]
    assert worker["gpus"] == [["A100-80GB", 1]] and shape["methods"] == ["run"] and worker["max_inputs"] == 1
    assert worker["volumes"] == ["/compile-cache", "/data", "/weights"] and worker["timeout"] == 3600
    assert shape["snapshot"] is True
    assert web["web"] and web["gpus"] == [] and web["max_inputs"] == 100 and web["timeout"] == 150
    assert download["gpus"] == [] and download["volumes"] == ["/weights"]  # a download never holds a GPU
    assert shape["deliver_webhook"]["gpus"] == [] and shape["deliver_webhook"]["volumes"] == []
    assert "Cron" in shape["clean_caches"]["schedule"] and "Period" in shape["recover_jobs"]["schedule"]
    for name in ("worker", "web", "download_model", "deliver_webhook", "recover_jobs", "clean_caches"):
        assert shape[name]["secrets"] == ["modal.Secret.from_name('sd-enterprise-api')"], name
    assert not any(package.startswith(("torch", "diffusers")) for package in shape["web_packages"])  # light web tier
    assert {"torch==2.13.0", "diffusers==0.42.1"} <= set(shape["gpu_packages"])


def test_the_gpu_and_the_web_concurrency_are_chosen_at_deploy_time():
    shape = deployment_shape(SDAPI_MODAL_GPU="H100", SDAPI_MODAL_WEB_MAX_INPUTS="40")
    assert shape["worker"]["gpus"] == [["H100", 1]] and shape["web"]["max_inputs"] == 40


# --------------------------------------------------------------------------- the deployment on the stand-in


def test_the_deployment_runs_jobs_end_to_end(cloud):
    result = post(cloud, "text2img", **t2i())
    assert result["status"] == "success", result
    assert cloud.volumes["data"].commits  # the worker's file was committed for the web tier to serve
    image = cloud.web_request("GET", result["output"][0].removeprefix("https://web.modal.run"))
    assert image.status_code == 200 and image.content[:8] == PNG
    fetched = post(cloud, f"fetch/{result['id']}")
    assert fetched["status"] == "success" and fetched["output"] == result["output"]
    details = post(cloud, "system_details")
    assert details["device"] == "modal: A100-80GB" and details["queue_num"] == 0
    assert "tiny-sd" in details["models"]


@pytest.mark.parametrize("endpoint", ["restart_server", "update_server", "clear_cache"])
def test_admin_endpoints_on_modal_retire_the_workers(cloud, endpoint):
    assert post(cloud, "text2img", **t2i())["status"] == "success"
    (first,) = cloud.containers("Worker")
    assert post(cloud, endpoint)["status"] == "success"
    assert post(cloud, "text2img", **t2i())["status"] == "success"
    workers = cloud.containers("Worker")
    assert len(workers) == 2 and not first.alive  # the old container stopped taking inputs
    assert len(first.inputs) == 2 and len(workers[1].inputs) == 1  # it handed its job on to a fresh one


def test_the_web_tier_on_the_modal_runtime_never_imports_torch(tmp_path):
    script = f"""
import sys
from fastapi.testclient import TestClient
from infra.jobs.modal_dispatch import ModalHandles
from infra.web.api import create_app
from infra.runtime import Runtime
from infra.settings import Settings
from tests.modal.standins import FakeDict
settings = Settings(data_dir={str(tmp_path)!r}, build_tiny_models=False, api_keys="{KEY}")
handles = ModalHandles(jobs=FakeDict(), inputs=FakeDict(), queue=FakeDict(), config=FakeDict(), usage=FakeDict(),
                       spawn_job=lambda job_id: None, spawn_load=lambda request: None, device_label="modal: test")
runtime = Runtime.modal(handles, settings)
with TestClient(create_app(runtime)) as client:
    assert client.post("{API}/system_details", json={{"key": "{KEY}"}}).status_code == 200
    assert client.post("{API}/text2img", json={{"key": "{KEY}", "prompt": "x", "instant_response": "yes",
                                               "model_id": "missing"}}).status_code == 404
print("HEAVY:", sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SDAPI_"))}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=clean_env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY: []" in result.stdout


def test_model_loads_on_modal_go_to_the_download_function(cloud, tmp_path):
    from infra.engine import LOAD_LOCK
    from tests.upscaler_files import write_esrgan

    with LOAD_LOCK:
        write_esrgan(tmp_path / "x2.pth", scale=2)
    files = FileServer({"x2.pth": tmp_path / "x2.pth"})
    try:
        answer = post(cloud, "load_model_v2", url=f"{files.url}/x2.pth", model_id="x2", model_category="upscaler",
                      model_format="pth")
        assert answer["status"] == "success", answer
        deadline = time.monotonic() + 60
        while (state := post(cloud, "verify_model", model_id="x2"))["status"] == "processing":
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
    finally:
        files.close()
    assert state["status"] == "success", state
    assert cloud.containers("download_model") and not cloud.containers("Worker")  # no GPU for a download
    assert cloud.volumes["weights"].commits  # committed for every other container to see
    listed = post(cloud, "get_all_models")
    assert "x2" in json.dumps(listed)


# --------------------------------------------------------------------------- a GPU class per model family


def _classes_shape(**env) -> subprocess.CompletedProcess:
    script = """
import json, modal, modal_app
classes = {name: value for name, value in vars(modal_app).items() if isinstance(value, modal.Cls)}
print(json.dumps({name: {"gpus": c._get_class_service_function().info().gpus,
                         "methods": c._get_class_service_function().info().method_names} for name, c in classes.items()}
                 | {"label": modal_app.DEVICE_LABEL, "routes": modal_app.FAMILY_GPUS}))
"""
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SDAPI_"))}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**clean_env, **env, "HOME": "/nonexistent"},
                          capture_output=True, text=True, timeout=120)


def test_a_gpu_class_per_distinct_gpu_type_of_the_family_routes():
    done = _classes_shape(SDAPI_MODAL_FAMILY_GPUS="flux=H100, flux2=H100,qwen=H100,sd3=L40S,sd=A100-80GB")
    assert done.returncode == 0, done.stderr
    shape = json.loads(done.stdout.strip().splitlines()[-1])
    assert shape.pop("routes") == {"flux": "H100", "flux2": "H100", "qwen": "H100", "sd3": "L40S"}  # sd: the default
    assert shape.pop("label") == "modal: A100-80GB (flux: H100, flux2: H100, qwen: H100, sd3: L40S)"
    assert shape == {"Worker": {"gpus": [["A100-80GB", 1]], "methods": ["run"]},
                     "Worker_H100": {"gpus": [["H100", 1]], "methods": ["run"]},
                     "Worker_L40S": {"gpus": [["L40S", 1]], "methods": ["run"]}}
    default = json.loads(_classes_shape().stdout.strip().splitlines()[-1])
    assert set(default) == {"Worker", "label", "routes"} and default["routes"] == {}  # no routes: one class
    for bad in ("flux", "fluxx=H100", "flux="):
        refused = _classes_shape(SDAPI_MODAL_FAMILY_GPUS=bad)
        assert refused.returncode != 0 and "SDAPI_MODAL_FAMILY_GPUS" in refused.stderr, bad


@pytest.fixture
def family_cloud(models_dir, tmp_path, monkeypatch):
    """The deployment with Flux on H100 and SD3 on L40S (modal_app imported afresh with that setting, as a
    `modal deploy` with it would), its weights Volume holding the tiny models and a tiny Flux."""
    import importlib.util

    from infra.catalog.weights import WeightsStore
    from infra.engine import LOAD_LOCK
    from infra.engine.files.tiny import build_tiny_flux
    from tests.modal.cloud import Cloud
    from tests.modal.conftest import SECRET

    monkeypatch.setenv("SDAPI_MODAL_FAMILY_GPUS", "flux=H100,sd3=L40S")
    spec = importlib.util.spec_from_file_location("modal_app_families", ROOT / "modal_app.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    with LOAD_LOCK:
        WeightsStore(tmp_path / "flux").install("flux-tiny", "flux", build_tiny_flux, family="flux")
    cloud = Cloud.deploy(module, tmp_path / "cloud", monkeypatch, SECRET)
    cloud.volumes["weights"].seed(models_dir)
    cloud.volumes["weights"].seed(tmp_path / "flux")
    yield cloud
    cloud.close()


def test_a_flux_job_runs_on_the_flux_gpu_class_and_an_sd_job_on_the_default_one(family_cloud):
    cloud = family_cloud
    assert cloud.gpus == {"Worker": "A100-80GB", "Worker_H100": "H100", "Worker_L40S": "L40S"}
    flux = post(cloud, "text2img", **t2i(model_id="flux-tiny"))
    assert flux["status"] == "success", flux
    assert len(cloud.containers("Worker_H100")) == 1 and not cloud.containers("Worker")
    sd = post(cloud, "text2img", **t2i())
    assert sd["status"] == "success", sd
    (h100,), (default,) = cloud.containers("Worker_H100"), cloud.containers("Worker")
    assert len(h100.inputs) == 1 and len(default.inputs) == 1 and not cloud.containers("Worker_L40S")
    # each class's snapshot holds the default model (tiny-sd) only where its family runs
    assert h100.state.worker.engine.loaded() == ["flux-tiny"]
    assert "tiny-sd" in default.state.worker.engine.loaded()
    details = post(cloud, "system_details")
    assert details["device"] == "modal: A100-80GB (flux: H100, sd3: L40S)"
    assert details["memory"]["settings"]["text_encoder_offload"] == "auto"  # baked into every image
    assert details["memory"]["settings"]["quantization"] == "none"
    # what each container's engine applied, as the GPU containers reported it
    reported = details["memory"]["models"]
    assert set(reported) == {"flux-tiny", "tiny-sd"}, reported
    assert reported["flux-tiny"]["text_encoders_on_device"] == ["text_encoder_2"]
    assert reported["tiny-sd"]["quantization"] == "none" and reported["tiny-sd"]["device"].startswith("cpu")
    assert post(cloud, "restart_server")["status"] == "success"
    assert post(cloud, "system_details")["memory"]["models"] == {}  # (reported again by the fresh containers)
