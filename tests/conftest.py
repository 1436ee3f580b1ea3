"""Shared fixtures: the tiny models built once per session, a loopback image server, and a
factory for apps (real FastAPI app + local runtime + worker threads) with chosen settings."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from infra.jobs.params import GenerationParams, VideoParams
from infra.runtime import Runtime
from infra.settings import DEV_API_KEY, Settings
from infra.web.api import create_app

KEY = DEV_API_KEY
ROOT = Path(__file__).resolve().parent.parent
SEED_IMAGE = "CompVis/stable-diffusion/main/data/inpainting_examples/overture-creations-5sI6fQgYIuo.png"
SEED_MASK = "CompVis/stable-diffusion/main/data/inpainting_examples/overture-creations-5sI6fQgYIuo_mask.png"


def pytest_collection_modifyitems(items):
    """The tests marked `slow` (15 s and more each) run first, the rest in file order: under
    `-n 2` (CI) the workers then share the short tests at the end, instead of one of them idling
    while the other finishes a long test it was handed last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # (a stable sort)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The built-in tiny models, built once for the whole session the way a server builds them."""
    folder = tmp_path_factory.mktemp("models")
    settings = Settings(data_dir=folder.parent / "unused", models_dir=folder)
    runtime = Runtime.local(settings)
    runtime.ensure_builtin_models()
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP threads
    per process spin-wait on each other: a tiny conv took 10-100x longer. Modules of engine-level
    tests use one thread (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def receiver():
    """A webhook receiver on loopback: yields (its URL, the JSON payloads it got)."""
    import json

    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def free_port() -> int:
    """A loopback port nothing listens on (a closed endpoint, or one a test server will take)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    """A real S3 endpoint on loopback: moto's server on a free port. Returns (server, base URL)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server for one test module."""
    server, url = start_moto()
    yield url
    server.stop()


def open_client(data_dir: Path, models_dir: Path, **overrides) -> TestClient:
    """A started TestClient on a fresh app over `data_dir` (close it with __exit__)."""
    # tests never fetch the well-known models from the internet (a test that wants it names a loopback URL)
    overrides.setdefault("fetch_known_models", False)
    # tests serve images, models and webhooks from loopback servers, which the fetcher refuses otherwise
    overrides.setdefault("fetch_allowlist", ["127.0.0.1", "localhost"])
    settings = Settings(data_dir=data_dir, models_dir=models_dir, **overrides)
    client = TestClient(create_app(Runtime.local(settings)), raise_server_exceptions=False)
    client.__enter__()
    return client


@pytest.fixture(scope="module")
def module_client(models_dir, tmp_path_factory):
    """One app shared by a test module, for tests that need no special settings."""
    client = open_client(tmp_path_factory.mktemp("module"), models_dir, image_fetch_timeout=5)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture
def make_client(models_dir, tmp_path):
    """make_client(**settings) -> a TestClient on a fresh app (and by default a fresh data dir),
    workers running. Pass data_dir to reopen an earlier one, as a restarted server would."""
    clients = []

    def make(data_dir: Path | None = None, **overrides) -> TestClient:
        client = open_client(data_dir or tmp_path / f"data{len(clients)}", models_dir, **overrides)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)  # a second exit (after a simulated restart) is harmless


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene(width: int, height: int) -> Image.Image:
    """A recognisable test picture: sky, grass, a sun and a bench."""
    image = Image.new("RGB", (width, height), (110, 160, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, height * 2 // 3, width, height], fill=(70, 150, 60))
    draw.ellipse([width // 10, height // 10, width // 4, height // 4], fill=(250, 220, 60))
    draw.rectangle([width // 3, height // 2, width * 2 // 3, height * 2 // 3], fill=(120, 80, 40))
    return image


def centre_mask(width: int, height: int) -> Image.Image:
    """White (repaint) square in the middle, black (keep) elsewhere."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle([width // 4, height // 4, width * 3 // 4 - 1, height * 3 // 4 - 1], fill=255)
    return mask


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def image_server(tmp_path_factory):
    """A loopback HTTP server with test images; yields its base URL."""
    root = tmp_path_factory.mktemp("www")
    files = {
        SEED_IMAGE: png_bytes(scene(512, 512)),
        SEED_MASK: png_bytes(centre_mask(512, 512)),
        "init64.png": png_bytes(scene(64, 64)),
        "mask64.png": png_bytes(centre_mask(64, 64)),
        "mask128.png": png_bytes(centre_mask(128, 128)),
        "mask_wide.png": png_bytes(centre_mask(128, 64)),
        "init96x64.png": png_bytes(scene(96, 64)),
        "not_an_image.png": b"<html>this is not an image</html>",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    handler = lambda *a, **kw: _Files(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def fetch_png(client: TestClient, url: str) -> Image.Image:
    response = client.get(url)
    assert response.status_code == 200, url
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def generation_params(**fields) -> GenerationParams:
    """Complete text2img params on the built-in model (64x64, 2 steps, one seed), with `fields` changed."""
    base = dict(task="text2img", model_id="tiny-sd", prompt="x", negative_prompt=None, width=64, height=64, seeds=(7,),
                steps=2, guidance_scale=7.5, scheduler="PNDMScheduler", use_karras_sigmas=False, algorithm=None,
                clip_skip=None, tomesd=False)
    return GenerationParams(**{**base, **fields})


def video_params(**fields) -> VideoParams:
    """Complete text2video params on the built-in models (64x64, 4 frames, 2 steps), with `fields` changed."""
    base = dict(model_id="tiny-sd", motion_adapter="tiny-motion-adapter", prompt="a boat on a lake", negative_prompt=None,
                width=64, height=64, num_frames=4, fps=8, output_type="mp4", steps=2, guidance_scale=7.5, seed=1,
                scheduler="DDIMScheduler", clip_skip=None)
    return VideoParams(**{**base, **fields})


class ServerProcess:
    """A real server (`python -m infra.cli serve`, or `command`) in a child process on a free
    loopback port, with `settings` as SDAPI_ environment variables; killed or stopped by the test."""

    def __init__(self, data_dir: Path, models_dir: Path, port: int | None = None,
                 command: tuple[str, ...] = ("-m", "infra.cli", "serve"), **settings):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        env = {**os.environ, "SDAPI_PORT": str(self.port), "SDAPI_DATA_DIR": str(data_dir),
               "SDAPI_MODELS_DIR": str(models_dir), "SDAPI_FETCH_KNOWN_MODELS": "false",
               **{f"SDAPI_{k.upper()}": str(v) for k, v in settings.items()}}
        self.log = open(data_dir.parent / f"server-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

    def post(self, endpoint: str, **body) -> dict:
        return httpx.post(f"{self.base}/api/v1/enterprise/{endpoint}", json={"key": KEY, **body}, timeout=30).json()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.log.close()


def new_job(eta: float = 1.0, **params):
    """A job record to store (not run): text2img params with `params` changed, one output key."""
    from infra.jobs.job import Job

    keys = ["generations/out-1.png"]
    return Job(0, "text2img", generation_params(**params), {"seed": 7}, keys, [f"http://t/files/{keys[0]}"], eta=eta)


def race(n: int, target) -> list:
    """`target()` on `n` threads released at once; their results."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def run(i):
        barrier.wait()
        results[i] = target()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


@dataclass
class Request:
    body: bytes
    headers: dict[str, str]
    arrived: float  # time.monotonic()
    observed: object = None  # what the receiver's `observe` saw when this request came in


class Receiver:
    """An HTTP server on loopback that records every POST (exact body bytes, headers, arrival time)
    and answers from a script of `(status, headers, delay)`; past the script, `default`."""

    def __init__(self, script=(), default=(200, {}, 0.0), observe=None):
        self.script, self.default, self.observe = list(script), default, observe
        self.requests: list[Request] = []
        self.released = threading.Event()  # ends the delays of sleeping answers at teardown
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                observed = receiver.observe() if receiver.observe else None
                receiver.requests.append(Request(body, dict(self.headers), arrived, observed))
                status, headers, delay = receiver.script.pop(0) if receiver.script else receiver.default
                if delay:
                    receiver.released.wait(delay)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the sender gave up on us (timeout) and closed the connection
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.requests

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(*args, **kwargs) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def sse_events(lines):
    """Server-sent events from the lines of a `text/event-stream` body, as they come:
    {"event", "id", "data" (parsed JSON)} per event (a `retry:` block alone is not one)."""
    event = {}
    for line in lines:
        if not line:
            if "event" in event:
                yield event
            event = {}
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            event["data"] = json.loads(value)
        elif name in ("event", "id"):
            event[name] = value
    if "event" in event:
        yield event


def until_ended(look, timeout: float = 120.0) -> dict:
    """`look()` (an HTTP answer's JSON) again until its status is not `processing`; the last answer."""
    deadline = time.monotonic() + timeout
    while (body := look())["status"] == "processing":
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    return body
