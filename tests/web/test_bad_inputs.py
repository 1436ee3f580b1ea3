"""A catalogue of bad requests: each gets a 4xx ModelsLab error envelope that says what to fix,
never a 500, and the server keeps working afterwards."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from tests.conftest import KEY, free_port


def _png_b64(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _png_header_b64(width: int, height: int) -> str:
    """A PNG that claims width x height in its header (no pixel data): a decompression bomb's calling card."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk + end).decode()


PNG_B64 = _png_b64(16, 16)
HUGE_PNG_B64 = _png_header_b64(20000, 20000)


def t2i(**fields):
    return ("text2img", {"key": KEY, "prompt": "x", "width": 64, "height": 64, "steps": 2, **fields})


def inpaint(server, **fields):
    return ("inpaint", {"key": KEY, "prompt": "x", "init_image": f"{server}/init64.png",
                        "mask_image": f"{server}/mask64.png", "steps": 2, **fields})


# (name, endpoint + body, expected HTTP status, a phrase the message must contain)
def catalogue(server):
    return [
        ("negative width", t2i(width=-512), 422, "width"),
        ("zero height", t2i(height="0"), 422, "height"),
        ("huge width", t2i(width=100000), 422, "between 1 and 1024"),
        ("samples 9", t2i(samples=9), 422, "between 1 and 4"),
        ("steps 500", t2i(num_inference_steps=500), 422, "between 1 and 50"),
        ("steps alias 500", t2i(steps="500"), 422, "between 1 and 50"),
        ("guidance 100", t2i(guidance_scale=100), 422, "between 1 and 20"),
        ("seed not a number", t2i(seed="lucky"), 422, "number"),
        ("prompt an object", t2i(prompt={"a": 1}), 422, "prompt"),
        ("unknown scheduler", t2i(scheduler="FancyScheduler"), 422, "unknown scheduler"),
        ("unusable scheduler", t2i(scheduler="ScoreSdeVeScheduler"), 422, "cannot be used"),
        ("unknown algorithm", t2i(scheduler="DPMSolverMultistepScheduler", algorithm_type="magic"), 422, "algorithm_type"),
        ("unknown model", t2i(model_id="no-such-model"), 404, "Model id not found"),
        ("path traversal model id", t2i(model_id="../../etc/passwd"), 400, "not a valid model id"),
        ("inpaint model on text2img", t2i(model_id="tiny-sd-inpaint"), 400, "inpainting model"),
        ("upscaler not in the store", t2i(upscale="yes"), 404, "RealESRGAN_x2plus"),
        ("feature this server lacks", t2i(ip_adapter_id="ip-adapter_sd15"), 400, "ip_adapter_id"),
        ("foreign prompt without a translator", t2i(multi_lingual="yes", prompt="eine rote Katze auf dem Sofa"), 404,
         "translator opus-mt-mul-en"),
        ("unknown LoRA", t2i(lora_model="more_details"), 404, "more_details (lora_model)"),
        ("unknown VAE", t2i(vae="no-such-vae"), 404, "no-such-vae (vae)"),
        ("unknown embedding", t2i(embeddings_model="easyneg"), 404, "easyneg (embeddings_model)"),
        ("model as LoRA", t2i(lora_model="tiny-sd"), 400, "not lora"),
        ("LoRA strength 1.5", t2i(lora_model="a", lora_strength="1.5"), 422, "between 0.1 and 1"),
        ("LoRA strength not a number", t2i(lora_model="a", lora_strength="strong"), 422, "lora_strength"),
        ("panorama with self_attention", t2i(panorama="yes", self_attention="yes"), 400, "cannot be combined"),
        ("unloaded ControlNet 1.1", ("controlnet", {"key": KEY, "prompt": "x", "controlnet_model": "canny",
                                                    "control_image": f"{server}/init64.png"}), 404, "not loaded"),
        ("controlnet without a hint", ("controlnet", {"key": KEY, "prompt": "x", "controlnet_model": "canny"}), 400,
         "control_image"),
        ("load_model from ftp", ("load_model", {"key": KEY, "url": "ftp://x/y.ckpt", "model_id": "m"}), 400,
         "not a model source"),
        ("load_model bad id", ("load_model", {"key": KEY, "url": "owner/repo", "model_id": "../x"}), 400,
         "not a valid model id"),
        ("load_model existing id", ("load_model", {"key": KEY, "url": "owner/repo", "model_id": "tiny-sd"}), 409,
         "already"),
        ("load_model unknown type", ("load_model", {"key": KEY, "url": "o/r", "model_id": "m", "model_type": "x"}), 422,
         "model_type"),
        ("load_model without a model_id", ("load_model", {"key": KEY, "url": "o/r"}), 400,
         "load_model needs a model_id"),
        ("delete unknown model", ("delete_model", {"key": KEY, "model_id": "nope"}), 404, "not found"),
        ("delete default model", ("delete_model", {"key": KEY, "model_id": "tiny-sd"}), 409, "default model"),
        ("sync without a target", ("sync_models", {"key": KEY, "sync_key": "k"}), 400, "sync_url"),
        ("sync to a private address", ("sync_models", {"key": KEY, "sync_key": "k", "sync_url": "http://10.0.0.1"}), 400,
         "private"),
        ("sync to a host that does not resolve", ("sync_models", {"key": KEY, "sync_key": "k",
                                                                  "sync_url": "http://no-such-host.invalid"}), 400,
         "cannot reach the sync target"),
        ("image from the metadata address", inpaint(server, init_image="http://169.254.169.254/latest/meta-data"), 400,
         "private"),
        ("unknown safety_checker_type", t2i(safety_checker_type="sepia"), 422, "safety_checker_type"),
        ("super_resolution scale 9", ("super_resolution", {"key": KEY, "url": f"{server}/init64.png", "scale": 9}), 422,
         "between 1 and 4"),
        ("super_resolution broken base64", ("super_resolution", {"key": KEY, "url": "data:image/png;base64,@@@@"}), 400,
         "base64"),
        ("super_resolution unknown model", ("super_resolution", {"key": KEY, "url": f"{server}/init64.png",
                                                                 "model_id": "my-upscaler"}), 404, "my-upscaler"),
        ("super_resolution upscaler not in the store", ("super_resolution", {"key": KEY, "url": f"{server}/init64.png"}),
         404, "realesr-general-x4v3"),
        ("upload a PNG claimed as jpeg", ("upload_image", {"key": KEY, "base64_image": PNG_B64, "image_type": "jpeg"}),
         400, "is a PNG image but image_type says jpeg"),
        ("upload a 20000x20000 header", ("upload_image", {"key": KEY, "base64_image": HUGE_PNG_B64, "image_type": "png"}),
         400, "pixels"),
        ("upload broken base64", ("upload_image", {"key": KEY, "base64_image": "not base64!", "image_type": "png"}), 400,
         "base64"),
        ("upload type gif", ("upload_image", {"key": KEY, "base64_image": PNG_B64, "image_type": "gif"}), 422,
         "image_type"),
        ("nsfw check of a non-image", ("nsfw_image_check", {"key": KEY, "init_image": f"{server}/not_an_image.png"}),
         400, "not a readable image"),
        ("text2video upscaling without a size", ("text2video", {"key": KEY, "prompt": "x", "upscale_strength": 0.6}),
         400, "upscale_width"),
        ("text2video 40 frames", ("text2video", {"key": KEY, "prompt": "x", "num_frames": 40}), 422, "num_frames"),
        ("text2video unknown motion module", ("text2video", {"key": KEY, "prompt": "x", "motion_module": "mm-x"}), 404,
         "mm-x"),
        ("text2video on an inpainting model", ("text2video", {"key": KEY, "prompt": "x", "model_id": "tiny-sd-inpaint"}),
         400, "inpainting model"),
        ("broken image URL (404)", inpaint(server, init_image=f"{server}/missing.png"), 400, "HTTP 404"),
        ("unreachable image URL", inpaint(server, init_image=f"http://127.0.0.1:{free_port()}/a.png"), 400,
         "could not be downloaded"),
        ("not a URL at all", inpaint(server, init_image="ftp://example.com/a.png"), 400, "base64"),
        ("non-image URL", inpaint(server, init_image=f"{server}/not_an_image.png"), 400, "not a readable image"),
        ("invalid base64", inpaint(server, mask_image="!!!not-base64!!!"), 400, "base64"),
        ("base64 of text", inpaint(server, mask_image="aGVsbG8gd29ybGQ="), 400, "not a readable image"),
        ("mask of another shape", inpaint(server, mask_image=f"{server}/mask_wide.png"), 400, "aspect ratio"),
        ("missing mask", ("inpaint", {"key": KEY, "prompt": "x", "init_image": f"{server}/init64.png"}), 422,
         "mask_image"),
        ("fetch id not a number", ("fetch", {"key": KEY, "request_id": "abc"}), 422, "request_id"),
        ("fetch id negative", ("fetch", {"key": KEY, "request_id": -5}), 422, "request_id"),
    ]


