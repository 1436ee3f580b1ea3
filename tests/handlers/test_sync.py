"""sync_models between two deployments: two real servers on loopback, each with its own data,
keys and weights; the source hands the target signed archive links, the target loads them."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from infra.engine import LOAD_LOCK
from infra.runtime import Runtime
from infra.settings import Settings
from infra.web.api import create_app
from tests.model_files import write_lora

SOURCE_KEY, TARGET_KEY = "source-key", "target-key"


class Server:
    """A real uvicorn server for an app on a free loopback port."""

    def __init__(self, app):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def call(self, endpoint: str, key: str, **body) -> dict:
        response = httpx.post(f"{self.url}/api/v1/enterprise/{endpoint}", json={"key": key, **body}, timeout=120)
        return {"http": response.status_code, **response.json()}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def deployment(tmp_path, models_dir, name: str, key: str) -> Server:
    models = tmp_path / name / "models"
    shutil.copytree(models_dir, models)
    settings = Settings(data_dir=tmp_path / name / "data", models_dir=models, api_keys=[key],
                        fetch_allowlist=["127.0.0.1"])  # the two deployments talk over loopback
    return Server(create_app(Runtime.local(settings)))


@pytest.fixture
def pair(tmp_path, models_dir):
    source = deployment(tmp_path, models_dir, "source", SOURCE_KEY)
    target = deployment(tmp_path, models_dir, "target", TARGET_KEY)
    yield source, target
    source.stop()
    target.stop()


def wait_ready(server: Server, key: str, model_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = server.call("verify_model", key, model_id=model_id)
        if answer["status"] != "processing":
            return answer
        time.sleep(0.1)
    raise AssertionError(f"{model_id} still loading")


def test_sync_copies_the_catalog_to_another_deployment(pair, tmp_path, models_dir):
    source, target = pair
    with LOAD_LOCK:
        lora = write_lora(models_dir / "tiny-sd", tmp_path / "files" / "style.safetensors", "diffusers", seed=1)
    assert source.call("load_model", SOURCE_KEY, url=str(lora), model_id="style", model_type="lora")["status"] == "success"
    assert wait_ready(source, SOURCE_KEY, "style")["status"] == "success"
    assert source.call("load_model", SOURCE_KEY, url=str(models_dir / "tiny-sd"), model_id="my-sd")["status"] == "success"
    assert wait_ready(source, SOURCE_KEY, "my-sd")["status"] == "success"

    wrong_key = source.call("sync_models", SOURCE_KEY, sync_key="not-the-target-key", sync_url=target.url)
    assert wrong_key["http"] == 400 and "sync_key" in wrong_key["message"]

    synced = source.call("sync_models", SOURCE_KEY, sync_key=TARGET_KEY, sync_url=target.url)
    assert synced["status"] == "success", synced
    assert sorted(synced["model_list"]) == ["my-sd", "style"]
    assert synced["message"] == "2 Models synced successfully"
    for model_id, category in (("style", "lora"), ("my-sd", "stable_diffusion")):
        answer = wait_ready(target, TARGET_KEY, model_id)
        assert answer["status"] == "success" and answer["category"] == category, answer

    # the copies work like the originals: same seed, same image bytes
    body = {"prompt": "a bench", "model_id": "my-sd", "lora_model": "style", "width": 64, "height": 64,
            "num_inference_steps": 3, "seed": 5, "tomesd": "no"}
    images = []
    for server, key in ((source, SOURCE_KEY), (target, TARGET_KEY)):
        result = server.call("text2img", key, **body)
        assert result["status"] == "success", result
        images.append(httpx.get(result["output"][0]).content)
    assert images[0] == images[1]

    again = source.call("sync_models", SOURCE_KEY, sync_key=TARGET_KEY, sync_url=target.url)
    assert again["model_list"] == [] and sorted(again["skipped"]) == ["my-sd", "style"]


def test_archive_links_need_a_valid_signature(pair):
    source, _ = pair
    for query in ("", "?expires=9999999999&signature=forged", "?expires=1&signature=x"):
        response = httpx.get(f"{source.url}/api/v1/enterprise/model_archive/tiny-sd.tar{query}")
        assert response.status_code == 403
        assert response.json()["status"] == "error"
