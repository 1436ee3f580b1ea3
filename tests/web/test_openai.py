"""The OpenAI images API (infra/web/openai_api.py) driven by the official `openai` SDK, unchanged but
for its base URL, against a real server process on the tiny built-in models: generations (url and
b64_json, n), edits with a mask and with the image's own transparency (the kept pixels come back as
sent), variations, the model list, and OpenAI's errors (wrong key, bad size, unknown model, a job
that outlives the wait budget)."""

from __future__ import annotations

import base64
import io
import time

import httpx
import openai
import pytest
from PIL import Image, ImageChops, ImageDraw

from tests.conftest import KEY, png_bytes, scene
from tests.conftest import ServerProcess as Server

QUICK = {"steps": 2}  # an extra (ModelsLab's field): the tiny models need no more


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    process = Server(root / "data", models_dir, api_keys=KEY, workers=1, torch_threads=1,
                     safety_checker_default="false")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY)


def decode_png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def download_png(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, url
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def centre_hole(width: int, height: int) -> tuple[int, int, int, int]:
    return width // 4, height // 4, width * 3 // 4 - 1, height * 3 // 4 - 1


def transparent_centre(image: Image.Image) -> Image.Image:
    """`image` as RGBA, fully transparent in the centre square (OpenAI's edit area), opaque elsewhere."""
    rgba = image.convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    ImageDraw.Draw(alpha).rectangle(centre_hole(*image.size), fill=0)
    rgba.putalpha(alpha)
    return rgba


def kept_difference(result: Image.Image, original: Image.Image) -> int:
    """The largest per-channel difference outside the centre square (the pixels an edit keeps)."""
    diff = ImageChops.difference(result.convert("RGB"), original.convert("RGB"))
    ImageDraw.Draw(diff).rectangle(centre_hole(*original.size), fill=(0, 0, 0))
    return max(high for _, high in diff.getextrema())


def centre_difference(result: Image.Image, original: Image.Image) -> int:
    diff = ImageChops.difference(result.convert("RGB"), original.convert("RGB")).crop(centre_hole(*original.size))
    return max(high for _, high in diff.getextrema())


# --------------------------------------------------------------------------- generations


def test_generation_url(client):
    result = client.images.generate(prompt="a lighthouse", size="64x64", extra_body=QUICK)
    assert abs(result.created - time.time()) < 300
    assert len(result.data) == 1
    assert result.data[0].url and result.data[0].b64_json is None
    assert download_png(result.data[0].url).size == (64, 64)


def test_generation_b64_json_two_images(client):
    result = client.images.generate(model="tiny-sd", prompt="a lighthouse", size="128x64", n=2,
                                    response_format="b64_json", extra_body={**QUICK, "seed": 5})
    assert len(result.data) == 2
    images = [decode_png(item.b64_json) for item in result.data]
    assert [image.size for image in images] == [(128, 64), (128, 64)]
    assert all(item.url is None for item in result.data)
    # ModelsLab's prompt enhancement (style vivid, the default) ran: the prompt that ran is shown
    assert result.data[0].revised_prompt and result.data[0].revised_prompt.startswith("a lighthouse")


def test_style_natural_runs_the_prompt_as_sent(client):
    result = client.images.generate(prompt="a lighthouse", size="64x64", style="natural", quality="low",
                                    response_format="b64_json", extra_body=QUICK)
    assert result.data[0].revised_prompt is None
    assert decode_png(result.data[0].b64_json).size == (64, 64)


def test_openai_model_names_mean_the_default_model(client):
    for name in ("dall-e-2", "dall-e-3"):
        result = client.images.generate(model=name, prompt="x", size="64x64", extra_body=QUICK)
        assert download_png(result.data[0].url).size == (64, 64)
    # GPT Image models answer in base64 only at OpenAI: their clients read b64_json without asking for it
    result = client.images.generate(model="gpt-image-1", prompt="x", size="64x64", extra_body=QUICK)
    assert result.data[0].url is None and decode_png(result.data[0].b64_json).size == (64, 64)


def test_unknown_model_is_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="no-such-model", prompt="x", size="64x64", extra_body=QUICK)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no-such-model" in error["message"]


# --------------------------------------------------------------------------- edits and variations


def test_edit_with_mask_keeps_the_opaque_area(client):
    original = scene(64, 64)
    mask = transparent_centre(Image.new("RGB", (64, 64), (0, 0, 0)))
    result = client.images.edit(image=("scene.png", png_bytes(original), "image/png"),
                                mask=("mask.png", png_bytes(mask), "image/png"), prompt="a red box",
                                response_format="b64_json", extra_body=QUICK)
    edited = decode_png(result.data[0].b64_json)
    assert edited.size == (64, 64)
    assert kept_difference(edited, original) <= 2
    assert centre_difference(edited, original) > 10  # the transparent area was painted anew


def test_edit_without_mask_uses_the_images_transparency(client):
    original = scene(64, 64)
    # as a list of one image: the SDK sends it as `image[]`
    result = client.images.edit(image=[("scene.png", png_bytes(transparent_centre(original)), "image/png")],
                                prompt="a red box", n=2, extra_body=QUICK)
    assert len(result.data) == 2
    for item in result.data:
        edited = download_png(item.url)
        assert edited.size == (64, 64)
        assert kept_difference(edited, original) <= 2


def test_edit_of_an_opaque_image_without_mask_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("scene.png", png_bytes(scene(64, 64)), "image/png"), prompt="x", extra_body=QUICK)
    assert caught.value.body["param"] == "image"
    assert "transparent" in caught.value.body["message"]


