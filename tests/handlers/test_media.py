"""The media endpoints and output options end to end through the app, with tiny models:
upload_image, nsfw_image_check and the safety checker, super_resolution (with models loaded
through the catalog and fetched on first use), upscale, highres_fix, base64 and temp outputs."""

from __future__ import annotations

import base64
import http.server
import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.engine import LOAD_LOCK
from tests.conftest import KEY, fetch_png, open_client, png_bytes, scene, until_ended
from tests.upscaler_files import write_esrgan

API = "/api/v1/enterprise"
PROBE = Path(__file__).resolve().parents[1] / "fixtures" / "nsfw_probe.png"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(client, endpoint: str, **body) -> dict:
    response = client.post(f"{API}/{endpoint}", json={"key": KEY, **body})
    assert response.status_code == 200, response.text
    return response.json()


def t2i(**fields) -> dict:
    return {"prompt": "a bench", "width": 64, "height": 64, "steps": 2, "seed": 7, **fields}


def probe_b64() -> str:
    return b64(PROBE.read_bytes())


@pytest.fixture(scope="module")
def upscaler_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight Real-ESRGAN files in the release layout (.pth)."""
    folder = tmp_path_factory.mktemp("upscalers")
    files = {"x4": folder / "RealESRGAN_x4plus.pth", "x2": folder / "RealESRGAN_x2plus.pth"}
    with LOAD_LOCK:
        write_esrgan(files["x4"], scale=4)
        write_esrgan(files["x2"], scale=2)
    return files


@pytest.fixture(scope="module")
def media(models_dir, tmp_path_factory, upscaler_files):
    """An app with the tiny x2 upscaler loaded as RealESRGAN_x2plus (what `upscale: yes` uses)
    and the x4 one as my-x4, both through load_model_v2."""
    own_models = tmp_path_factory.mktemp("media") / "models"
    shutil.copytree(models_dir, own_models)  # loads here must not leak into other tests' store
    client = open_client(tmp_path_factory.mktemp("media-data"), own_models, image_fetch_timeout=5)
    for model_id, path in (("RealESRGAN_x2plus", upscaler_files["x2"]), ("my-x4", upscaler_files["x4"])):
        post(client, "load_model_v2", url=str(path), model_id=model_id, model_category="upscaler", model_format="pth")
    for model_id in ("RealESRGAN_x2plus", "my-x4"):
        wait_ready(client, model_id)
    yield client
    client.__exit__(None, None, None)


def wait_ready(client, model_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = client.post(f"{API}/verify_model", json={"key": KEY, "model_id": model_id}).json()
        if result["status"] != "processing":
            assert result["status"] == "success", result
            return result
        time.sleep(0.2)
    raise AssertionError(f"{model_id} still loading")


def fetch_file(client, url: str):
    response = client.get(url)
    assert response.status_code == 200, url
    return response


# --------------------------------------------------------------------------- upload_image


def test_upload_image_stores_the_bytes_as_sent(client):
    data = png_bytes(scene(40, 30))
    result = post(client, "upload_image", base64_image=b64(data), image_type="png")
    assert result["status"] == "success" and result["message"] == "image uploaded"
    assert result["image_url"].endswith(".png")
    response = fetch_file(client, result["image_url"])
    assert response.content == data and response.headers["content-type"] == "image/png"


def test_upload_image_takes_data_uris_and_jpegs(client):
    buffer = io.BytesIO()
    scene(32, 32).save(buffer, format="JPEG")
    for image_type in ("jpg", "jpeg"):
        result = post(client, "upload_image", base64_image="data:image/jpeg;base64," + b64(buffer.getvalue()),
                      image_type=image_type)
        response = fetch_file(client, result["image_url"])
        assert result["image_url"].endswith(f".{image_type}")
        assert response.content == buffer.getvalue() and response.headers["content-type"] == "image/jpeg"


def test_uploads_can_be_used_as_init_images(client):
    uploaded = post(client, "upload_image", base64_image=b64(png_bytes(scene(64, 64))), image_type="png")
    result = post(client, "img2img", prompt="x", init_image=uploaded["image_url"], steps=2, strength=0.5)
    assert result["status"] == "success"


def test_truncated_upload_is_refused(client):
    data = png_bytes(scene(64, 64))
    response = client.post(f"{API}/upload_image", json={"key": KEY, "base64_image": b64(data[: len(data) // 2]),
                                                         "image_type": "png"})
    assert response.status_code == 400 and "truncated" in response.json()["message"]


def test_uploads_and_temp_outputs_expire_and_the_cleaner_removes_them(make_client, monkeypatch):
    """With a 1-hour lifetime: served now; once the storage's clock is 2 hours later, refused and
    removed by the cleaner, while permanent outputs stay (no real waiting: the clock is moved)."""
    import infra.storage.outputs

    client = make_client(temp_output_seconds=3600, cleanup_interval=0)
    upload = post(client, "upload_image", base64_image=b64(png_bytes(scene(16, 16))), image_type="png")
    temp = post(client, "text2img", **t2i(temp="yes"))
    kept = post(client, "text2img", **t2i())
    assert temp["meta"]["temp"] == "yes" and kept["meta"]["temp"] == "no"
    for url in (upload["image_url"], temp["output"][0], kept["output"][0]):
        assert client.get(url).status_code == 200

    real_time = time.time

    class TwoHoursLater:
        @staticmethod
        def time() -> float:
            return real_time() + 2 * 3600

    monkeypatch.setattr(infra.storage.outputs, "time", TwoHoursLater)
    for url in (upload["image_url"], temp["output"][0]):
        gone = client.get(url)
        assert gone.status_code == 404 and "expired" in gone.json()["message"]
    assert client.get(kept["output"][0]).status_code == 200
    runtime = client.app.state.runtime
    assert runtime.cleaner.clean()["expired_outputs"] == 2
    assert not list(Path(runtime.storage.root, "uploads").glob("*.png"))
    assert client.get(kept["output"][0]).status_code == 200


# --------------------------------------------------------------------------- nsfw_image_check


def test_nsfw_image_check_is_sure_both_ways(client, image_server):
    flagged = post(client, "nsfw_image_check", init_image=probe_b64())
    assert flagged["has_nsfw_concept"] == [True] and flagged["nsfw_score"] >= 0.9
    assert flagged["images"] == probe_b64() and "status" not in flagged
    safe = post(client, "nsfw_image_check", init_image=f"{image_server}/init64.png")
    assert safe == {"images": f"{image_server}/init64.png", "has_nsfw_concept": [False], "nsfw_score": 0.0,
                    "threshold": 0.5}


def test_nsfw_threshold_is_a_setting(make_client):
    client = make_client(nsfw_threshold=0.999)
    result = post(client, "nsfw_image_check", init_image=probe_b64())
    assert result["has_nsfw_concept"] == [False] and 0.9 <= result["nsfw_score"] < 0.999


# --------------------------------------------------------------------------- safety checker


def keep_all_mask_b64(size=(320, 320)) -> str:
    return b64(png_bytes(Image.new("L", size, 0)))


@pytest.mark.parametrize("treatment", ["black", "blur", "pixelate", "sensitive_content_text"])
def test_safety_checker_treats_flagged_images(client, treatment):
    """img2img at strength 0 returns the init image itself: the probe comes out, gets flagged and
    is treated; the same request with the checker off returns the probe untouched."""
    probe = np.asarray(Image.open(PROBE).convert("RGB"))
    body = {"prompt": "x", "init_image": probe_b64(), "strength": 0, "steps": 2, "safety_checker_type": treatment}
    result = post(client, "img2img", **body, safety_checker="yes")
    assert result["nsfw_content_detected"] is True and result["meta"]["nsfw_content_detected"] == [True]
    assert result["meta"]["safetychecker"] == "yes" and result["meta"]["safety_checker_type"] == treatment
    out = np.asarray(fetch_png(client, result["output"][0]).convert("RGB"))
    assert out.shape == probe.shape and not np.array_equal(out, probe)
    if treatment == "black":
        assert out.max() == 0
    unchecked = post(client, "img2img", **body, safety_checker="no")
    assert "nsfw_content_detected" not in unchecked and unchecked["meta"]["safetychecker"] == "no"
    assert np.array_equal(np.asarray(fetch_png(client, unchecked["output"][0]).convert("RGB")), probe)


def test_safety_checker_is_on_by_default_and_covers_inpaint(client):
    """Inpaint with an all-black mask keeps every pixel of the init image (the probe)."""
    result = post(client, "inpaint", prompt="x", init_image=probe_b64(), mask_image=keep_all_mask_b64(), steps=2,
                  safety_checker_type="black")
    assert result["meta"]["safetychecker"] == "yes" and result["nsfw_content_detected"] is True
    assert np.asarray(fetch_png(client, result["output"][0])).max() == 0


def test_safe_generations_pass_the_checker_unchanged(client):
    checked = post(client, "text2img", **t2i(samples=2, safety_checker="yes", safety_checker_type="black"))
    unchecked = post(client, "text2img", **t2i(samples=2, safety_checker="no"))
    assert checked["meta"]["nsfw_content_detected"] == [False, False] and checked["nsfw_content_detected"] is False
    for a, b in zip(checked["output"], unchecked["output"], strict=True):
        assert fetch_file(client, a).content == fetch_file(client, b).content


def test_safety_threshold_zero_flags_everything(make_client):
    client = make_client(nsfw_threshold=0.0)
    result = post(client, "text2img", **t2i(safety_checker_type="black"))
    assert result["meta"]["nsfw_content_detected"] == [True]
    assert np.asarray(fetch_png(client, result["output"][0])).max() == 0


# --------------------------------------------------------------------------- base64 outputs


def test_base64_outputs_are_text_files_of_the_png(client):
    plain = post(client, "text2img", **t2i(samples=2))
    encoded = post(client, "text2img", **t2i(samples=2, base64="yes"))
    assert encoded["meta"]["base64"] == "yes" and len(encoded["output"]) == 2
    for url, plain_url in zip(encoded["output"], plain["output"], strict=True):
        assert url.endswith(".base64")
        response = fetch_file(client, url)
        assert response.headers["content-type"].startswith("text/plain")
        assert base64.b64decode(response.content, validate=True) == fetch_file(client, plain_url).content


# --------------------------------------------------------------------------- super_resolution


@pytest.mark.parametrize("scale", [1, 2, 3, 4, 2.5])
def test_super_resolution_any_scale(media, image_server, scale):
    result = post(media, "super_resolution", url=f"{image_server}/init96x64.png", scale=scale, model_id="my-x4")
    assert result["status"] == "success" and isinstance(result["output"], str)
    assert fetch_png(media, result["output"]).size == (round(96 * scale), round(64 * scale))
    assert result["output"].endswith("_out.png")


def test_super_resolution_from_a_x2_network_and_base64_input(media):
    data = png_bytes(scene(40, 30))
    result = post(media, "super_resolution", url="data:image/png;base64," + b64(data), scale=4,
                  model_id="RealESRGAN_x2plus", base64="yes")
    assert result["output"].endswith("_out.base64")
    image = Image.open(io.BytesIO(base64.b64decode(fetch_file(media, result["output"]).content)))
    assert image.size == (160, 120)


def test_super_resolution_fetch_answers_a_string_too(media, image_server):
    queued = post(media, "super_resolution", url=f"{image_server}/init64.png", scale=2, model_id="my-x4",
                  instant_response="yes")
    assert queued["status"] == "processing" and len(queued["future_links"]) == 1
    deadline = time.monotonic() + 30
    while (result := post(media, "fetch", request_id=queued["id"]))["status"] == "processing":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert result["status"] == "success" and result["output"] == queued["future_links"][0]


def test_super_resolution_output_limits(media, image_server):
    runtime = media.app.state.runtime
    limit = runtime.settings.max_output_pixels
    try:
        runtime.settings.max_output_pixels = 200 * 200
        response = media.post(f"{API}/super_resolution", json={"key": KEY, "url": f"{image_server}/init64.png",
                                                               "scale": 4, "model_id": "my-x4"})
        assert response.status_code == 400 and "256x256" in response.json()["message"]
        # scale 1 from the x4 net: the output fits, but the network's own 4x output would not
        runtime.settings.max_output_pixels = 64 * 64 * 3
        response = media.post(f"{API}/super_resolution", json={"key": KEY, "url": f"{image_server}/init64.png",
                                                               "scale": 1, "model_id": "my-x4"})
        assert response.status_code == 400 and "256x256 before scaling" in response.json()["message"]
    finally:
        runtime.settings.max_output_pixels = limit


class _Weights(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def weights_server(upscaler_files):
    handler = lambda *a, **kw: _Weights(*a, directory=str(upscaler_files["x2"].parent), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def own_store(models_dir, tmp_path) -> Path:
    """A copy of the built-in models for a test that adds models to its store."""
    shutil.copytree(models_dir, tmp_path / "models")
    return tmp_path / "models"


def test_known_upscalers_are_fetched_on_first_use(image_server, weights_server, own_store, tmp_path):
    """The first request for RealESRGAN_x4plus downloads it (here from a loopback mirror set in
    known_model_urls) through the catalog's load path, then runs; the model stays in the store."""
    client = open_client(tmp_path / "data", own_store, fetch_known_models=True,
                         known_model_urls={"RealESRGAN_x4plus": f"{weights_server}/RealESRGAN_x4plus.pth"})
    result = post(client, "super_resolution", url=f"{image_server}/init64.png", scale=2, model_id="RealESRGAN_x4plus")
    assert result["status"] == "success", result
    assert fetch_png(client, result["output"]).size == (128, 128)
    models = {m["model_id"]: m for m in post(client, "get_all_models")["models"]}
    assert models["RealESRGAN_x4plus"]["category"] == "upscaler" and models["RealESRGAN_x4plus"]["status"] == "ready"
    client.__exit__(None, None, None)


