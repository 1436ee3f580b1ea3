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
from tests.conftest import KEY, centre_mask, open_client, png_bytes, scene

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
    ("sd3-tiny", {"embeddings_model": "easyneg"}, "embeddings_model does not apply to SD3 models"),
    ("sd3-tiny", {"panorama": "yes"}, "panorama is available for SD 1.x/2.x models only"),
])
def test_what_a_family_cannot_do_is_a_400_naming_it(app, model_id, body, says):
    client, _ = app
    answer = call(client, "text2img", model_id=model_id, prompt="x", **SMALL, **body)
    assert answer["http"] == 400 and says in answer["message"], answer


def test_flow_matching_schedulers_are_refused_on_sd_models_and_video_on_the_families(app):
    """(ControlNet on the families: tests/catalog/test_family_controlnets.py)"""
    client, _ = app
    sd = call(client, "text2img", model_id="tiny-sd", prompt="x", scheduler="FlowMatchEulerDiscreteScheduler", **SMALL)
    assert sd["http"] == 400 and "is for Flux, SD3 and the other flow-matching models" in sd["message"], sd
    video = call(client, "text2video", model_id="sd3-tiny", prompt="x", num_frames=2, width=64, height=64)
    assert video["http"] == 400 and "AnimateDiff on SD 1.x" in video["message"], video
    clip_skip = call(client, "text2img", model_id="sd3-tiny", prompt="x", clip_skip=2, **SMALL)
    assert clip_skip["status"] == "success", clip_skip  # diffusers' SD3 pipelines take it


def test_loras_on_flux_and_sd3_change_the_image_leave_no_trace_and_fit_their_family_only(app):
    """LoRAs in diffusers' format (Flux, SD3) and kohya's (Flux: fused qkv, lora_down/up, alpha) apply
    per request; a LoRA of another family is a 400 before any job exists."""
    from infra.engine.files.tiny import build_tiny_pipeline
    from tests.model_files import write_lora, write_transformer_lora

    client, root = app
    with LOAD_LOCK:
        build_tiny_pipeline(root / "sd")
        write_lora(root / "sd", root / "sd-lora.safetensors", seed=1)
        for name, family, fmt in (("flux-lora", "flux", "diffusers"), ("flux-kohya", "flux", "kohya"),
                                  ("sd3-lora", "sd3", "diffusers")):
            write_transformer_lora(root / family, root / f"{name}.safetensors", fmt, seed=len(name))
    for name in ("sd-lora", "flux-lora", "flux-kohya", "sd3-lora"):
        answer = load(client, "load_model_v2", url=str(root / f"{name}.safetensors"), model_id=name, model_category="lora")
        assert answer["status"] == "success", answer
    for family, loras in (("flux", ("flux-lora", "flux-kohya")), ("sd3", ("sd3-lora",))):
        body = {"model_id": FAMILIES[family][0], "prompt": "a red cube", "seed": 5, **SMALL}
        base = pixels(client, call(client, "text2img", **body))
        for lora_id in loras:
            assert not np.array_equal(pixels(client, call(client, "text2img", **body, lora_model=lora_id)), base), lora_id
        assert np.array_equal(pixels(client, call(client, "text2img", **body)), base)  # nothing left behind
    for model_id, lora_id, says in (("flux-tiny", "sd-lora", "was made for a Stable Diffusion model"),
                                    ("sd3-tiny", "flux-kohya", "was made for a Flux model"),
                                    ("tiny-sd", "sd3-lora", "was made for a Flux or SD3 model")):
        answer = call(client, "text2img", model_id=model_id, prompt="x", lora_model=lora_id, **SMALL)
        assert answer["http"] == 400 and says in answer["message"], answer


def family_route(client, path: str, **body) -> dict:
    response = client.post(f"/api/v1/enterprise/{path}", json={"key": KEY, **body})
    return {"http": response.status_code, **response.json()}


