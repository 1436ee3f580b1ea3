"""ControlNet on the transformer families (issue 19): Flux.1 (text2img, img2img and inpaint with a
hint, several ControlNets at once, union ControlNets' modes), SD3 / SD3.5 and Qwen-Image (text2img
with a hint; inpainting through an inpainting ControlNet), Z-Image (text2img with a hint, inpainting
with a ControlNet made for it). Tiny ControlNets of each family's class
(`tests.model_files.write_transformer_controlnet`) are loaded from diffusers folders, their family
read from their class, listed, and run over HTTP; a ControlNet of another family, and what a
family's ControlNet pipelines do not have, are a 400 naming it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from infra.engine import LOAD_LOCK
from infra.engine.files import tiny
from tests.catalog.test_catalog import call, load
from tests.catalog.test_transformer_families import data_uri, pixels
from tests.conftest import centre_mask, open_client, scene
from tests.model_files import write_controlnet, write_transformer_controlnet

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "samples": 1, "seed": 5}


def build_sd3_two_blocks(folder):
    """tiny-sd3 with two transformer blocks: an SD3 ControlNet steers the blocks before the last
    (the last one only reads the context), and tiny-sd3 has one."""
    tiny.build_from_configs(tiny.TINY_SD3_CONFIGS, folder, overrides={"transformer": {"num_layers": 2}})


FAMILIES = {  # family -> (model id, its builder, the ControlNet's id)
    "flux": ("flux-tiny", tiny.build_tiny_flux, "flux-canny"),
    "sd3": ("sd3-tiny", build_sd3_two_blocks, "sd3-canny"),
    "qwen": ("qwen-tiny", tiny.build_tiny_qwen_image, "qwen-canny"),
    "zimage": ("zimage-tiny", tiny.build_tiny_z_image, "zimage-canny"),
}


def hint(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return data_uri(Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8) * 255).convert("RGB"))


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    """An app with a tiny model and a tiny ControlNet of each family, a second Flux ControlNet and a
    Flux union one, an SD ControlNet, and a Flux Kontext model."""
    root = tmp_path_factory.mktemp("controlnets")
    shutil.copytree(models_dir, root / "models")
    client = open_client(root / "data", root / "models")
    with LOAD_LOCK:
        for family, (model_id, build, net_id) in FAMILIES.items():
            build(root / model_id)
            # (Z-Image's: a Union 2.0-shaped one, which inpaints: hint, masked image and mask latents)
            write_transformer_controlnet(root / model_id, root / net_id, inpainting=family == "zimage")
        for family in ("sd3", "qwen"):  # inpainting ControlNets (the masked image and the mask are their hint)
            write_transformer_controlnet(root / FAMILIES[family][0], root / f"{family}-inpaint", inpainting=True)
        write_transformer_controlnet(root / "flux-tiny", root / "flux-depth", seed=1)
        write_transformer_controlnet(root / "flux-tiny", root / "flux-union", seed=2, num_mode=7)
        write_transformer_controlnet(root / "zimage-tiny", root / "zimage-canny-2", seed=3)  # (hint only: Union 1.0)
        write_controlnet(root / "models" / "tiny-sd", root / "sd-canny")
        tiny.build_tiny_flux(root / "kontext-tiny", kontext=True)
    for model_id, _, _ in FAMILIES.values():
        assert load(client, "load_model", url=str(root / model_id), model_id=model_id)["status"] == "success"
    assert load(client, "load_model", url=str(root / "kontext-tiny"), model_id="kontext-tiny")["status"] == "success"
    for net_id in (*(net for _, _, net in FAMILIES.values()), "flux-depth", "flux-union", "zimage-canny-2", "sd3-inpaint",
                   "qwen-inpaint", "sd-canny"):
        answer = load(client, "load_model_v2", url=str(root / net_id), model_id=net_id, model_category="controlnet")
        assert answer["status"] == "success", answer
    yield client
    client.__exit__(None, None, None)


def test_each_familys_controlnet_is_detected_listed_and_steers_text2img(app):
    client = app
    listed = {m["model_id"]: m for m in call(client, "get_all_models")["models"]}
    for family, (model_id, _, net_id) in FAMILIES.items():
        assert listed[net_id]["category"] == "controlnet" and listed[net_id]["family"] == family, listed[net_id]
        assert listed[model_id]["family"] == family
        body = {"model_id": model_id, "prompt": "a red cube", **SMALL}
        plain = pixels(client, call(client, "text2img", **body))
        steered = call(client, "controlnet", **body, controlnet_model=net_id, control_image=hint(1))
        first = pixels(client, steered)
        assert first.shape == (64, 64, 3) and not np.array_equal(first, plain), family  # the ControlNet acts
        again = pixels(client, call(client, "controlnet", **body, controlnet_model=net_id, control_image=hint(1)))
        assert np.array_equal(first, again), family
        other = pixels(client, call(client, "controlnet", **body, controlnet_model=net_id, control_image=hint(2)))
        assert not np.array_equal(first, other), family  # and so does its hint
        assert steered["meta"]["controlnet_model"] == net_id, steered["meta"]


def test_flux_controlnet_img2img_inpaint_several_nets_and_union_modes(app):
    client = app
    body = {"model_id": "flux-tiny", "prompt": "a bench", **SMALL}
    init, mask = scene(64, 64), centre_mask(64, 64)
    moved = pixels(client, call(client, "controlnet", **body, controlnet_model="flux-canny", control_image=hint(1),
                                init_image=data_uri(init), strength=0.8))
    assert not np.array_equal(moved, np.asarray(init, dtype=np.int16))
    painted = pixels(client, call(client, "controlnet", **body, controlnet_model="flux-canny", control_image=hint(1),
                                  init_image=data_uri(init), mask_image=data_uri(mask), strength=0.9))
    keep, source = np.asarray(mask) == 0, np.asarray(init, dtype=np.int16)
    assert np.array_equal(painted[keep], source[keep]) and not np.array_equal(painted[~keep], source[~keep])
    one = pixels(client, call(client, "controlnet", **body, controlnet_model="flux-canny", control_image=hint(1)))
    both = call(client, "controlnet", **body, controlnet_model="flux-canny,flux-depth", control_image=hint(1),
                controlnet_conditioning_scale=[1.0, 0.8])
    assert not np.array_equal(pixels(client, both), one)
    # a union ControlNet runs the hint in the mode its controlnet_type names
    canny = pixels(client, call(client, "controlnet", **body, controlnet_model="flux-union", controlnet_type="canny",
                                control_image=hint(1)))
    depth = pixels(client, call(client, "controlnet", **body, controlnet_model="flux-union", controlnet_type="depth",
                                control_image=hint(1)))
    assert not np.array_equal(canny, depth)
    unknown = call(client, "controlnet", **body, controlnet_model="flux-union", controlnet_type="scribble",
                   control_image=hint(1))
    assert unknown["status"] in ("error", "failed") and "not a mode of the union ControlNet" in str(unknown), unknown


def test_z_image_controlnet_inpaint_keeps_the_unmasked_pixels(app):
    client = app
    init, mask = scene(64, 64), centre_mask(64, 64)
    painted = pixels(client, call(client, "controlnet", model_id="zimage-tiny", prompt="a cat", **SMALL,
                                  controlnet_model="zimage-canny", control_image=hint(1), init_image=data_uri(init),
                                  mask_image=data_uri(mask)))
    keep, source = np.asarray(mask) == 0, np.asarray(init, dtype=np.int16)
    assert np.array_equal(painted[keep], source[keep]) and not np.array_equal(painted[~keep], source[~keep])
    # a Union 1.0-shaped one (hint latents only) cannot inpaint: the job fails saying which one can
    hint_only = call(client, "controlnet", model_id="zimage-tiny", prompt="a cat", **SMALL,
                     controlnet_model="zimage-canny-2", control_image=hint(1), init_image=data_uri(init),
                     mask_image=data_uri(mask))
    assert hint_only["status"] in ("error", "failed") and "Union-2.0" in str(hint_only), hint_only
    # ...and text2img with a hint works on both
    for net_id in ("zimage-canny", "zimage-canny-2"):
        assert call(client, "controlnet", model_id="zimage-tiny", prompt="x", **SMALL, controlnet_model=net_id,
                    control_image=hint(1))["status"] == "success"


@pytest.mark.parametrize("family", ["sd3", "qwen"])
def test_sd3_and_qwen_image_inpaint_through_an_inpainting_controlnet_only(app, family):
    client = app
    model_id = FAMILIES[family][0]
    init, mask = scene(64, 64), centre_mask(64, 64)
    body = {"model_id": model_id, "prompt": "a cat", **SMALL, "init_image": data_uri(init), "mask_image": data_uri(mask)}
    result = call(client, "controlnet", **body, controlnet_model=f"{family}-inpaint", control_image=hint(1))
    painted = pixels(client, result)
    keep, source = np.asarray(mask) == 0, np.asarray(init, dtype=np.int16)
    assert np.array_equal(painted[keep], source[keep]) and not np.array_equal(painted[~keep], source[~keep])
    assert "control_image was not used" in " ".join(result["meta"]["notes"]), result["meta"]
    again = call(client, "controlnet", **body, controlnet_model=f"{family}-inpaint")
    assert np.array_equal(pixels(client, again), painted) and "notes" not in again["meta"]
    # a hint ControlNet cannot inpaint, and an inpainting one needs the image and mask
    hint_only = call(client, "controlnet", **body, controlnet_model=f"{family}-canny", control_image=hint(1))
    assert hint_only["status"] in ("error", "failed") and "reads a hint only" in str(hint_only), hint_only
    text = call(client, "controlnet", model_id=model_id, prompt="x", **SMALL, controlnet_model=f"{family}-inpaint",
                control_image=hint(1))
    assert text["status"] in ("error", "failed") and "is an inpainting ControlNet" in str(text), text


@pytest.mark.parametrize(("body", "says"), [
    ({"model_id": "sd3-tiny", "controlnet_model": "flux-canny"}, "flux-canny was made for a Flux model; sd3-tiny is an SD3 model"),
    ({"model_id": "flux-tiny", "controlnet_model": "sd-canny"}, "sd-canny was made for a Stable Diffusion model"),
    ({"model_id": "tiny-sd", "controlnet_model": "qwen-canny"}, "qwen-canny was made for a Qwen-Image model"),
    ({"model_id": "flux-tiny", "controlnet_model": "flux-canny,qwen-canny"}, "qwen-canny was made for a Qwen-Image model; flux-tiny is a Flux"),
    ({"model_id": "kontext-tiny", "controlnet_model": "flux-canny"}, "ControlNet is not available for kontext-tiny"),
    ({"model_id": "sd3-tiny", "controlnet_model": "sd3-canny", "init_image": "scene"}, "ControlNet img2img is available for Flux models; sd3-tiny is an SD3 model"),
    ({"model_id": "qwen-tiny", "controlnet_model": "qwen-canny", "init_image": "scene"},
     "ControlNet img2img is available for Flux models; qwen-tiny is a Qwen-Image model"),
    ({"model_id": "sd3-tiny", "controlnet_model": "sd3-inpaint,sd3-canny", "init_image": "scene", "mask_image": "mask"},
     "SD3 models take (to inpaint) one ControlNet at a time"),
    ({"model_id": "zimage-tiny", "controlnet_model": "zimage-canny", "init_image": "scene"}, "ControlNet img2img"),
])
def test_a_controlnet_of_another_family_or_a_missing_pipeline_is_a_400(app, body, says):
    images = {"scene": data_uri(scene(64, 64)), "mask": data_uri(centre_mask(64, 64))}
    body = {key: images.get(value, value) for key, value in body.items()}
    answer = call(app, "controlnet", prompt="x", control_image=hint(1), **SMALL, **body)
    assert answer["http"] == 400 and says in answer["message"], answer


def test_z_image_takes_one_controlnet_and_flux_notes_guess_mode(app):
    two = call(app, "controlnet", model_id="zimage-tiny", prompt="x", control_image=hint(1), **SMALL,
               controlnet_model="zimage-canny,zimage-canny-2")
    assert two["http"] == 400 and "Z-Image models take one ControlNet at a time" in two["message"], two
    guessed = call(app, "controlnet", model_id="flux-tiny", prompt="x", control_image=hint(1), **SMALL,
                   controlnet_model="flux-canny", guess_mode="yes")
    assert guessed["status"] == "success" and "guess_mode was not used" in " ".join(guessed["meta"]["notes"]), guessed