def test_a_failed_first_use_fetch_fails_the_job_with_the_reason(image_server, weights_server, own_store, tmp_path):
    client = open_client(tmp_path / "data", own_store, fetch_known_models=True,
                         known_model_urls={"RealESRGAN_x4plus": f"{weights_server}/missing.pth"})
    try:
        result = post(client, "super_resolution", url=f"{image_server}/init64.png", scale=2,
                      model_id="RealESRGAN_x4plus")
        assert result["status"] == "failed"
        assert "RealESRGAN_x4plus could not be loaded" in result["message"] and "404" in result["message"]
        models = {m["model_id"]: m for m in post(client, "get_all_models")["models"]}
        assert models["RealESRGAN_x4plus"]["status"] == "failed"
    finally:
        client.__exit__(None, None, None)


# --------------------------------------------------------------------------- upscale and highres_fix


def test_upscale_doubles_the_output(media):
    plain = post(media, "text2img", **t2i())
    upscaled = post(media, "text2img", **t2i(upscale="yes"))
    meta = upscaled["meta"]
    assert meta["upscale"] == "yes" and (meta["W"], meta["output_W"], meta["output_H"]) == (64, 128, 128)
    assert plain["meta"]["upscale"] == "no" and plain["meta"]["output_W"] == 64
    assert fetch_png(media, upscaled["output"][0]).size == (128, 128)


