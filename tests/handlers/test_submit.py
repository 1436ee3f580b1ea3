"""What every job endpoint shares (handlers/submit.py): every check first, side effects after.

A request that is refused leaves nothing behind: no download of a model fetched on first use is
started for it (the upscaler of `upscale: yes`, super_resolution's network, a known motion
adapter). And a request reads each model's manifest once: the handler checks a model in one place
and passes its entry on (the engine reads it once more when the job runs, in case it was deleted)."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest

from infra.catalog.weights import WeightsStore
from tests.conftest import KEY, open_client, png_bytes, scene

API = "/api/v1/enterprise"
IMAGE = base64.b64encode(png_bytes(scene(64, 64))).decode()
PRIVATE_HOOK = "http://10.0.0.1/hook"  # refused: a private address


class CountingFiles:
    """A loopback server that answers 404 to everything and counts the requests it got."""

    def __init__(self):
        self.requests = []
        requests = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                self.send_response(404)
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def fetching(models_dir, tmp_path):
    """An app that fetches the well-known models on first use, from a loopback server (which has none),
    on its own copy of the models (a fetch begins with a manifest in the store)."""
    import shutil

    shutil.copytree(models_dir, tmp_path / "models")
    files = CountingFiles()
    client = open_client(tmp_path / "data", tmp_path / "models", fetch_known_models=True, known_model_urls={
        "RealESRGAN_x2plus": f"{files.url}/RealESRGAN_x2plus.pth",
        "animatediff-motion-adapter-v1-5-2": f"{files.url}/mm_sd_v15_v2.safetensors",
    })
    yield client, files
    client.__exit__(None, None, None)
    files.server.shutdown()


REFUSED = {
    "upscale, then a private webhook": ("text2img", {"prompt": "x", "upscale": "yes", "webhook": PRIVATE_HOOK},
                                        "RealESRGAN_x2plus", 400),
    "upscale, then an unknown ControlNet": ("controlnet", {"prompt": "x", "upscale": "yes", "control_image": IMAGE,
                                                           "controlnet_model": "no-such-net"}, "RealESRGAN_x2plus", 404),
    "a super_resolution network, then a private webhook": (
        "super_resolution", {"url": IMAGE, "scale": 2, "model_id": "RealESRGAN_x2plus", "webhook": PRIVATE_HOOK},
        "RealESRGAN_x2plus", 400),
    "a known motion adapter, then a private webhook": (
        "text2video", {"prompt": "x", "motion_module": "animatediff-motion-adapter-v1-5-2", "webhook": PRIVATE_HOOK},
        "animatediff-motion-adapter-v1-5-2", 400),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_request_starts_no_download(fetching, case):
    client, files = fetching
    endpoint, body, model_id, status = REFUSED[case]
    response = client.post(f"{API}/{endpoint}", json={"key": KEY, "width": 64, "height": 64, "steps": 2, **body})
    assert response.status_code == status, response.text
    weights = client.app.state.runtime.weights
    assert weights.get(model_id) is None  # no `loading` manifest: the fetch never began
    assert files.requests == []
    assert client.app.state.runtime.jobs.unfinished() == (0, 0.0)


def test_an_accepted_request_does_start_the_download(fetching):
    """The check above can see a download: the same request, accepted, starts one."""
    client, files = fetching
    body = {"key": KEY, "url": IMAGE, "scale": 2, "model_id": "RealESRGAN_x2plus", "instant_response": "yes"}
    assert client.post(f"{API}/super_resolution", json=body).json()["status"] == "processing"
    assert client.app.state.runtime.weights.get("RealESRGAN_x2plus") is not None


def test_a_request_reads_each_models_manifest_once(client, monkeypatch):
    """Handler side (the request's threads) and engine side (the worker's) each read a model once."""
    reads: dict[str, list[str]] = {"handler": [], "engine": []}
    real_get = WeightsStore.get

    def counting_get(self, model_id):
        side = "engine" if threading.current_thread().name.startswith("worker-") else "handler"
        reads[side].append(model_id)
        return real_get(self, model_id)

    monkeypatch.setattr(WeightsStore, "get", counting_get)
    body = {"key": KEY, "prompt": "x", "init_image": IMAGE, "mask_image": IMAGE, "width": 64, "height": 64,
            "steps": 2, "safety_checker": "no"}
    assert client.post(f"{API}/inpaint", json=body).json()["status"] == "success"
    assert reads["handler"] == ["tiny-sd-inpaint"]
    assert reads["engine"].count("tiny-sd-inpaint") == 1


def test_super_resolution_reads_its_networks_manifest_once(models_dir, tmp_path, monkeypatch):
    import shutil
    import time

    from infra.engine import LOAD_LOCK
    from tests.upscaler_files import write_esrgan

    own = tmp_path / "models"
    shutil.copytree(models_dir, own)
    client = open_client(tmp_path / "data", own)
    with LOAD_LOCK:
        write_esrgan(tmp_path / "x2.pth", scale=2)
    load = {"key": KEY, "url": str(tmp_path / "x2.pth"), "model_id": "my-x2", "model_category": "upscaler",
            "model_format": "pth"}
    assert client.post(f"{API}/load_model_v2", json=load).status_code == 200
    deadline = time.monotonic() + 60
    while client.app.state.runtime.weights.get("my-x2").status != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    reads = []
    real_get = WeightsStore.get

    def counting_get(self, model_id):
        if not threading.current_thread().name.startswith("worker-"):
            reads.append(model_id)
        return real_get(self, model_id)

    monkeypatch.setattr(WeightsStore, "get", counting_get)
    body = {"key": KEY, "url": IMAGE, "scale": 2, "model_id": "my-x2"}
    try:
        assert client.post(f"{API}/super_resolution", json=body).json()["status"] == "success"
    finally:
        client.__exit__(None, None, None)
    assert reads == ["my-x2"]
