"""The enterprise v1 family prefixes (spec: ../shared/spec/modelslab-v6-v7-and-families.md §5, §7,
§8): `video/`, `image_editing/` and `super_resolution/` answer their admin routes and the family
endpoints this server runs, with the field names of those pages; a job made there is fetched on
the family's own fetch route and on the SD server's."""

from __future__ import annotations

import base64

import pytest

from tests.conftest import KEY, open_client, png_bytes, scene, until_ended
from tests.handlers.test_media import media, upscaler_files  # noqa: F401 (fixtures: the tiny upscalers loaded)

V1 = "/api/v1/enterprise"
QUICK = {"prompt": "a bench", "width": 64, "height": 64, "steps": 2, "seed": 7}


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@pytest.mark.parametrize("family", ["video", "image_editing", "super_resolution"])
def test_every_family_answers_the_admin_routes_its_pages_document(client, family):
    for route in ("system_details", "update_server", "update", "clear_cache", "clear_queue"):
        answer = client.post(f"{V1}/{family}/{route}", json={"key": "enterprise_api_key"})
        assert answer.status_code == 200 and answer.json()["status"] in ("success", "ok"), (route, answer.text)
    assert client.post(f"{V1}/{family}/system_details", json={"key": "wrong"}).status_code == 401


def test_a_video_family_job_with_the_docs_model_id_is_fetched_on_the_familys_route(client):
    body = {"key": KEY, "model_id": "cogvideox", "prompt": "Space Station in space.", "negative_prompt": "low quality",
            "height": 64, "width": 64, "num_frames": 4, "num_inference_steps": 2, "guidance_scale": 7,
            "output_type": "gif", "instant_response": True, "webhook": None, "track_id": None}
    queued = client.post(f"{V1}/video/text2video", json=body).json()
    assert queued["status"] in ("processing", "success"), queued
    if queued["status"] == "processing":
        assert queued["fetch_result"].endswith(f"/api/v1/enterprise/video/fetch/{queued['id']}")
    done = until_ended(lambda: client.post(f"{V1}/video/fetch/{queued['id']}", json={"key": KEY}).json())
    assert done["status"] == "success" and done["output"][0].endswith(".gif")
    assert client.post(f"{V1}/fetch/{queued['id']}", json={"key": KEY}).json() == done  # one job, any route


def test_image_to_video_runs_on_the_family_route(client):
    answer = client.post(f"{V1}/video/img2video", json={"key": KEY, "model_id": "svd", "init_image": data_uri(scene(64, 64)),
                                                        "width": 32, "height": 32, "num_frames": 2, "steps": 1})
    assert answer.status_code == 200 and answer.json()["status"] == "success", answer.text
    assert answer.json()["output"][0].endswith(".mp4")


def test_super_resolution_takes_the_families_init_image(media):  # noqa: F811
    image = data_uri(scene(32, 32))
    for path in ("image_editing/super_resolution", "super_resolution/make"):
        answer = media.post(f"{V1}/{path}", json={"key": KEY, "init_image": image, "model_id": "RealESRGAN_x2plus",
                                                  "scale": 2, "face_enhance": False})
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", body
        assert isinstance(body["output"], str) and body["output"].endswith(".png")


def test_image_editing_inpainting_is_inpaint(client):
    body = {"key": KEY, **QUICK, "init_image": data_uri(scene(64, 64)), "mask_image": data_uri(scene(64, 64).convert("L"))}
    answer = client.post(f"{V1}/image_editing/inpainting", json=body).json()
    assert answer["status"] == "success" and len(answer["output"]) == 1, answer


def test_the_openapi_document_shows_each_api_generation_under_its_own_tag(client):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns of duplicate operation ids
        schema = client.get("/openapi.json").json()
    tags: dict[str, set[str]] = {}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            for tag in operation.get("tags", []):
                tags.setdefault(tag, set()).add(path)
    assert {"Enterprise v1", "Enterprise v1 families", "v6", "v7", "v3"} <= tags.keys(), tags.keys()
    assert "/api/v6/images/text2img" in tags["v6"] and "/api/v7/images/text-to-image" in tags["v7"]
    assert "/api/v3/dreambooth" in tags["v3"] and "/api/v1/enterprise/video/text2video" in tags["Enterprise v1 families"]
    assert "get" in schema["paths"]["/api/v6/images/fetch/{request_id}"]  # fetch by GET, its key in the query
    ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values() if "operationId" in op]
    assert len(ids) == len(set(ids))


