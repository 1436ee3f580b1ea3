"""IP-Adapter (issue 20): `ip_adapter_id`, `ip_adapter_scale` (default 0.6) and `ip_adapter_image` on
text2img / img2img / inpaint / controlnet for SD models. A tiny adapter (tests.model_files.write_ip_adapter:
its weights and a CLIP image encoder, as h94 publishes them) is loaded through the catalog from a
folder, applied with diffusers' own IP-Adapter support for the job, and unloaded without a trace."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.catalog.test_catalog import call, load
from tests.conftest import centre_mask, open_client, png_bytes, scene
from tests.model_files import write_ip_adapter, write_lora

QUICK = {"width": 64, "height": 64, "num_inference_steps": 3, "seed": 21, "prompt": "a bench", "enhance_prompt": "no"}


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def pixels(client, result: dict) -> np.ndarray:
    assert result["status"] == "success", result
    return np.asarray(Image.open(io.BytesIO(client.get(result["output"][0]).content)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ip-adapter")
    shutil.copytree(models_dir, root / "models")
    client = open_client(root / "data", root / "models")
    for model_id, layout in (("ip-adapter_sd15", "safetensors"), ("ip-adapter-bin", "bin")):
        folder = write_ip_adapter(root / "models" / "tiny-sd", root / model_id, layout=layout)
        answer = load(client, "load_model_v2", url=str(folder), model_id=model_id, model_category="ip_adapter")
        assert answer["status"] == "success" and answer["category"] == "ip_adapter", answer
    lora = write_lora(root / "models" / "tiny-sd", root / "lora.safetensors")
    assert load(client, "load_model_v2", url=str(lora), model_id="a-lora", model_category="lora")["status"] == "success"
    yield client, root
    client.__exit__(None, None, None)


def test_the_adapter_and_its_image_steer_the_image_and_leave_no_trace(app):
    client, _ = app
    plain = pixels(client, call(client, "text2img", **QUICK))
    red, blue = data_uri(Image.new("RGB", (64, 64), (220, 30, 30))), data_uri(scene(64, 64))
    steered = call(client, "text2img", **QUICK, ip_adapter_id="ip-adapter_sd15", ip_adapter_image=red)
    assert steered["meta"]["ip_adapter_id"] == "ip-adapter_sd15" and steered["meta"]["ip_adapter_scale"] == 0.6
    first = pixels(client, steered)
    assert not np.array_equal(first, plain)
    again = pixels(client, call(client, "text2img", **QUICK, ip_adapter_id="ip-adapter_sd15", ip_adapter_image=red))
    assert np.array_equal(first, again)
    other_image = pixels(client, call(client, "text2img", **QUICK, ip_adapter_id="ip-adapter_sd15", ip_adapter_image=blue))
    weaker = pixels(client, call(client, "text2img", **QUICK, ip_adapter_id="ip-adapter_sd15", ip_adapter_image=red,
                                 ip_adapter_scale=0.2))
    assert not np.array_equal(first, other_image) and not np.array_equal(first, weaker)
    assert np.abs(weaker - plain).mean() < np.abs(first - plain).mean()  # a lower scale stays closer to the model
    # unloaded after each job: the model answers as before
    assert np.array_equal(pixels(client, call(client, "text2img", **QUICK)), plain)
    # the .bin layout (nested image_proj / ip_adapter) loads the same way
    assert call(client, "text2img", **QUICK, ip_adapter_id="ip-adapter-bin", ip_adapter_image=red)["status"] == "success"


def test_with_a_lora_on_img2img_and_inpaint(app):
    client, _ = app
    red = data_uri(Image.new("RGB", (64, 64), (220, 30, 30)))
    with_lora = call(client, "text2img", **QUICK, lora_model="a-lora", ip_adapter_id="ip-adapter_sd15", ip_adapter_image=red)
    lora_only = call(client, "text2img", **QUICK, lora_model="a-lora")
    assert not np.array_equal(pixels(client, with_lora), pixels(client, lora_only))
    init, mask = scene(64, 64), centre_mask(64, 64)
    moved = call(client, "img2img", **QUICK, init_image=data_uri(init), strength=0.8, ip_adapter_id="ip-adapter_sd15",
                 ip_adapter_image=red)
    assert pixels(client, moved).shape == (64, 64, 3)
    painted = pixels(client, call(client, "inpaint", **{**QUICK, "model_id": "tiny-sd-inpaint"}, init_image=data_uri(init),
                                  mask_image=data_uri(mask), ip_adapter_id="ip-adapter_sd15", ip_adapter_image=red))
    keep = np.asarray(mask) == 0
    assert np.array_equal(painted[keep], np.asarray(init, dtype=np.int16)[keep])


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"ip_adapter_id": "ip-adapter_sd15"}, 400, "ip_adapter_id needs ip_adapter_image"),
    ({"ip_adapter_scale": 0.5}, 400, "ip_adapter_scale was given without ip_adapter_id"),
    ({"ip_adapter_id": "ip-adapter_sdxl", "ip_adapter_image": "red"}, 404, "ip-adapter_sdxl"),
    ({"ip_adapter_id": "a-lora", "ip_adapter_image": "red"}, 400, "a-lora"),
    ({"ip_adapter_id": "ip-adapter_sd15", "ip_adapter_image": "red", "highres_fix": "yes"}, 400, "highres_fix"),
    ({"ip_adapter_id": "ip-adapter_sd15", "ip_adapter_image": "red", "ip_adapter_scale": 2}, 422, "ip_adapter_scale"),
])
def test_what_is_wrong_with_an_ip_adapter_request_is_named(app, body, status, says):
    client, _ = app
    red = data_uri(Image.new("RGB", (64, 64), (220, 30, 30)))
    answer = call(client, "text2img", **QUICK, **{k: red if v == "red" else v for k, v in body.items()})
    assert answer["http"] == status and says in str(answer["message"]), answer


def test_a_folder_without_its_image_encoder_does_not_load(app):
    client, root = app
    folder = write_ip_adapter(root / "models" / "tiny-sd", root / "no-encoder")
    shutil.rmtree(folder / "image_encoder")
    answer = load(client, "load_model_v2", url=str(folder), model_id="no-encoder", model_category="ip_adapter")
    assert answer["status"] == "error" and "image_encoder/" in answer["message"], answer


def test_modelslabs_adapter_ids_are_fetched_on_first_use_and_checked_before(models_dir, tmp_path):
    """`ip-adapter_sd15` is fetched into the store by the first job that names it (here from a folder set
    in known_model_urls: h94/IP-Adapter's files where the machine has internet), then runs; an SDXL id on an
    SD 1.x model is refused before anything is fetched."""
    shutil.copytree(models_dir, tmp_path / "models")
    folder = write_ip_adapter(tmp_path / "models" / "tiny-sd", tmp_path / "mirror" / "ip-adapter_sd15")
    client = open_client(tmp_path / "data", tmp_path / "models", fetch_known_models=True,
                         known_model_urls={"ip-adapter_sd15": str(folder)})
    try:
        red = data_uri(Image.new("RGB", (64, 64), (220, 30, 30)))
        wrong = call(client, "text2img", **QUICK, ip_adapter_id="ip-adapter_sdxl", ip_adapter_image=red)
        assert wrong["http"] == 400 and "SDXL" in wrong["message"], wrong
        first = call(client, "text2img", **QUICK, ip_adapter_id="ip-adapter_sd15", ip_adapter_image=red)
        assert first["status"] == "success" and first["meta"]["ip_adapter_id"] == "ip-adapter_sd15", first
        models = {m["model_id"]: m for m in call(client, "get_all_models")["models"]}
        assert models["ip-adapter_sd15"]["category"] == "ip_adapter" and models["ip-adapter_sd15"]["status"] == "ready"
        assert "ip-adapter_sdxl" not in models
        again = call(client, "text2img", **QUICK, ip_adapter_id="ip-adapter_sd15", ip_adapter_image=red)
        assert np.array_equal(pixels(client, again), pixels(client, first))
    finally:
        client.__exit__(None, None, None)