def test_kontext_edits_fill_inpaints_and_the_model_family_routes_run_them(app):
    """A Kontext model edits on img2img (one image, or two side by side; strength is not used); a Fill
    model inpaints keeping the unmasked pixels and is refused elsewhere; the enterprise family routes
    (flux/, flux_kontext_dev/, ...) name no model: they run the first loaded model of their category."""
    client, root = app
    with LOAD_LOCK:
        build_tiny_flux(root / "kontext", kontext=True)
        build_tiny_flux(root / "fill", fill=True)
    for name, category in (("kontext", "flux_kontext"), ("fill", "flux_fill")):  # claiming the family is enough
        answer = load(client, "load_model_v2", url=str(root / name), model_id=f"{name}-tiny", model_category="flux")
        assert answer["status"] == "success" and answer["category"] == category, answer
    one, two = data_uri(scene(64, 64)), data_uri(scene(32, 64).rotate(180))
    edit = {"prompt": "the bench in red", "init_image": one, "seed": 2, **SMALL}
    alone = family_route(client, "flux_kontext_dev/img2img", **edit, strength=0.5)
    assert alone["meta"]["model_id"] == "kontext-tiny" and "strength was not used" in " ".join(alone["meta"]["notes"])
    combined = family_route(client, "flux_kontext_dev/img2img", **edit, init_image_2=two)
    a, b = pixels(client, alone), pixels(client, combined)
    assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)  # the output keeps the first image's size
    assert np.array_equal(pixels(client, family_route(client, "flux_kontext_dev/img2img", **edit)), a)
    refused = call(client, "img2img", model_id="flux-tiny", init_image_2=two, **edit)
    assert refused["http"] == 400 and "init_image_2 is for editing models" in refused["message"], refused

    init, mask = scene(64, 64), centre_mask(64, 64)
    painted = pixels(client, call(client, "inpaint", model_id="fill-tiny", prompt="a cat", init_image=data_uri(init),
                                  mask_image=data_uri(mask), seed=7, **SMALL))
    keep = np.asarray(mask) == 0
    assert np.array_equal(painted[keep], np.asarray(init, dtype=np.int16)[keep])
    assert not np.array_equal(painted[~keep], np.asarray(init, dtype=np.int16)[~keep])
    fill_t2i = call(client, "text2img", model_id="fill-tiny", prompt="x", **SMALL)
    assert fill_t2i["http"] == 400 and "inpainting model" in fill_t2i["message"], fill_t2i
    # with a Fill model loaded, the base Flux.1 models inpaint through it (SDAPI_FLUX_INPAINT_WITH_FILL)
    through_fill = call(client, "inpaint", model_id="flux-tiny", prompt="a cat", init_image=data_uri(init),
                        mask_image=data_uri(mask), seed=7, **SMALL)
    assert through_fill["meta"]["model_id"] == "fill-tiny", through_fill["meta"]
    assert "inpainted by the Flux.1 Fill model fill-tiny, not flux-tiny" in " ".join(through_fill["meta"]["notes"])
    assert np.array_equal(pixels(client, through_fill), painted)

    text = family_route(client, "flux/text2img", prompt="a red cube", **SMALL)
    assert text["status"] == "success" and text["meta"]["model_id"] == "flux-tiny", text
    wrong = family_route(client, "flux_kontext_dev/img2img", **edit, model_id="flux-tiny")
    assert wrong["http"] == 400 and "this route runs Flux.1 Kontext models" in wrong["message"], wrong
    bad_type = family_route(client, "flux/text2img", prompt="x", deploy_type="flux_3", **SMALL)
    assert bad_type["http"] == 400 and "flux_2_dev" in bad_type["tip"], bad_type


