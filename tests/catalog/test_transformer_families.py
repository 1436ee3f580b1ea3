"""The flow-matching transformer families (issue 19, first part): Flux.1 and SD3 / SD3.5. Tiny
pipelines (random weights, built in code from configs/tiny-flux and configs/tiny-sd3) are loaded from
diffusers folders, detected from their weights, listed and deleted like any model, and run over HTTP
by text2img, img2img and inpaint through diffusers' own pipelines for the family; what a family
cannot do is a 400 naming it, what it does not use a `meta.notes` line."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from infra.engine import LOAD_LOCK
from infra.engine.files.tiny import build_tiny_flux, build_tiny_sd3
from tests.catalog.test_catalog import call, load
from tests.conftest import centre_mask, open_client, png_bytes, scene

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "samples": 1}
FAMILIES = {"flux": ("flux-tiny", build_tiny_flux), "sd3": ("sd3-tiny", build_tiny_sd3)}


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    """An app with its own models, the tiny Flux and SD3 models loaded from local folders."""
    root = tmp_path_factory.mktemp("families")
    shutil.copytree(models_dir, root / "models")
    client = open_client(root / "data", root / "models")
    for family, (model_id, build) in FAMILIES.items():
        with LOAD_LOCK:
            build(root / family)
        answer = load(client, "load_model_v2", url=str(root / family), model_id=model_id, model_category=family,
                      model_format="diffusers")
        assert answer["status"] == "success" and answer["category"] == family, answer
    yield client, root
    client.__exit__(None, None, None)


def pixels(client, result: dict) -> np.ndarray:
    assert result["status"] == "success", result
    return np.asarray(Image.open(io.BytesIO(client.get(result["output"][0]).content)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_of_the_family_is_detected_listed_and_its_claims_checked(app, family):
    client, root = app
    listed = {m["model_id"]: m for m in call(client, "get_all_models")["models"]}
    assert listed[FAMILIES[family][0]]["category"] == family
    # loaded without a claim (load_model's huggingface type): the family comes from the weights
    assert load(client, "load_model", url=str(root / family), model_id=f"{family}-detected")["category"] == family
    # (stable_diffusion means "a pipeline, family detected", as ModelsLab's docs use it for every model)
    wrong = load(client, "load_model_v2", url=str(root / family), model_id=f"{family}-as-sdxl",
                 model_category="stable_diffusion_xl")
    assert wrong["status"] == "error" and f"use model_category {family}" in wrong["message"], wrong
    other = "sd3" if family == "flux" else "flux"
    crossed = load(client, "load_model_v2", url=str(root / family), model_id=f"{family}-as-{other}", model_category=other)
    assert crossed["status"] == "error" and "was claimed" in crossed["message"], crossed
    assert call(client, "delete_model", model_id=f"{family}-detected")["status"] == "success"
    assert f"{family}-detected" not in {m["model_id"] for m in call(client, "get_all_models")["models"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_text2img_img2img_and_inpaint_run_on_the_family(app, family):
    client, _ = app
    model_id = FAMILIES[family][0]
    first = call(client, "text2img", model_id=model_id, prompt="a red cube", seed=3, **SMALL)
    again = call(client, "text2img", model_id=model_id, prompt="a red cube", seed=3, **SMALL)
    other = call(client, "text2img", model_id=model_id, prompt="a red cube", seed=4, **SMALL)
    a, b, c = pixels(client, first), pixels(client, again), pixels(client, other)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert first["meta"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"

    init = scene(64, 64)
    moved = pixels(client, call(client, "img2img", model_id=model_id, prompt="a bench", init_image=data_uri(init),
                                strength=0.7, **SMALL))
    assert moved.shape == (64, 64, 3) and not np.array_equal(moved, np.asarray(init, dtype=np.int16))

    mask = centre_mask(64, 64)
    painted = pixels(client, call(client, "inpaint", model_id=model_id, prompt="a cat", init_image=data_uri(init),
                                  mask_image=data_uri(mask), strength=0.9, **SMALL))
    keep = np.asarray(mask) == 0
    source = np.asarray(init, dtype=np.int16)
    assert np.array_equal(painted[keep], source[keep])  # the unmasked pixels, bit for bit
    assert not np.array_equal(painted[~keep], source[~keep])


def test_sizes_are_multiples_of_16_and_what_a_family_does_not_use_is_noted(app):
    client, _ = app
    result = call(client, "text2img", model_id="flux-tiny", prompt="x", width=72, height=40, num_inference_steps=1,
                  negative_prompt="blurry", tomesd="yes", seed=1)
    assert (result["meta"]["W"], result["meta"]["H"]) == (64, 32)
    assert pixels(client, result).shape == (32, 64, 3)
    notes = " ".join(result["meta"]["notes"])
    assert "negative_prompt was not used" in notes and "tomesd was not used" in notes
    plain = call(client, "text2img", model_id="flux-tiny", prompt="x", num_inference_steps=1, width=64, height=32, seed=1)
    assert "notes" not in plain["meta"]  # nothing sent that it ignores
    assert np.array_equal(pixels(client, plain), pixels(client, result))  # and the negative prompt changed nothing
    # SD3 runs true classifier-free guidance: its negative prompt is used
    sd3 = {"model_id": "sd3-tiny", "prompt": "x", "num_inference_steps": 2, "width": 32, "height": 32, "seed": 1,
           "guidance_scale": 5}
    with_negative = call(client, "text2img", **sd3, negative_prompt="blurry")
    assert "notes" not in with_negative["meta"]
    assert not np.array_equal(pixels(client, with_negative), pixels(client, call(client, "text2img", **sd3)))


@pytest.mark.parametrize(("model_id", "body", "says"), [
    ("flux-tiny", {"scheduler": "DDIMScheduler"}, "takes FlowMatchEulerDiscreteScheduler only"),
    ("sd3-tiny", {"scheduler": "EulerDiscreteScheduler"}, "takes FlowMatchEulerDiscreteScheduler only"),
    ("flux-tiny", {"clip_skip": 2}, "clip_skip does not apply to Flux models"),
    ("flux-tiny", {"lora_model": "some-lora"}, "lora_model does not apply to Flux models"),
    ("sd3-tiny", {"embeddings_model": "easyneg"}, "embeddings_model does not apply to SD3 models"),
    ("sd3-tiny", {"panorama": "yes"}, "panorama is available for SD 1.x/2.x models only"),
])
def test_what_a_family_cannot_do_is_a_400_naming_it(app, model_id, body, says):
    client, _ = app
    answer = call(client, "text2img", model_id=model_id, prompt="x", **SMALL, **body)
    assert answer["http"] == 400 and says in answer["message"], answer


def test_flow_matching_schedulers_are_refused_on_sd_models_and_controlnet_and_video_on_the_families(app):
    client, _ = app
    sd = call(client, "text2img", model_id="tiny-sd", prompt="x", scheduler="FlowMatchEulerDiscreteScheduler", **SMALL)
    assert sd["http"] == 400 and "is for Flux and SD3 models" in sd["message"], sd
    net = call(client, "controlnet", model_id="flux-tiny", prompt="x", controlnet_model="canny",
               control_image=data_uri(scene(64, 64)), **SMALL)
    assert net["http"] == 400 and "ControlNet is not available for Flux and SD3 models" in net["message"], net
    video = call(client, "text2video", model_id="sd3-tiny", prompt="x", num_frames=2, width=64, height=64)
    assert video["http"] == 400 and "AnimateDiff on SD 1.x" in video["message"], video
    clip_skip = call(client, "text2img", model_id="sd3-tiny", prompt="x", clip_skip=2, **SMALL)
    assert clip_skip["status"] == "success", clip_skip  # diffusers' SD3 pipelines take it