def test_variations(client):
    result = client.images.create_variation(image=("scene.png", png_bytes(scene(64, 64)), "image/png"), n=2,
                                            size="64x64", response_format="b64_json", extra_body=QUICK)
    images = [decode_png(item.b64_json) for item in result.data]
    assert [image.size for image in images] == [(64, 64), (64, 64)]


# --------------------------------------------------------------------------- models


def test_models_list_and_retrieve(client):
    models = client.models.list()
    ids = [model.id for model in models.data]
    assert {"tiny-sd", "tiny-sd-inpaint"} <= set(ids)
    assert all(model.object == "model" and model.owned_by and model.created > 0 for model in models.data)
    one = client.models.retrieve("tiny-sd")
    assert one.id == "tiny-sd" and one.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.body["code"] == "model_not_found"


def test_openapi_documents_the_routes_under_their_tag(server):
    schema = httpx.get(f"{server.base}/openapi.json", timeout=30).json()
    paths = {"/v1/images/generations": "post", "/v1/images/edits": "post", "/v1/images/variations": "post",
             "/v1/models": "get", "/v1/models/{model_id}": "get"}
    for path, method in paths.items():
        assert schema["paths"][path][method]["tags"] == ["OpenAI images"], path
    edits = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert edits["properties"]["image"]["format"] == "binary" and {"image", "prompt"} <= set(edits["required"])
    generations = schema["paths"]["/v1/images/generations"]["post"]
    assert "size" in generations["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"200", "400", "401", "404", "504"} <= set(generations["responses"])


# --------------------------------------------------------------------------- errors


def test_wrong_key_is_an_authentication_error(server):
    wrong = openai.OpenAI(base_url=f"{server.base}/v1", api_key="not-a-key")
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.images.generate(prompt="x", size="64x64")
    assert caught.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("size", ["64", "64x", "100x100", "2048x2048", "0x64", "axb"])
def test_bad_size_is_a_bad_request_naming_size(client, size):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size=size, extra_body=QUICK)
    assert caught.value.body["param"] == "size"
    assert "size" in caught.value.message


def test_bad_n_and_bad_extras_are_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="64x64", n=5, extra_body=QUICK)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="64x64", extra_body={"steps": 500})
    assert caught.value.body["param"] == "steps"  # as the client spelled it
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="64x64", output_format="jpeg", extra_body=QUICK)
    assert caught.value.body["param"] == "output_format"


def test_errors_under_v1_have_openais_shape(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    broken = httpx.post(f"{server.base}/v1/images/generations", content=b"{not json", headers=headers, timeout=30)
    assert broken.status_code == 400 and set(broken.json()["error"]) == {"message", "type", "param", "code"}
    not_form = httpx.post(f"{server.base}/v1/images/edits", json={"prompt": "x"}, headers=headers, timeout=30)
    assert not_form.status_code == 400 and "multipart" in not_form.json()["error"]["message"]
    missing = httpx.post(f"{server.base}/v1/chat/completions", json={}, headers=headers, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    # the ModelsLab routes keep their own envelope
    modelslab = httpx.post(f"{server.base}/api/v1/enterprise/text2img", json={"key": "nope", "prompt": "x"}, timeout=30)
    assert modelslab.status_code == 401 and modelslab.json()["status"] == "error"


def test_a_job_past_the_wait_budget_is_a_timeout_naming_the_job(models_dir, tmp_path):
    """With a tiny wait budget (SDAPI_SYNC_TIMEOUT=0, SDAPI_STREAM_MAX_SECONDS=0.05) the request answers
    504 at once, naming the job and its ModelsLab fetch route; the SDK does not retry it (no second job)."""
    slow = Server(tmp_path / "data", models_dir, api_keys=KEY, workers=1, torch_threads=1, sync_timeout=0,
                  stream_max_seconds=0.05, safety_checker_default="false")
    try:
        client = openai.OpenAI(base_url=f"{slow.base}/v1", api_key=KEY)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.images.generate(prompt="x", size="128x128", extra_body={"steps": 30})
        assert time.monotonic() - started < 10  # answered at once, not retried with back-off
        error = caught.value
        assert error.status_code == 504 and error.body["code"] == "job_not_finished"
        job_id = int(error.response.headers["x-job-id"])
        assert str(job_id) in error.message and f"/api/v1/enterprise/fetch/{job_id}" in error.message
        # the job is real: its result is there later through the ModelsLab API
        deadline = time.monotonic() + 120
        while (fetched := slow.post("fetch", request_id=job_id))["status"] == "processing":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert fetched["status"] == "success" and len(fetched["output"]) == 1
        # one request made one job: the SDK was told not to retry (x-should-retry: false)
        usage = slow.post("usage")["keys"]
        assert usage[0]["endpoints"]["openai/images/generations"]["requests"] == 1
        assert usage[0]["endpoints"]["text2img"]["jobs_succeeded"] == 1
    finally:
        slow.stop()


def test_fastapi_validation_errors_under_v1_are_openai_shaped():
    """A route's own parameter validation (FastAPI's RequestValidationError) answers OpenAI's 400 under
    /v1/ and FastAPI's usual 422 elsewhere."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from infra.web import openai_api

    app = FastAPI()
    openai_api.add_routes(app, runtime=None, limiter=None)  # the routes' closures are not called here

    @app.get("/v1/probe/{number}")
    def probe(number: int):
        return {"number": number}

    @app.get("/elsewhere/{number}")
    def elsewhere(number: int):
        return {"number": number}

    with TestClient(app) as http:
        assert http.get("/v1/probe/7").json() == {"number": 7}
        answer = http.get("/v1/probe/seven")
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "number" and answer.json()["error"]["type"] == "invalid_request_error"
        assert http.get("/elsewhere/seven").status_code == 422 and "detail" in http.get("/elsewhere/seven").json()