def test_a_flux_transformer_file_loads_over_http_on_a_loaded_base_model(app):
    """A transformer-only Flux file (BFL's keys) takes the rest of its pipeline from a loaded Flux
    model: the one named in base_model, else the first loaded; a base of another family is a 400."""
    from safetensors.torch import load_file, save_file

    from tests.catalog.test_family_single_files import flux_to_bfl

    client, root = app
    with LOAD_LOCK:
        build_tiny_flux(root / "flux-b", seed=9)
    state = load_file(root / "flux-b" / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(flux_to_bfl(state), root / "flux1-tiny.safetensors")
    answer = load(client, "load_model_v2", url=str(root / "flux1-tiny.safetensors"), model_id="flux-file",
                  model_category="flux")
    assert answer["status"] == "success" and answer["category"] == "flux", answer
    body = {"prompt": "a red cube", "seed": 3, **SMALL}
    from_file = pixels(client, call(client, "text2img", model_id="flux-file", **body))
    assert not np.array_equal(from_file, pixels(client, call(client, "text2img", model_id="flux-tiny", **body)))
    wrong = call(client, "load_model_v2", url=str(root / "flux1-tiny.safetensors"), model_id="flux-file-2",
                 model_category="flux", base_model="sd3-tiny")
    assert wrong["http"] == 400 and "base_model sd3-tiny is not a flux model" in wrong["message"], wrong


def test_the_memory_settings_apply_where_a_model_loads_and_system_details_reports_them(app, models_dir, tmp_path):
    """SDAPI_TEXT_ENCODER_OFFLOAD=offload streams Flux's T5 from CPU memory (the same image as kept),
    SDAPI_QUANTIZATION=int8 quantizes its transformer through torchao (an image close to the plain
    one); system_details says per loaded model what was applied, and an SD model gets neither."""
    client, root = app
    body = {"model_id": "flux-tiny", "prompt": "a red cube", "seed": 3, **SMALL}
    plain = pixels(client, call(client, "text2img", **body))
    for settings in ({"text_encoder_offload": "offload"}, {"text_encoder_offload": "offload", "quantization": "int8"}):
        models = tmp_path / "-".join(settings.values())
        shutil.copytree(models_dir, models)
        other = open_client(models.with_suffix(".data"), models, **settings)
        try:
            assert load(other, "load_model_v2", url=str(root / "flux"), model_id="flux-tiny", model_category="flux",
                        model_format="diffusers")["status"] == "success"
            image = pixels(other, call(other, "text2img", **body))
            assert pixels(other, call(other, "text2img", **{**body, "model_id": "tiny-sd"})).shape == (64, 64, 3)
            memory = call(other, "system_details")["memory"]
        finally:
            other.__exit__(None, None, None)
        assert memory["settings"]["text_encoder_offload"] == "offload"
        report, sd = memory["models"]["flux-tiny"], memory["models"]["tiny-sd"]
        assert report["text_encoders_offloaded"] == ["text_encoder_2"] and report["dtype"] == "float32", report
        assert sd["text_encoders_offloaded"] == [] and sd["quantization"] == "none", sd
        if "quantization" in settings:
            assert report["quantization"] == "int8", report
            assert 0 < np.abs(image - plain).mean() < 4, np.abs(image - plain).mean()  # (0..255)
        else:
            assert report["quantization"] == "none" and np.array_equal(image, plain)


# --------------------------------------------------------------------------- Qwen-Image, Z-Image, Flux.2

NEWER = {  # model id -> (builder, its keyword arguments, the category detected from the weights)
    "qwen-tiny": ("build_tiny_qwen_image", {}, "qwen"),
    "qwen-edit-tiny": ("build_tiny_qwen_image", {"edit": True}, "qwen_edit"),
    "zimage-tiny": ("build_tiny_z_image", {}, "zimage"),
    "flux2-tiny": ("build_tiny_flux2", {}, "flux2"),
    "klein-tiny": ("build_tiny_flux2_klein", {}, "flux2_klein"),
}


@pytest.fixture(scope="module")
def newer(app):
    from infra.engine.files import tiny

    client, root = app
    for model_id, (builder, options, category) in NEWER.items():
        with LOAD_LOCK:
            getattr(tiny, builder)(root / model_id, **options)
        answer = load(client, "load_model", url=str(root / model_id), model_id=model_id)  # family from the weights
        assert answer["status"] == "success" and answer["category"] == category, answer
    return client


@pytest.mark.parametrize(("model_id", "tasks"), [
    ("qwen-tiny", ("text2img", "img2img", "inpaint")),
    ("qwen-edit-tiny", ("edit", "inpaint")),
    ("zimage-tiny", ("text2img", "img2img", "inpaint")),
    ("flux2-tiny", ("text2img", "edit")),
    ("klein-tiny", ("text2img", "edit", "inpaint")),
])
def test_qwen_image_z_image_and_flux2_run_every_endpoint_their_pipelines_have(newer, model_id, tasks):
    client = newer
    init, mask = scene(64, 64), centre_mask(64, 64)
    body = {"model_id": model_id, "prompt": "a red cube", "seed": 4, **SMALL}
    for task in tasks:
        if task == "text2img":
            first, again = (pixels(client, call(client, "text2img", **body)) for _ in range(2))
            assert first.shape == (64, 64, 3) and np.array_equal(first, again)
            assert not np.array_equal(first, pixels(client, call(client, "text2img", **{**body, "seed": 5})))
        elif task in ("img2img", "edit"):
            result = call(client, "img2img", **body, init_image=data_uri(init), strength=0.8)
            assert pixels(client, result).shape == (64, 64, 3)
            assert ("strength was not used" in " ".join(result["meta"].get("notes", []))) == (task == "edit")
        else:
            painted = pixels(client, call(client, "inpaint", **body, init_image=data_uri(init), mask_image=data_uri(mask)))
            keep = np.asarray(mask) == 0
            assert np.array_equal(painted[keep], np.asarray(init, dtype=np.int16)[keep])


def test_the_newer_families_routes_defaults_and_refusals(newer):
    client = newer
    init = data_uri(scene(64, 64))
    qwen = family_route(client, "qwen/text2img", prompt="a red cube", **SMALL)
    assert qwen["meta"]["model_id"] == "qwen-tiny" and qwen["meta"]["guidance_scale"] == 4.0, qwen
    turbo = family_route(client, "z_image_turbo/text2img", prompt="a red cube", width=64, height=64)
    assert turbo["status"] == "success" and (turbo["meta"]["steps"], turbo["meta"]["guidance_scale"]) == (9, 0.0), turbo
    dev = family_route(client, "flux/img2img", deploy_type="flux_2_dev", prompt="the cube in blue",
                       init_image=[init, data_uri(scene(64, 96))], **SMALL)
    assert dev["status"] == "success" and dev["meta"]["model_id"] == "flux2-tiny", dev
    small = family_route(client, "flux/img2img", deploy_type="flux_2_dev", prompt="x",
                         init_image=[init, data_uri(scene(32, 64))], **SMALL)
    assert small["http"] == 400 and "at least 64x64" in small["message"], small
    klein = family_route(client, "flux_klein/img2img", prompt="the cube in blue", init_image=[init], **SMALL)
    assert klein["status"] == "success" and klein["meta"]["model_id"] == "klein-tiny", klein
    too_many = family_route(client, "flux_klein/img2img", prompt="x", init_image=[init] * 5, **SMALL)
    assert too_many["http"] == 400 and "(Flux.2 Klein) takes at most 4" in too_many["message"], too_many
    dev_too_many = family_route(client, "flux/img2img", deploy_type="flux_2_dev", prompt="x", init_image=[init] * 11,
                                **SMALL)
    assert dev_too_many["http"] == 400 and "(Flux.2 dev) takes at most 10" in dev_too_many["message"], dev_too_many
    kontext_many = call(client, "img2img", model_id="qwen-edit-tiny", prompt="x", init_image=init,
                        reference_images=[init], **SMALL)
    assert kontext_many["http"] == 400 and "reference_images are for Flux.2" in kontext_many["message"]
    no_inpaint = call(client, "inpaint", model_id="flux2-tiny", prompt="x", init_image=init,
                      mask_image=data_uri(centre_mask(64, 64)), **SMALL)
    assert no_inpaint["http"] == 400 and "no Flux.2 dev inpainting" in no_inpaint["message"], no_inpaint
    for model_id in ("flux2-tiny", "qwen-edit-tiny"):  # (diffusers has no ControlNet pipeline for them)
        net = call(client, "controlnet", model_id=model_id, prompt="x", controlnet_model="canny", control_image=init, **SMALL)
        assert net["http"] == 400 and f"ControlNet is not available for {model_id}" in net["message"], net
    for model_id in ("qwen-tiny", "zimage-tiny", "klein-tiny"):
        refused = call(client, "text2img", model_id=model_id, prompt="x", clip_skip=2, **SMALL)
        assert refused["http"] == 400 and "clip_skip does not apply" in refused["message"], refused


def test_flux2_takes_every_reference_image_as_its_own(newer):
    """Flux.2's reference images go to its pipeline as a list (not combined into one picture): each
    one changes the edit, in the order sent, on the family route and on img2img alike."""
    client = newer
    refs = [data_uri(scene(64, 64)), data_uri(scene(96, 64)), data_uri(Image.new("RGB", (64, 64), "red")),
            data_uri(Image.new("RGB", (64, 80), "blue"))]
    body = {"prompt": "the cube in blue", **SMALL, "seed": 2}
    images = {}
    for count in (1, 2, 3, 4):
        result = call(client, "img2img", model_id="klein-tiny", init_image=refs[0], reference_images=refs[1:count], **body)
        images[count] = pixels(client, result)
        assert images[count].shape == (64, 64, 3)
    assert all(not np.array_equal(images[a], images[b]) for a, b in ((1, 2), (2, 3), (3, 4)))
    routed = family_route(client, "flux_klein/img2img", init_image=refs[:3], **body)
    assert np.array_equal(pixels(client, routed), images[3])
    swapped = call(client, "img2img", model_id="klein-tiny", init_image=refs[0], reference_images=[refs[2], refs[1]], **body)
    assert not np.array_equal(pixels(client, swapped), images[3])
    dev = call(client, "img2img", model_id="flux2-tiny", init_image=refs[0], reference_images=refs[1:], **body)
    assert dev["status"] == "success", dev