CASES = [c[0] for c in catalogue("http://x")]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_clear_4xx_envelope(module_client, image_server, case):
    _, (endpoint, body), status, phrase = next(c for c in catalogue(image_server) if c[0] == case)
    response = module_client.post(f"/api/v1/enterprise/{endpoint}", json=body)
    assert response.status_code == status, response.text
    result = response.json()
    assert result["status"] == "error"
    assert phrase in str(result["message"])
    assert "Traceback" not in response.text


def test_server_still_works_after_the_catalogue(module_client):
    result = module_client.post("/api/v1/enterprise/text2img", json=t2i()[1]).json()
    assert result["status"] == "success"


# --------------------------------------------------------------------------- SSRF: every URL the server follows

SSRF_TARGETS = {
    "loopback": "http://127.0.0.1/a.png",
    "localhost": "http://localhost:8000/a.png",
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "private 10/8": "http://10.0.0.1/a.png",
    "IPv6 loopback": "http://[::1]/a.png",
    "IPv4-mapped IPv6": "http://[::ffff:127.0.0.1]/a.png",
}


def url_fields(url: str) -> dict[str, tuple[str, dict]]:
    """Every request field that makes the server connect somewhere, set to `url`."""
    s3 = {"key": KEY, "region_name": "us-east-1", "aws_access_key_id": "a", "aws_secret_access_key": "s",
          "image_directory": "out", "bucket": "outputs-bucket"}
    return {
        "inpaint init_image": ("inpaint", {"key": KEY, "prompt": "x", "init_image": url, "mask_image": PNG_B64}),
        "inpaint mask_image": ("inpaint", {"key": KEY, "prompt": "x", "init_image": PNG_B64, "mask_image": url}),
        "img2img init_image": ("img2img", {"key": KEY, "prompt": "x", "init_image": url}),
        "controlnet control_image": ("controlnet", {"key": KEY, "prompt": "x", "controlnet_model": "tiny-canny",
                                                    "control_image": url}),
        "super_resolution url": ("super_resolution", {"key": KEY, "url": url}),
        "nsfw_image_check init_image": ("nsfw_image_check", {"key": KEY, "init_image": url}),
        "text2img webhook": ("text2img", {"key": KEY, "prompt": "x", "width": 64, "height": 64, "webhook": url}),
        "load_model url": ("load_model", {"key": KEY, "url": url, "model_id": "ssrf-model"}),
        "load_model webhook": ("load_model", {"key": KEY, "url": "owner/repo", "model_id": "ssrf-hook",
                                              "webhook": url}),
        "load_vae vae_url": ("load_vae", {"key": KEY, "vae_url": url, "vae_id": "ssrf-vae"}),
        "sync_models sync_url": ("sync_models", {"key": KEY, "sync_key": "k", "sync_url": url}),
        "update_s3 endpoint_url": ("update_s3", {**s3, "endpoint_url": url, "public_url": "https://93.184.216.34/cdn"}),
        "update_s3 public_url": ("update_s3", {**s3, "endpoint_url": "https://93.184.216.34", "public_url": url}),
    }


