"""img2video (issue 20, spec §8.1, §2.7): an image animated by Stable Video Diffusion (the built-in
tiny-svd, a StableVideoDiffusionPipeline with random weights, tests' default image-to-video model),
on the enterprise video route, v6's and v7's, a job like any other (processing + fetch, metering),
and SVD folders loaded through the catalog."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from tests.catalog.test_catalog import load
from tests.catalog.test_transformer_families import data_uri
from tests.conftest import KEY, open_client, scene, until_ended

V1, V6, V7 = "/api/v1/enterprise", "/api/v6", "/api/v7"
ADMIN = KEY


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("img2video")
    shutil.copytree(models_dir, root / "models")
    client = open_client(root / "data", root / "models")
    yield client
    client.__exit__(None, None, None)


def small(**body) -> dict:
    return {"key": KEY, "init_image": data_uri(scene(64, 48)), "width": 64, "height": 48, "num_frames": 3,
            "num_inference_steps": 2, "seed": 7, **body}


def video_bytes(client, answer: dict) -> bytes:
    assert answer["status"] == "success", answer
    response = client.get(answer["output"][0])
    assert response.status_code == 200
    return response.content


def mp4_frames(data: bytes, tmp_path: Path) -> tuple[dict, list[np.ndarray]]:
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    info = next(reader)
    width, height = info["size"]
    return info, [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]


def test_the_enterprise_example_makes_an_mp4_of_the_frames_asked_for(app, tmp_path):
    body = {"key": KEY, "model_id": "svd", "init_image": data_uri(scene(80, 60)), "height": 48, "width": 64,
            "num_frames": 4, "num_inference_steps": 2, "min_guidance_scale": 1, "max_guidance_scale": 3,
            "motion_bucket_id": 20, "noise_aug_strength": 0.02, "base64": False, "webhook": None, "track_id": None}
    answer = app.post(f"{V1}/video/img2video", json=body).json()
    assert answer["output"][0].endswith(".mp4")
    info, frames = mp4_frames(video_bytes(app, answer), tmp_path)
    assert info["size"] == (64, 48) and len(frames) == 4 and info["fps"] == 8
    assert len({frame.tobytes() for frame in frames}) > 1  # the frames move
    meta = answer["meta"]
    assert meta["model_id"] == "tiny-svd"  # ModelsLab's "svd": the server's image-to-video model
    assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"], meta["num_inference_steps"]) == (64, 48, 4, 8, 2)
    assert (meta["min_guidance_scale"], meta["max_guidance_scale"], meta["motion_bucket_id"],
            meta["noise_aug_strength"]) == (1, 3, 20, 0.02)
    assert isinstance(meta["seed"], int) and meta["init_image"] == "(base64 image)"


def test_the_seed_fixes_the_video_and_the_image_shapes_it(app):
    first = video_bytes(app, app.post(f"{V1}/video/img2video", json=small()).json())
    again = video_bytes(app, app.post(f"{V1}/video/img2video", json=small()).json())
    other_seed = video_bytes(app, app.post(f"{V1}/video/img2video", json=small(seed=8)).json())
    other_image = video_bytes(app, app.post(f"{V1}/video/img2video", json=small(
        init_image=data_uri(scene(64, 48).transpose(Image.Transpose.ROTATE_180)))).json())
    digests = [hashlib.sha256(data).hexdigest() for data in (first, again, other_seed, other_image)]
    assert digests[0] == digests[1]
    assert len(set(digests)) == 3


def test_v6_gif_through_the_queue(app):
    queued = app.post(f"{V6}/video/img2video", json=small(output_type="gif", fps=4, num_frames=4,
                                                          instant_response=True)).json()
    assert queued["status"] == "processing" and queued["future_links"][0].endswith(".gif"), queued
    assert queued["fetch_result"].endswith(f"/api/v6/video/fetch/{queued['id']}")
    done = until_ended(lambda: app.post(queued["fetch_result"], json={"key": KEY}).json())
    assert done["output"] == queued["future_links"]
    gif = Image.open(io.BytesIO(video_bytes(app, done)))
    assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (64, 48) and gif.info["duration"] == 250


def test_v7_takes_a_list_of_one_image_and_a_duration(app):
    answer = app.post(f"{V7}/video-fusion/image-to-video", headers={"key": KEY}, json={
        "model_id": "svd", "init_image": [data_uri(scene(64, 64))], "duration": "1", "fps": 2, "width": 32,
        "height": 32, "num_inference_steps": 2, "output_type": "gif"}).json()
    gif = Image.open(io.BytesIO(video_bytes(app, answer)))
    assert gif.n_frames == 2 and gif.size == (32, 32) and answer["meta"]["num_frames"] == 2  # 1 s at 2 fps


def test_the_image_is_cropped_to_the_size_not_stretched(app):
    """A 2:1 image into a square video: the middle of it, as ImageOps.fit crops."""
    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    wide.paste((0, 0, 255), (32, 0, 96, 64))  # a blue middle square between red sides
    blue_only = Image.new("RGB", (64, 64), (0, 0, 255))
    body = small(width=64, height=64, output_type="gif")  # the crop is 64x64 already: no resampling
    cropped = video_bytes(app, app.post(f"{V1}/video/img2video", json={**body, "init_image": data_uri(wide)}).json())
    middle = video_bytes(app, app.post(f"{V1}/video/img2video", json={**body, "init_image": data_uri(blue_only)}).json())
    assert cropped == middle


def test_video_seconds_are_metered_under_img2video(app):
    video_bytes(app, app.post(f"{V1}/video/img2video", json=small(num_frames=4, fps=4)).json())
    usage = app.post(f"{V1}/usage", json={"key": ADMIN})
    assert usage.status_code == 200, usage.text
    counted = [entry["endpoints"]["img2video"] for entry in usage.json()["keys"] if "img2video" in entry["endpoints"]]
    assert counted and counted[0]["jobs_succeeded"] >= 1 and counted[0]["images"] == 0, counted
    assert counted[0]["video_seconds"] >= 1.0  # 4 frames at 4 fps, and the other tests' videos


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"init_image": None}, 422, "init_image"),
    ({"num_frames": 26}, 422, "num_frames"),
    ({"motion_bucket_id": 300}, 422, "motion_bucket_id"),
    ({"max_guidance_scale": 9}, 422, "max_guidance_scale"),
    ({"latent_interpolation_method": "slerp"}, 422, "latent_interpolation_method"),
    ({"output_type": "webm"}, 422, "output_type"),
    ({"base64": True}, 400, "base64"),
    ({"model_id": "tiny-sd"}, 400, "not image_to_video"),
    ({"model_id": "no-such-video-model"}, 404, "load_model_v2"),
    ({"init_image": "not an image"}, 400, "init_image"),
])
def test_bad_requests_are_clear_errors(app, body, status, words):
    answer = app.post(f"{V1}/video/img2video", json=small(**body))
    payload = answer.json()
    assert answer.status_code == status and payload["status"] == "error", payload
    assert words in str(payload), payload


def test_svd_folders_load_through_the_catalog(app, tmp_path):
    from infra.engine import LOAD_LOCK
    from infra.engine.files.tiny import build_tiny_svd

    with LOAD_LOCK:
        build_tiny_svd(tmp_path / "svd", seed=1)
    loaded = load(app, "load_model_v2", url=str(tmp_path / "svd"), model_id="my-svd", model_category="image_to_video")
    assert loaded["status"] == "success" and loaded["category"] == "image_to_video", loaded
    detected = load(app, "load_model", url=str(tmp_path / "svd"), model_id="my-svd-2")  # no category: detected
    assert detected["category"] == "image_to_video", detected
    mine = video_bytes(app, app.post(f"{V1}/video/img2video", json=small(model_id="my-svd")).json())
    builtin = video_bytes(app, app.post(f"{V1}/video/img2video", json=small()).json())
    assert mine != builtin  # other weights, another video
    wrong = load(app, "load_model_v2", url=str(tmp_path / "svd"), model_id="not-sdxl",
                 model_category="stable_diffusion_xl")
    assert wrong["status"] != "success" and "image_to_video" in str(wrong), wrong
