"""ModelsLab's v6 routes (spec §3, §4, §10.4) with the docs' own example bodies (their image URLs
replaced by data URIs: tests reach no network), the docs' value spellings ("512", "yes", `steps`,
booleans) and its fetch in each of its three forms."""

from __future__ import annotations

import base64

from tests.conftest import KEY, png_bytes, scene, until_ended

V6 = "/api/v6"


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def docs_text2img(**changes) -> dict:
    """dreambooth-text-to-image.mdx's body, at a size the tiny model makes quickly."""
    body = {"key": KEY, "model_id": "your_model_id", "prompt": "ultra realistic close up portrait ((beautiful pale cyberpunk",
            "negative_prompt": "", "enhance_prompt": "yes", "width": "64", "height": "64", "samples": "1",
            "num_inference_steps": "2", "safety_checker": "no", "seed": None, "guidance_scale": 7.5, "upscale": "no",
            "lora_model": None, "clip_skip": "2", "use_karras_sigmas": "yes", "vae": None, "lora_strength": None,
            "scheduler": "UniPCMultistepScheduler", "webhook": None, "track_id": None}
    return {**body, **changes}


def test_text2img_with_the_docs_body_and_fetch_in_every_form(client):
    done = client.post(f"{V6}/images/text2img", json=docs_text2img()).json()
    assert done["status"] == "success" and len(done["output"]) == 1, done
    queued = client.post(f"{V6}/images/text2img", json=docs_text2img(instant_response=True)).json()
    if queued["status"] == "processing":
        assert queued["fetch_result"].endswith(f"/api/v6/images/fetch/{queued['id']}")
    forms = [lambda: client.post(f"{V6}/images/fetch", json={"key": KEY, "request_id": str(queued["id"])}),
             lambda: client.post(f"{V6}/images/fetch/{queued['id']}", json={"key": KEY}),
             lambda: client.get(f"{V6}/images/fetch/{queued['id']}", params={"key": KEY})]
    until_ended(lambda: forms[0]().json())
    answers = [form().json() for form in forms]
    assert all(a["status"] == "success" and a["id"] == queued["id"] for a in answers), answers
    assert answers[0]["output"] == answers[1]["output"] == answers[2]["output"]


def test_img2img_and_inpaint_with_the_docs_bodies(client):
    init = data_uri(scene(64, 64))
    img2img = {"key": KEY, "model_id": "tiny-sd", "prompt": "women playing tennis", "negative_prompt": None,
               "init_image": init, "samples": "1", "num_inference_steps": "2", "safety_checker": "yes",
               "guidance_scale": 7.5, "strength": 0.7, "scheduler": "UniPCMultistepScheduler", "seed": None,
               "lora_model": None, "use_karras_sigmas": "yes", "vae": None, "lora_strength": None, "webhook": None,
               "track_id": None}
    answer = client.post(f"{V6}/images/img2img", json=img2img).json()
    assert answer["status"] == "success", answer
    inpaint = {"key": KEY, "model_id": "tiny-sd-inpaint", "prompt": "a cat sitting on a bench", "negative_prompt": None,
               "init_image": init, "mask_image": data_uri(scene(64, 64).convert("L")), "width": "64", "height": "64",
               "samples": "1", "steps": "2", "safety_checker": "no", "guidance_scale": 7.5, "strength": 0.7,
               "scheduler": "UniPCMultistepScheduler", "lora_model": None, "use_karras_sigmas": "yes", "vae": None,
               "lora_strength": None, "seed": None, "webhook": None, "track_id": None}
    answer = client.post(f"{V6}/images/inpaint", json=inpaint).json()
    assert answer["status"] == "success", answer
    editing = client.post(f"{V6}/image_editing/inpaint", json={**inpaint, "model_id": None}).json()
    assert editing["status"] == "success", editing


def test_v6_errors_use_the_envelope_with_a_field_message(client):
    missing = client.post(f"{V6}/images/text2img", json={"key": KEY, "model_id": "tiny-sd"})
    assert missing.status_code == 422 and missing.json()["status"] == "error" and "prompt" in missing.json()["message"]
    unknown = client.post(f"{V6}/images/text2img", json=docs_text2img(model_id="no-such-model"))
    assert unknown.status_code == 404 and "no-such-model" in unknown.json()["message"]
    assert client.post(f"{V6}/images/text2img", json=docs_text2img(key="wrong")).status_code == 401
    assert client.get(f"{V6}/images/fetch/1").status_code == 401  # a GET without the key


def test_model_reload_says_whether_the_model_is_here(client):
    here = client.post(f"{V6}/images/model_reload", json={"key": KEY, "model_id": "tiny-sd"})
    assert here.status_code == 200 and here.json()["status"] == "success", here.text
    missing = client.post(f"{V6}/images/model_reload", json={"key": KEY, "model_id": "no-such-model"})
    assert missing.status_code == 404 and "no-such-model" in missing.json()["message"]
