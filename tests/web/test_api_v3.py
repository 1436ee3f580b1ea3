"""The v3 API of the stablediffusionapi.com years (the seed's own host): `text2img`, `img2img`,
`dreambooth` (a community model by `model_id`) and `fetch/{id}`, the parameters as JSON or as
query-string parameters with an empty body, the key in the body, the query or a `key` header."""

from __future__ import annotations

import base64

from tests.conftest import KEY, png_bytes, scene, until_ended

V3 = "/api/v3"
QUICK = {"prompt": "a bench", "width": "64", "height": "64", "num_inference_steps": "2", "samples": "1"}


def test_text2img_as_json_and_as_a_query_string_with_an_empty_body(client):
    as_json = client.post(f"{V3}/text2img", json={"key": KEY, **QUICK}).json()
    assert as_json["status"] == "success" and len(as_json["output"]) == 1, as_json
    as_query = client.post(f"{V3}/text2img", params={"key": KEY, **QUICK, "seed": "5"}).json()
    assert as_query["status"] == "success" and as_query["meta"]["seed"] == 5, as_query
    by_header = client.post(f"{V3}/text2img", params=QUICK, headers={"key": KEY}).json()
    assert by_header["status"] == "success"
    assert client.post(f"{V3}/text2img", params=QUICK).status_code == 401


def test_dreambooth_is_text2img_of_the_named_model_and_fetch_by_id(client):
    queued = client.post(f"{V3}/dreambooth", json={"key": KEY, "model_id": "tiny-sd", **QUICK,
                                                   "instant_response": "yes"}).json()
    assert queued["status"] in ("processing", "success"), queued
    if queued["status"] == "processing":
        assert queued["fetch_result"].endswith(f"/api/v3/fetch/{queued['id']}")
    done = until_ended(lambda: client.post(f"{V3}/fetch/{queued['id']}", params={"key": KEY}).json())
    assert done["status"] == "success" and done["meta"]["model_id"] == "tiny-sd", done
    missing = client.post(f"{V3}/dreambooth", json={"key": KEY, "model_id": "no-such-model", **QUICK})
    assert missing.status_code == 404


def test_img2img_with_query_parameters(client):
    init = "data:image/png;base64," + base64.b64encode(png_bytes(scene(64, 64))).decode()
    answer = client.post(f"{V3}/img2img", params={"key": KEY, "prompt": "a bench", "num_inference_steps": "2"},
                         json={"init_image": init}).json()
    assert answer["status"] == "success", answer