def test_a_wrong_method_is_a_405_with_allow(client):
    answer = client.get("/api/v6/images/text2img")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST" and answer.json()["status"] == "error"
    # a path several routes serve names every method they take
    answer = client.request("OPTIONS", "/api/v7/images/fetch/1")
    assert answer.status_code == 405 and set(answer.headers["allow"].split(", ")) == {"GET", "POST"}
    answer = client.delete("/api/v1/enterprise/stream/1")
    assert answer.status_code == 405 and set(answer.headers["allow"].split(", ")) == {"GET", "POST"}


def test_qwen_edit_runs_img2img_on_the_qwen_image_edit_model(models_dir, tmp_path):
    import shutil

    from infra.engine import LOAD_LOCK
    from infra.engine.files.tiny import build_tiny_qwen_image
    from tests.catalog.test_catalog import load

    shutil.copytree(models_dir, tmp_path / "models")
    client = open_client(tmp_path / "data", tmp_path / "models")
    try:
        route = f"{V1}/image_editing/qwen_edit"
        body = {"key": KEY, "prompt": "the woman wearing the dress", "init_image": [data_uri(scene(64, 64))],
                "base64": False, "webhook": None, "track_id": None, "num_inference_steps": 2}
        none = client.post(route, json=body)
        assert none.status_code == 400 and "Qwen-Image-Edit" in none.json()["message"]  # nothing to run it on yet
        with LOAD_LOCK:
            build_tiny_qwen_image(tmp_path / "edit", edit=True)
        assert load(client, "load_model_v2", url=str(tmp_path / "edit"), model_id="my-qwen-edit",
                    model_category="qwen_edit")["status"] == "success"
        answer = client.post(route, json=body).json()
        assert answer["status"] == "success" and answer["meta"]["model_id"] == "my-qwen-edit", answer
        two = client.post(route, json={**body, "init_image": [data_uri(scene(64, 64))] * 2})
        assert two.status_code == 400 and "takes one image" in two.json()["message"]
        assert "Qwen-Image-Edit-2509" in two.json()["message"]
    finally:
        client.__exit__(None, None, None)


def test_qwen_edit_2509_edits_several_images_as_the_docs_example_sends_them(models_dir, tmp_path):
    """Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline) takes the docs' `init_image` list, up to 3 images,
    each seen by the model: another second image gives another result."""
    import shutil

    from PIL import Image

    from infra.engine import LOAD_LOCK
    from infra.engine.files.tiny import build_tiny_qwen_image
    from tests.catalog.test_catalog import load

    shutil.copytree(models_dir, tmp_path / "models")
    client = open_client(tmp_path / "data", tmp_path / "models")
    try:
        with LOAD_LOCK:
            build_tiny_qwen_image(tmp_path / "plus", edit=True, plus=True)
        assert load(client, "load_model_v2", url=str(tmp_path / "plus"), model_id="qwen-edit-2509",
                    model_category="qwen_edit")["status"] == "success"
        route = f"{V1}/image_editing/qwen_edit"
        body = {"key": KEY, "prompt": "the woman wearing the dress", "base64": True, "webhook": None, "track_id": None,
                "num_inference_steps": 2, "seed": 5, "width": 64, "height": 64}
        person, dress, other = scene(64, 64), Image.new("RGB", (48, 64), (200, 30, 30)), Image.new("RGB", (48, 64), (20, 40, 220))
        outputs = []
        for second in (dress, other):
            answer = client.post(route, json={**body, "init_image": [data_uri(person), data_uri(second)]}).json()
            assert answer["status"] == "success" and answer["meta"]["model_id"] == "qwen-edit-2509", answer
            outputs.append(answer["output"][0])
        assert outputs[0] != outputs[1]  # the second image reached the model
        four = client.post(route, json={**body, "init_image": [data_uri(person)] * 4})
        assert four.status_code == 400 and "at most 3" in four.json()["message"]
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(("name", "missing"), [("fashion", "garment-transfer"),
                                               ("face_gen", "insightface"), ("head_shot", "InstantID")])
def test_editing_routes_without_a_pipeline_name_what_is_missing(client, name, missing):
    answer = client.post(f"{V1}/image_editing/{name}", json={"key": KEY, "prompt": "x", "image": data_uri(scene(8, 8))})
    assert answer.status_code == 400 and answer.json()["status"] == "error"
    assert missing in answer.json()["message"], answer.json()
