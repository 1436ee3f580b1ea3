"""ModelsLab's v7 routes (spec §2): kebab-case routes, the key in the body or in a `key` header
(ModelsLab's CLI sends both, the v7 pages the header only), `init_image` as a list, `aspect_ratio`,
a video's `duration`, fetch by POST with `{key}`, and GET /api/v7/models."""

from __future__ import annotations

import base64

from tests.conftest import KEY, png_bytes, scene, until_ended

V7 = "/api/v7"


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def test_text_to_image_with_the_key_in_the_header_only_and_in_the_body(client):
    body = {"model_id": "tiny-sd", "prompt": "a red apple on a white table", "width": 64, "height": 64,
            "num_inference_steps": 2}
    by_header = client.post(f"{V7}/images/text-to-image", json=body, headers={"key": KEY}).json()
    assert by_header["status"] == "success" and len(by_header["output"]) == 1, by_header
    by_body = client.post(f"{V7}/images/text-to-image", json={**body, "key": KEY}).json()
    assert by_body["status"] == "success"
    refused = client.post(f"{V7}/images/text-to-image", json=body, headers={"key": "wrong"})
    assert refused.status_code == 401 and refused.json()["status"] == "error"
    by_x_api_key = client.post(f"{V7}/images/text-to-image", json=body, headers={"X-API-Key": KEY}).json()  # MCP's
    assert by_x_api_key["status"] == "success"
    by_bearer = client.post(f"{V7}/images/text-to-image", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert by_bearer["status"] == "success"


def test_aspect_ratio_gives_the_size_and_a_fetch_by_post_with_the_key(client):
    queued = client.post(f"{V7}/images/text-to-image", headers={"key": KEY}, json={
        "model_id": "tiny-sd", "prompt": "a lake", "aspect_ratio": "16:9", "num_inference_steps": 1, "samples": "1",
        "instant_response": True}).json()
    assert queued["meta"]["W"] == 1024 and queued["meta"]["H"] == 576, queued["meta"]
    if queued["status"] == "processing":
        assert queued["fetch_result"].endswith(f"/api/v7/images/fetch/{queued['id']}")
    client.post("/api/v1/enterprise/cancel", json={"key": KEY, "request_id": queued["id"]})  # a big one: not waited for
    fetched = client.post(f"{V7}/images/fetch/{queued['id']}", json={"key": KEY}).json()
    assert fetched["id"] == queued["id"] and fetched["status"] in ("success", "failed")


def test_image_to_image_takes_a_list_of_one_image_and_inpaint_a_string(client):
    init = data_uri(scene(64, 64))
    answer = client.post(f"{V7}/images/image-to-image", headers={"key": KEY}, json={
        "model_id": "tiny-sd", "prompt": "a bench at night", "init_image": [init], "strength": 0.5,
        "num_inference_steps": 2}).json()
    assert answer["status"] == "success", answer
    two = client.post(f"{V7}/images/image-to-image", headers={"key": KEY}, json={
        "model_id": "tiny-sd", "prompt": "x", "init_image": [init, init]})
    # a field error the route's schema states (maxItems 1): this server takes one image
    assert two.status_code == 422 and "takes one image" in str(two.json()["message"]["init_image"])
    schema = client.get("/openapi.json").json()
    body = schema["paths"][f"{V7}/images/image-to-image"]["post"]["requestBody"]["content"]["application/json"]
    model = schema["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"aspect_ratio", "init_image"} <= set(model["properties"])
    assert any(option.get("maxItems") == 1 for option in model["properties"]["init_image"]["anyOf"])
    answer = client.post(f"{V7}/images/inpaint", headers={"key": KEY}, json={
        "model_id": "tiny-sd-inpaint", "prompt": "a cat", "init_image": init,
        "mask_image": data_uri(scene(64, 64).convert("L")), "strength": 0.7, "num_inference_steps": 2}).json()
    assert answer["status"] == "success", answer


def test_text_to_video_with_a_duration_and_its_fetch(client):
    queued = client.post(f"{V7}/video-fusion/text-to-video", headers={"key": KEY}, json={
        "model_id": "wan2.2", "prompt": "a wave", "width": 64, "height": 64, "duration": "1", "fps": 4,
        "num_inference_steps": 2, "output_type": "gif", "portrait": None, "instant_response": True}).json()
    assert queued["status"] in ("processing", "success"), queued
    done = until_ended(lambda: client.post(f"{V7}/video-fusion/fetch/{queued['id']}", json={"key": KEY}).json())
    assert done["status"] == "success" and done["meta"]["num_frames"] == 4, done  # 1 s at 4 fps
    i2v = client.post(f"{V7}/video-fusion/image-to-video", headers={"key": KEY}, json={
        "model_id": "Hailuo-2.3-i2v", "init_image": data_uri(scene(64, 64)), "duration": "6"})
    assert i2v.status_code == 404 and "Hailuo-2.3-i2v" in i2v.json()["message"]  # a hosted model this server lacks


def test_models_by_get_with_the_key_in_the_query(client):
    listed = client.get(f"{V7}/models", params={"key": KEY, "search": "tiny", "feature": "imagen"})
    assert listed.status_code == 200, listed.text
    assert "tiny-sd" in str(listed.json())
    assert client.get(f"{V7}/models").status_code == 401


def test_an_unknown_model_is_v7s_model_not_found(client):
    answer = client.post(f"{V7}/images/text-to-image", headers={"key": KEY}, json={"model_id": "imagen-4", "prompt": "x"})
    assert answer.status_code == 404 and "imagen-4" in answer.json()["message"]
