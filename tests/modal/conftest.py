"""The deployment on the Modal stand-in (tests/modal/cloud.py), as tests of the modal package use it."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import KEY
from tests.modal.cloud import Cloud

API = "/api/v1/enterprise"

# what an operator puts in the secret for these tests: the built-in tiny models as the defaults, the
# loopback servers the tests run allowed, no downloads from the internet
SECRET = {
    "SDAPI_API_KEYS": KEY,
    "SDAPI_DEFAULT_MODEL_ID": "tiny-sd",
    "SDAPI_DEFAULT_INPAINT_MODEL_ID": "tiny-sd-inpaint",
    "SDAPI_DEFAULT_MOTION_ADAPTER_ID": "tiny-motion-adapter",
    "SDAPI_DEFAULT_IMAGE_TO_VIDEO_MODEL_ID": "tiny-svd",
    "SDAPI_FETCH_KNOWN_MODELS": "false",
    "SDAPI_SAFETY_CHECKER_DEFAULT": "false",
    "SDAPI_FETCH_ALLOWLIST": "127.0.0.1,localhost",
    "SDAPI_TORCH_THREADS": "1",
    "SDAPI_DEFAULT_MODEL_SOURCE": "",  # the defaults are on the Volume (a test of a fresh deployment sets one)
    "SDAPI_DEFAULT_INPAINT_MODEL_SOURCE": "",
}


@pytest.fixture
def deploy(models_dir, tmp_path, monkeypatch):
    """deploy(**secret overrides, latency=, clock=, seed_models=True) -> the deployment on the stand-in,
    its weights Volume holding the built-in tiny models."""
    import modal_app

    made = []

    def make(seed_models: bool = True, **options) -> Cloud:
        secret = {**SECRET, **{k: str(v) for k, v in options.pop("secret", {}).items()}}
        cloud = Cloud.deploy(modal_app, tmp_path / f"cloud{len(made)}", monkeypatch, secret, **options)
        if seed_models:
            cloud.volumes["weights"].seed(models_dir)
        made.append(cloud)
        return cloud

    yield make
    for cloud in made:
        cloud.close()


@pytest.fixture
def cloud(deploy) -> Cloud:
    return deploy()


def post(cloud: Cloud, endpoint: str, **body) -> dict:
    return cloud.web_request("POST", f"{API}/{endpoint}", json={"key": KEY, **body}).json()


def t2i(**fields) -> dict:
    return {"prompt": "x", "width": 64, "height": 64, "steps": 2, **fields}


def wait_done(cloud: Cloud, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        result = post(cloud, "fetch", request_id=job_id)
        if result["status"] != "processing" or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


class FileServer:
    """Loopback files for downloads; `gate` (an Event) holds every answer until it is set."""

    def __init__(self, files: dict[str, Path]):
        self.gate = threading.Event()
        self.gate.set()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                server.gate.wait(60)
                path = files.get(self.path.lstrip("/"))
                if path is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