def test_highres_fix_renders_a_second_pass_at_twice_the_size(client):
    first = post(client, "text2img", **t2i(width=64, height=48))
    fixed = post(client, "text2img", **t2i(width=64, height=48, highres_fix="yes"))
    assert fixed["meta"]["highres_fix"] == "yes" and (fixed["meta"]["output_W"], fixed["meta"]["output_H"]) == (128, 96)
    image = fetch_png(client, fixed["output"][0])
    assert image.size == (128, 96)
    enlarged = fetch_png(client, first["output"][0]).resize((128, 96), Image.Resampling.LANCZOS)
    assert not np.array_equal(np.asarray(image), np.asarray(enlarged))  # refined, not only enlarged
    again = post(client, "text2img", **t2i(width=64, height=48, highres_fix="yes"))
    assert fetch_file(client, again["output"][0]).content == fetch_file(client, fixed["output"][0]).content


def test_highres_fix_inpaint_keeps_the_unmasked_pixels(client):
    init = scene(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = post(client, "inpaint", prompt="x", init_image=b64(png_bytes(init)), mask_image=b64(png_bytes(mask)),
                  steps=2, highres_fix="yes")
    out = np.asarray(fetch_png(client, result["output"][0]).convert("RGB"))
    assert out.shape == (128, 128, 3)
    big_init = np.asarray(init.resize((128, 128), Image.Resampling.LANCZOS))
    keep = np.asarray(mask.resize((128, 128), Image.Resampling.BOX)) == 0
    assert np.array_equal(out[keep], big_init[keep])
    assert not np.array_equal(out[~keep], big_init[~keep])


def test_highres_and_upscale_output_limit(make_client):
    client = make_client(max_output_pixels=256 * 256)
    response = client.post(f"{API}/text2img", json={"key": KEY, **t2i(width=128, height=128, highres_fix="yes",
                                                                       upscale="yes")})
    assert response.status_code == 400 and "512x512" in response.json()["message"]


# --------------------------------------------------------------------------- face_enhance


@pytest.mark.slow
def test_face_enhance_restores_the_faces_only(media, tmp_path):
    """GFPGAN (random weights, the real architecture) loaded as the face restorer; the astronaut
    photo has one face the detector finds: pixels around it change, the rest stays as without it."""
    from skimage import data

    from tests.upscaler_files import write_gfpgan

    photo = b64(png_bytes(Image.fromarray(data.astronaut()).resize((256, 256))))
    missing = media.post(f"{API}/super_resolution", json={"key": KEY, "url": photo, "model_id": "my-x4",
                                                          "face_enhance": True})
    assert missing.status_code == 404 and "GFPGANv1.4" in missing.json()["message"]
    assert "load_model_v2" in missing.json()["tip"]
    with LOAD_LOCK:
        write_gfpgan(tmp_path / "GFPGANv1.4.pth")
    post(media, "load_model_v2", url=str(tmp_path / "GFPGANv1.4.pth"), model_id="GFPGANv1.4",
         model_category="face_restorer", model_format="pth")
    wait_ready(media, "GFPGANv1.4", timeout=120)
    plain = post(media, "super_resolution", url=photo, scale=1, model_id="my-x4")
    restored = post(media, "super_resolution", url=photo, scale=1, model_id="my-x4", face_enhance=True)
    assert restored["status"] == "success" and restored["meta"]["faces_restored"] == 1
    a = np.asarray(fetch_png(media, plain["output"]).convert("RGB")).astype(int)
    b = np.asarray(fetch_png(media, restored["output"]).convert("RGB")).astype(int)
    changed = np.argwhere(np.abs(a - b).sum(axis=2) > 0)
    assert len(changed) > 500
    (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0)
    assert bottom - top < 160 and right - left < 160  # a crop around the face, not the whole image
    assert np.array_equal(a[200:], b[200:])  # the lower part of the picture (suit, no face) is untouched


# --------------------------------------------------------------------------- text2video


def test_text2video_mp4(client):
    import imageio_ffmpeg

    result = post(client, "text2video", prompt="a boat", width=64, height=48, num_frames=3, steps=2, seed=3)
    assert result["status"] == "success" and len(result["output"]) == 1 and result["output"][0].endswith(".mp4")
    meta = result["meta"]
    assert (meta["num_frames"], meta["fps"], meta["output_type"], meta["motion_module"]) == (3, 8, "mp4",
                                                                                          "tiny-motion-adapter")
    response = fetch_file(client, result["output"][0])
    assert response.headers["content-type"] == "video/mp4"
    path = Path(client.app.state.runtime.storage.root) / "check.mp4"
    path.write_bytes(response.content)
    reader = imageio_ffmpeg.read_frames(str(path))
    info = next(reader)
    frames = list(reader)
    assert info["size"] == (64, 48) and len(frames) == 3


def test_text2video_use_improved_sampling_counts_every_free_init_pass(client):
    queued = post(client, "video/text2video", prompt="a boat", width=32, height=32, num_frames=2, steps=2,
                  use_improved_sampling="yes", output_type="gif", instant_response=True)
    result = until_ended(lambda: post(client, f"video/fetch/{queued['id']}"))
    assert result["status"] == "success" and result["meta"]["use_improved_sampling"] == "yes", result
    job = client.app.state.runtime.jobs.get(queued["id"])
    assert job.params.free_init_iterations == 3 and job.params.total_steps() == 6  # 3 passes of 2 steps
    refused = client.post("/api/v1/enterprise/video/text2video", json={
        "key": KEY, "prompt": "a boat", "use_improved_sampling": "yes", "improved_sampling_seed": 42})
    assert refused.status_code == 400 and "improved_sampling_seed" in refused.json()["message"]


def test_text2video_upscaling_pass_over_http(client):
    result = post(client, "video/text2video", prompt="a boat", width=32, height=32, num_frames=2, steps=2,
                  upscale_width=64, upscale_strength=0.5, upscale_num_inference_steps=4, output_type="gif")
    assert result["status"] == "success", result
    gif = Image.open(io.BytesIO(fetch_file(client, result["output"][0]).content))
    assert gif.size == (64, 64) and gif.n_frames == 2  # the height keeps the video's aspect
    meta = result["meta"]
    assert (meta["upscale_width"], meta["upscale_height"], meta["upscale_strength"], meta["upscale_num_inference_steps"],
            meta["upscale_guidance_scale"]) == (64, 64, 0.5, 4, 7.5)
    for body, words in (({"upscale_strength": 0.5}, "upscale_width"), ({"upscale_width": 16}, "smaller"),
                        ({"upscale_width": 2048}, "upscale_width")):
        refused = client.post("/api/v1/enterprise/video/text2video", json={
            "key": KEY, "prompt": "a boat", "width": 32, "height": 32, **body})
        assert refused.status_code in (400, 422) and words in str(refused.json()), refused.json()


def test_text2video_gif_through_the_g3_route_and_the_queue(client):
    queued = post(client, "video/text2video", prompt="a boat", width=32, height=32, num_frames=4, fps=4,
                  output_type="gif", num_inference_steps=2, instant_response=True)
    assert queued["status"] == "processing" and queued["future_links"][0].endswith(".gif")
    deadline = time.monotonic() + 60
    while (result := post(client, f"video/fetch/{queued['id']}"))["status"] == "processing":  # G3's fetch path
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert result["status"] == "success" and result["output"] == queued["future_links"]
    gif = Image.open(io.BytesIO(fetch_file(client, result["output"][0]).content))
    assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (32, 32)
    assert gif.info["duration"] == 250