@pytest.fixture(scope="module")
def public_only(models_dir, tmp_path_factory):
    """A server with no fetch allowlist: only public addresses (as in production)."""
    from tests.conftest import open_client

    client = open_client(tmp_path_factory.mktemp("public-only"), models_dir, fetch_allowlist=[])
    yield client
    client.__exit__(None, None, None)


@pytest.mark.parametrize("field", list(url_fields("")))
@pytest.mark.parametrize("target", list(SSRF_TARGETS))
def test_every_url_field_refuses_private_addresses(public_only, field, target):
    endpoint, body = url_fields(SSRF_TARGETS[target])[field]
    response = public_only.post(f"/api/v1/enterprise/{endpoint}", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["status"] == "error"
    assert "private" in response.json()["message"] and "Traceback" not in response.text
    jobs = public_only.app.state.runtime.jobs
    assert jobs.unfinished()[0] == 0  # nothing was queued


@pytest.fixture(scope="module")
def redirector():
    """A loopback server (allowlisted by port in the test) that redirects to ?to=URL."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlparse

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", parse_qs(urlparse(self.path).query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize("target", ["metadata", "private 10/8", "IPv6 loopback", "loopback"])
def test_a_redirect_to_a_private_address_is_refused(make_client, redirector, image_server, target):
    """The first hop is allowed (its host:port is allowlisted); where it redirects is checked again."""
    client = make_client(fetch_allowlist=[f"127.0.0.1:{redirector}"])
    hop = f"http://127.0.0.1:{redirector}/r?to="
    destination = SSRF_TARGETS[target] if target != "loopback" else f"{image_server}/init64.png"
    for endpoint, body in (url_fields(hop + destination)[f] for f in ("img2img init_image", "super_resolution url")):
        response = client.post(f"/api/v1/enterprise/{endpoint}", json=body)
        assert response.status_code == 400, response.text
        assert "private" in response.json()["message"]


# --------------------------------------------------------------------------- bombs, giant bodies, traversal


def _png_bomb_b64(side: int) -> str:
    """A real, complete 1-bit PNG of side x side black pixels: a few KB that decode to side² pixels."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + one row of zero bits
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def test_a_decompression_bomb_is_refused_before_decoding(module_client):
    bomb = _png_bomb_b64(30000)  # 900 megapixels
    assert len(bomb) < 200_000
    for endpoint, body in (
        ("img2img", {"key": KEY, "prompt": "x", "init_image": bomb}),
        ("inpaint", {"key": KEY, "prompt": "x", "init_image": PNG_B64, "mask_image": f"data:image/png;base64,{bomb}"}),
        ("upload_image", {"key": KEY, "base64_image": bomb, "image_type": "png"}),
        ("nsfw_image_check", {"key": KEY, "init_image": bomb}),
    ):
        response = module_client.post(f"/api/v1/enterprise/{endpoint}", json=body)
        assert response.status_code == 400, (endpoint, response.text)
        assert "pixels" in response.json()["message"]


def test_a_1_gb_content_length_is_refused_before_reading(make_client):
    """Sent on a raw socket: the header promises 1 GB, the server answers 413 without waiting for it."""
    import socket
    import threading

    import uvicorn

    from infra.runtime import Runtime
    from infra.settings import Settings
    from infra.web.api import create_app

    client = make_client()
    runtime = client.app.state.runtime
    port = free_port()
    app = create_app(Runtime.local(Settings(**{**runtime.settings.model_dump(), "port": port})), manage_runtime=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /api/v1/enterprise/text2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1073741824\r\n\r\n{\"key\": \"")
            answer = b""
            while b"}" not in answer and (chunk := sock.recv(65536)):
                answer += chunk  # the headers, then the JSON body
            answer = answer.decode(errors="replace")
        assert answer.startswith("HTTP/1.1 413"), answer
        assert '"status":"error"' in answer.replace(" ", "") and "MiB" in answer
    finally:
        server.should_exit = True


@pytest.mark.parametrize(
    "endpoint, body",
    [
        ("delete_model", {"model_id": "../../jobs.sqlite3"}),
        ("verify_model", {"model_id": "..\\..\\x"}),
        ("load_vae", {"vae_id": "../vae", "vae_url": "owner/repo"}),
        ("text2img", {"prompt": "x", "model_id": "tiny-sd/../../etc"}),
        ("text2img", {"prompt": "x", "lora_model": "../../outputs/x"}),
        ("text2img", {"prompt": "x", "vae": "/etc/passwd"}),
    ],
)
def test_path_traversal_model_ids_are_refused(module_client, endpoint, body):
    response = module_client.post(f"/api/v1/enterprise/{endpoint}", json={"key": KEY, **body})
    assert response.status_code == 400, response.text
    assert "not a valid model id" in response.json()["message"]


def test_path_traversal_in_file_links_finds_nothing(module_client):
    for path in ("/files/../jobs.sqlite3", "/files/%2e%2e/jobs.sqlite3", "/files/generations/%2e%2e/%2e%2e/jobs.sqlite3",
                 "/files/.expires", "/files/", "/files/generations"):
        response = module_client.get(path)
        assert response.status_code == 404, (path, response.text)
        assert "SQLite" not in response.text


@pytest.mark.parametrize("value", [-1, 2**63, 1e308, "NaN", "-inf", "9" * 400])
def test_negative_and_huge_numbers_are_422(module_client, value):
    for field in ("width", "height", "samples", "num_inference_steps", "guidance_scale", "seed"):
        response = module_client.post("/api/v1/enterprise/text2img", json=t2i(**{field: value})[1])
        assert response.status_code == 422, (field, value, response.text)
        assert field in str(response.json()["message"])
    response = module_client.post("/api/v1/enterprise/img2img", json={"key": KEY, "prompt": "x", "init_image": PNG_B64,
                                                                      "strength": value})
    assert response.status_code == 422 and "strength" in str(response.json()["message"])
