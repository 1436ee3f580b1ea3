"""The model catalog end to end: tiny files of every kind are written, served from a loopback
HTTP server (or given as local paths), loaded through the endpoints, polled until ready, used in
generation, and removed again."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.engine import LOAD_LOCK
from infra.engine.files.tiny import build_tiny_sdxl
from infra.jobs.params import Lora
from tests.conftest import KEY, _Files, centre_mask, generation_params, open_client, png_bytes, scene
from tests.model_files import (
    write_controlnet,
    write_depth_estimator,
    write_embedding,
    write_lora,
    write_single_file_checkpoint,
    write_single_file_sdxl_checkpoint,
    write_vae,
)

API = "/api/v1/enterprise"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 3, "seed": 7, "enhance_prompt": "no", "tomesd": "no"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory, models_dir):
    """Every kind of tiny model file, in a folder served over loopback HTTP."""
    with LOAD_LOCK:  # the servers' workers may be loading models meanwhile
        root = _write_files(tmp_path_factory.mktemp("model-files"), models_dir)
    handler = lambda *a, **kw: _Files(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "root": root}
    server.shutdown()


def _write_files(root: Path, models_dir: Path) -> Path:
    base = models_dir / "tiny-sd"
    write_single_file_checkpoint(base, root / "tiny.safetensors", "safetensors")
    write_single_file_checkpoint(base, root / "tiny.ckpt", "ckpt")
    write_single_file_checkpoint(models_dir / "tiny-sd-inpaint", root / "tiny-inpaint.safetensors", "safetensors")
    write_lora(base, root / "style_a.safetensors", "diffusers", seed=1)
    write_lora(base, root / "style_b.safetensors", "kohya", seed=2)
    write_embedding(root / "emb.safetensors", "safetensors", seed=3)
    write_embedding(root / "emb_a1111.pt", "a1111_pt", seed=4, vectors=2)
    write_embedding(root / "emb_diffusers.bin", "diffusers", seed=5)
    write_vae(base, root / "vae.safetensors", "single_file", seed=6)
    write_vae(base, root / "vae_ldm.safetensors", "ldm_single_file", seed=7)
    write_vae(base, root / "vae_folder", "diffusers_folder", seed=8)
    write_controlnet(base, root / "cn.safetensors", "single_file", seed=9)
    write_controlnet(base, root / "cn2.safetensors", "single_file", seed=10)
    write_controlnet(base, root / "cn_folder", "diffusers_folder", seed=11)
    build_tiny_sdxl(root / "tiny-sdxl")
    build_tiny_sdxl(root / "tiny-sdxl-inpaint", inpaint=True)
    write_single_file_sdxl_checkpoint(root / "tiny-sdxl", root / "tiny-sdxl.safetensors")
    write_lora(root / "tiny-sdxl", root / "sdxl_style.safetensors", "diffusers", seed=12)
    full = (root / "tiny.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(full[: len(full) // 2])
    (root / "notes.safetensors").write_bytes(b"this is not a checkpoint at all" * 10)
    (root / "hint.png").write_bytes(png_bytes(scene(64, 64)))
    (root / "hint2.png").write_bytes(png_bytes(scene(64, 64).rotate(90)))
    (root / "mask.png").write_bytes(png_bytes(centre_mask(64, 64)))
    return root


@pytest.fixture(scope="module")
def catalog(models_dir, tmp_path_factory):
    """An app with its own copy of the built-in models (loads here must not leak elsewhere)."""
    own_models = tmp_path_factory.mktemp("catalog") / "models"
    shutil.copytree(models_dir, own_models)
    client = open_client(tmp_path_factory.mktemp("catalog-data"), own_models, workers=2)
    yield client
    client.__exit__(None, None, None)


def call(client, endpoint: str, **body) -> dict:
    response = client.post(f"{API}/{endpoint}", json={"key": KEY, **body})
    return {"http": response.status_code, **response.json()}


def wait_loaded(client, model_id: str, timeout: float = 120) -> dict:
    """Poll verify_model until the load has ended; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = call(client, "verify_model", model_id=model_id)
        if answer["status"] != "processing" or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def load(client, endpoint: str = "load_model", **body) -> dict:
    started = call(client, endpoint, **body)
    assert started["http"] == 200 and started["status"] == "success", started
    model_id = body.get("model_id") or body.get("vae_id")
    return wait_loaded(client, model_id)


def image_of(client, endpoint: str = "text2img", **body) -> np.ndarray:
    result = call(client, endpoint, **{"prompt": "a red bench", **SMALL, **body})
    assert result["status"] == "success", result
    response = client.get(result["output"][0])
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a - b).max()) > 8


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a - b).max()) <= 1  # a float rounding step at most


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.ckpt"])
def test_single_file_checkpoint_is_converted_and_generates_like_the_original(catalog, files, name):
    model_id = "ckpt-" + name.replace(".", "-")
    answer = load(catalog, url=f"{files['url']}/{name}", model_id=model_id, model_type="custom_ckpt")
    assert answer["status"] == "success", answer
    assert answer["category"] == "stable_diffusion"
    listed = {m["model_id"]: m for m in call(catalog, "get_all_models")["models"]}
    assert listed[model_id]["status"] == "ready"
    time.strptime(listed[model_id]["load_data"], "%m/%d/%Y %H:%M:%S")
    # the checkpoint holds tiny-sd's weights: converted back, it renders the same image
    assert same(image_of(catalog, model_id=model_id), image_of(catalog, model_id="tiny-sd"))


def test_inpainting_checkpoint_is_detected_and_serves_inpaint(catalog, files):
    answer = load(catalog, url=f"{files['url']}/tiny-inpaint.safetensors", model_id="ckpt-inpaint", model_type="custom_ckpt")
    assert answer["category"] == "inpaint"
    result = call(catalog, "inpaint", model_id="ckpt-inpaint", prompt="x", init_image=f"{files['url']}/hint.png",
                  mask_image=f"{files['url']}/mask.png", **SMALL)
    assert result["status"] == "success", result
    refused = call(catalog, "text2img", model_id="ckpt-inpaint", prompt="x")
    assert refused["http"] == 400 and "inpainting model" in refused["message"]


@pytest.fixture(scope="module")
def sdxl(catalog, files) -> str:
    """The tiny SDXL model, loaded from a local diffusers folder as "xl"."""
    answer = load(catalog, "load_model_v2", url=str(files["root"] / "tiny-sdxl"), model_id="xl",
                  model_category="stable_diffusion_xl", model_format="diffusers")
    assert answer["category"] == "stable_diffusion_xl"
    return "xl"


def test_sdxl_family_runs_text2img_img2img_inpaint_and_single_file(catalog, files, sdxl):
    root = files["root"]
    assert load(catalog, "load_model_v2", url=str(root / "tiny-sdxl-inpaint"), model_id="xl-inpaint",
                model_category="stable_diffusion_xl", model_format="diffusers")["category"] == "inpaint"
    hint, mask = f"{files['url']}/hint.png", f"{files['url']}/mask.png"
    t2i = image_of(catalog, model_id="xl")
    assert t2i.shape == (64, 64, 3)
    assert image_of(catalog, "img2img", model_id="xl", init_image=hint, strength=0.7).shape == (64, 64, 3)
    inpainted = image_of(catalog, "inpaint", model_id="xl-inpaint", init_image=hint, mask_image=mask)
    keep = np.asarray(centre_mask(64, 64)) == 0
    original = np.asarray(scene(64, 64), dtype=np.int16)
    assert np.array_equal(inpainted[keep], original[keep])  # unmasked pixels untouched
    # the same weights as one Stability-layout file: detected as SDXL, converted, identical output
    answer = load(catalog, url=f"{files['url']}/tiny-sdxl.safetensors", model_id="xl-file", model_type="custom_ckpt")
    assert answer["category"] == "stable_diffusion_xl", answer
    assert same(image_of(catalog, model_id="xl-file"), t2i)
    refused = call(catalog, "text2img", model_id="xl", prompt="x", panorama="yes")
    assert refused["http"] == 400 and "SDXL" in refused["message"]


def test_fp16_revision_stores_half_precision_weights(catalog, files):
    load(catalog, "load_model_v2", url=f"{files['url']}/tiny.safetensors", model_id="half", model_category="stable_diffusion",
         model_format="safetensors", revision="fp16")
    weights = catalog.app.state.runtime.weights
    assert weights.get("half").precision == "fp16"
    from safetensors import safe_open

    with safe_open(weights.folder("half") / "unet" / "diffusion_pytorch_model.safetensors", "pt") as unet:
        assert unet.get_tensor(next(iter(unet.keys()))).dtype.itemsize == 2
    assert image_of(catalog, model_id="half").shape == (64, 64, 3)


def test_load_model_v2_takes_the_docs_examples_with_v1s_model_type(catalog, files):
    """Examples in ModelsLab's docs send load_model_v2 v1's `model_type` and no `model_category` or
    `model_format`: the type is read as load_model reads it, the format from the file."""
    answer = load(catalog, "load_model_v2", url=f"{files['url']}/tiny.safetensors", model_id="by-type",
                  model_type="custom_ckpt")
    assert answer["category"] == "stable_diffusion", answer
    assert image_of(catalog, model_id="by-type").shape == (64, 64, 3)
    neither = call(catalog, "load_model_v2", url=f"{files['url']}/tiny.safetensors", model_id="unsaid")
    assert neither["http"] == 422 and "model_category" in str(neither["message"])


def test_a_load_without_revision_takes_the_store_precision_and_loads_back_exactly(catalog, files):
    """Without `revision` the store keeps SDAPI_STORE_PRECISION: `auto` is fp32 on this CPU-only
    machine; `fp16` (what the Modal deployment sets) keeps every weight rounded to fp16, and the
    engine loads exactly those weights. `revision` wins over the setting."""
    import torch
    from safetensors.torch import load_file

    runtime = catalog.app.state.runtime
    weights = runtime.weights
    source = dict(url=f"{files['url']}/tiny.safetensors", model_category="stable_diffusion", model_format="safetensors")
    assert runtime.settings.store_precision == "auto" and not torch.cuda.is_available()
    load(catalog, "load_model_v2", model_id="auto-precision", **source)
    assert weights.get("auto-precision").precision == "fp32"
    runtime.settings.store_precision = "fp16"
    try:
        load(catalog, "load_model_v2", model_id="default-precision", **source)
        load(catalog, "load_model_v2", model_id="full-precision", revision="fp32", **source)
    finally:
        runtime.settings.store_precision = "auto"
    assert weights.get("default-precision").precision == "fp16"
    assert weights.get("full-precision").precision == "fp32"
    half, full = weights.folder("default-precision"), weights.folder("full-precision")
    for component in ("unet", "vae", "text_encoder"):
        [stored] = (half / component).glob("*.safetensors")
        [source] = (full / component).glob("*.safetensors")
        stored_state, source_state = load_file(stored), load_file(source)
        assert stored_state.keys() == source_state.keys()
        assert all(t.dtype == torch.float16 for t in stored_state.values() if t.is_floating_point())
        assert all(torch.equal(stored_state[k], source_state[k].half()) for k in stored_state)
    assert image_of(catalog, model_id="default-precision").shape == (64, 64, 3)
    model = runtime.dispatcher.engine().cache.model("default-precision")  # what the engine loaded
    [stored] = (half / "unet").glob("*.safetensors")
    loaded = model.pipeline.unet.state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in load_file(stored).items())


# --------------------------------------------------------------------------- adapters


def test_loras_in_both_formats_apply_per_request_and_leave_no_trace(catalog, files):
    for name, lora_id in (("style_a.safetensors", "lora-a"), ("style_b.safetensors", "lora-b")):
        assert load(catalog, url=f"{files['url']}/{name}", model_id=lora_id, model_type="lora")["status"] == "success"
    base = image_of(catalog)
    with_a = image_of(catalog, lora_model="lora-a")
    with_b = image_of(catalog, lora_model="lora-b")
    assert differs(with_a, base) and differs(with_b, base) and differs(with_a, with_b)
    assert differs(image_of(catalog, lora_model="lora-a", lora_strength="0.3"), with_a)
    both = image_of(catalog, lora_model="lora-a,lora-b", lora_strength="1,0.5")
    assert differs(both, with_a) and differs(both, with_b)
    assert same(image_of(catalog, lora_model="lora-a"), with_a)  # strengths are set per request
    assert same(image_of(catalog), base)  # a request without LoRAs gets the base model's output
    # a LoRA loaded after that request (adapters switched off) is switched on for its own request
    load(catalog, url=f"{files['url']}/style_a.safetensors", model_id="lora-a-again", model_type="lora")
    assert same(image_of(catalog, lora_model="lora-a-again"), with_a)
    meta = call(catalog, "text2img", prompt="x", lora_model="lora-a,lora-b", lora_strength="0.4", **SMALL)["meta"]
    assert meta["lora"] == "lora-a,lora-b" and meta["lora_strength"] == "0.4,0.4"
    # an SDXL LoRA on an SD model is refused before a job exists
    load(catalog, url=f"{files['url']}/sdxl_style.safetensors", model_id="lora-xl", model_type="lora")
    refused = call(catalog, "text2img", prompt="x", lora_model="lora-xl")
    assert refused["http"] == 400 and "was made for a model with" in refused["message"]


@pytest.mark.parametrize("name", ["emb.safetensors", "emb_a1111.pt", "emb_diffusers.bin"])
def test_embeddings_act_where_their_token_is_and_are_unloaded_after(catalog, files, name):
    emb_id = "emb-" + name.split(".")[0].replace("_", "-")
    assert load(catalog, url=f"{files['url']}/{name}", model_id=emb_id, model_type="embeddings")["status"] == "success"
    base = image_of(catalog, prompt=f"a red bench {emb_id}")
    with_embedding = image_of(catalog, prompt=f"a red bench {emb_id}", embeddings_model=emb_id)
    assert differs(with_embedding, base)
    assert same(image_of(catalog, prompt=f"a red bench {emb_id}"), base)
    again = image_of(catalog, prompt=f"a red bench {emb_id}", embeddings_model=emb_id)  # unloaded cleanly: loads again
    assert same(again, with_embedding)


@pytest.mark.parametrize("source", ["vae.safetensors", "vae_ldm.safetensors", "vae_folder"])
def test_vae_is_swapped_per_request(catalog, files, source):
    vae_id = "vae-" + source.split(".")[0].replace("_", "-")
    url = str(files["root"] / source) if source.endswith("folder") else f"{files['url']}/{source}"
    answer = load(catalog, "load_vae", vae_id=vae_id, vae_url=url, vae_type="safetensors")
    assert answer["status"] == "success", answer
    base = image_of(catalog)
    assert differs(image_of(catalog, vae=vae_id), base)
    assert same(image_of(catalog), base)


def test_clip_skip_and_tomesd_change_the_output_only_while_asked(catalog):
    base = image_of(catalog)
    assert same(image_of(catalog, clip_skip=1), base)
    assert differs(image_of(catalog, clip_skip=2), base)
    assert differs(image_of(catalog, clip_skip=8), image_of(catalog, clip_skip=2))
    tome = image_of(catalog, tomesd="yes")
    assert not np.array_equal(tome, base)
    assert np.array_equal(image_of(catalog, tomesd="yes"), tome)  # seeded: reproducible
    assert same(image_of(catalog), base)  # the patch is removed after the job


def test_panorama_and_self_attention_use_their_pipelines(catalog):
    # MultiDiffusion denoises 512-px-wide windows (64 latents): a panorama is wider than that
    base = image_of(catalog, width=1024)
    panorama = image_of(catalog, width=1024, panorama="yes")
    assert panorama.shape == (64, 1024, 3) and differs(panorama, base)
    small = image_of(catalog, width=128)
    sag = image_of(catalog, width=128, self_attention="yes")
    assert sag.shape == (64, 128, 3) and differs(sag, small)


# --------------------------------------------------------------------------- ControlNet


@pytest.fixture(scope="module")
def controlnets(catalog, files):
    for name, net_id in (("cn.safetensors", "my-canny"), ("cn2.safetensors", "my-tile")):
        assert load(catalog, url=f"{files['url']}/{name}", model_id=net_id, model_type="controlnet")["status"] == "success"
    folder = load(catalog, url=str(files["root"] / "cn_folder"), model_id="canny", model_type="controlnet")
    assert folder["status"] == "success"
    return files["url"]


def test_controlnet_follows_the_hint(catalog, controlnets):
    url = controlnets
    first = image_of(catalog, "controlnet", controlnet_model="my-canny", control_image=f"{url}/hint.png")
    other_hint = image_of(catalog, "controlnet", controlnet_model="my-canny", control_image=f"{url}/hint2.png")
    weaker = image_of(catalog, "controlnet", controlnet_model="my-canny", control_image=f"{url}/hint.png",
                      controlnet_conditioning_scale=0.2)
    # a random tiny ControlNet steers weakly: any change beyond rounding shows the hint is used
    assert not same(first, other_hint) and not same(first, weaker)
    auto = call(catalog, "controlnet", prompt="x", controlnet_model="canny", init_image=f"{url}/hint.png",
                auto_hint="yes", **SMALL)
    assert auto["status"] == "success", auto
    assert auto["meta"]["controlnet_type"] == "canny" and auto["meta"]["auto_hint"] == "yes"
    refused = call(catalog, "controlnet", prompt="x", controlnet_model="my-canny", controlnet_type="depth",
                   init_image=f"{url}/hint.png", auto_hint="yes")
    assert refused["http"] == 400 and "control_image" in refused["tip"]


def test_auto_hint_depth_runs_the_loaded_preprocessor(catalog, controlnets, files):
    url = controlnets
    body = dict(controlnet_model="my-canny", controlnet_type="depth", init_image=f"{url}/hint.png", auto_hint="yes")
    missing = call(catalog, "controlnet", prompt="x", **body)
    assert missing["http"] == 400 and "depth-preprocessor" in missing["tip"]
    with LOAD_LOCK:
        write_depth_estimator(files["root"] / "depth-net")
    assert load(catalog, "load_model_v2", url=str(files["root"] / "depth-net"), model_id="depth-preprocessor",
                model_category="preprocessor", model_format="diffusers")["status"] == "success"
    depth_hint = image_of(catalog, "controlnet", **body)
    raw_hint = image_of(catalog, "controlnet", **{**body, "auto_hint": "no"})
    assert not same(depth_hint, raw_hint)  # the hint was the estimated depth map, not the photo
    unknown = call(catalog, "controlnet", prompt="x", **{**body, "controlnet_type": "openpose"})
    assert unknown["http"] == 400 and "openpose" in unknown["message"]


def test_multi_controlnet_img2img_and_inpaint(catalog, controlnets):
    url = controlnets
    multi = call(catalog, "controlnet", prompt="x", controlnet_model="my-canny,my-tile",
                 controlnet_conditioning_scale="1,0.5", control_image=[f"{url}/hint.png", f"{url}/hint2.png"], **SMALL)
    assert multi["status"] == "success", multi
    assert multi["meta"]["controlnet_conditioning_scale"] == "1,0.5"
    img2img = call(catalog, "controlnet", prompt="x", controlnet_model="my-canny", init_image=f"{url}/hint.png",
                   control_image=f"{url}/hint2.png", strength=0.6, **SMALL)
    assert img2img["status"] == "success" and img2img["meta"]["strength"] == 0.6
    painted = image_of(catalog, "controlnet", controlnet_model="my-canny", init_image=f"{url}/hint.png",
                       mask_image=f"{url}/mask.png", control_image=f"{url}/hint2.png")
    keep = np.asarray(centre_mask(64, 64)) == 0
    assert np.array_equal(painted[keep], np.asarray(scene(64, 64), dtype=np.int16)[keep])
    mismatch = call(catalog, "controlnet", prompt="x", controlnet_model="my-canny,my-tile", controlnet_conditioning_scale="1,1,1",
                    control_image=f"{url}/hint.png")
    assert mismatch["http"] == 422


# --------------------------------------------------------------------------- failures, delete, webhooks


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"url": "/missing.safetensors", "model_type": "custom_ckpt"}, "HTTP 404"),
        ({"url": "/truncated.safetensors", "model_type": "custom_ckpt"}, "safetensors"),
        ({"url": "/notes.safetensors", "model_type": "custom_ckpt"}, ""),
        ({"url": "/style_a.safetensors", "model_type": "custom_ckpt"}, ""),  # a LoRA is not a checkpoint
        ({"url": "/tiny.safetensors", "model_type": "lora"}, "not a LoRA"),
        ({"url": "/tiny.safetensors", "model_type": "embeddings"}, "embedding"),
        ({"url": "/tiny.safetensors", "model_type": "controlnet"}, ""),
    ],
)
def test_failed_loads_say_why_and_free_nothing_half_done(catalog, files, body, reason):
    model_id = f"bad-{abs(hash(json.dumps(body))) % 10**8}"
    answer = load(catalog, **{**body, "url": files["url"] + body["url"], "model_id": model_id})
    assert answer["http"] == 400 and answer["status"] == "error"
    assert "failed to load" in answer["message"] and reason in answer["message"]
    listed = {m["model_id"]: m for m in call(catalog, "get_all_models")["models"]}
    assert listed[model_id]["status"] == "failed" and listed[model_id]["message"]
    assert call(catalog, "text2img", prompt="x", model_id=model_id)["http"] == 400
    assert call(catalog, "delete_model", model_id=model_id)["status"] == "success"


def test_wrong_family_claimed_fails(catalog, files):
    answer = load(catalog, "load_model_v2", url=f"{files['url']}/tiny.safetensors", model_id="claims-xl",
                  model_category="stable_diffusion_xl", model_format="safetensors")
    assert answer["status"] == "error" and "stable_diffusion_xl" in answer["message"]


def test_hub_repo_without_internet_fails_clearly(catalog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    answer = load(catalog, url="someone/some-model", model_id="from-hub")
    assert answer["status"] == "error" and "someone/some-model" in answer["message"]


def test_duplicate_id_is_refused_and_delete_frees_it(catalog, files):
    url = f"{files['url']}/style_a.safetensors"
    assert load(catalog, url=url, model_id="dup", model_type="lora")["status"] == "success"
    again = call(catalog, "load_model", url=url, model_id="dup", model_type="lora")
    assert again["http"] == 409 and "already" in again["message"]
    assert image_of(catalog, lora_model="dup") is not None
    assert call(catalog, "delete_model", model_id="dup")["message"] == "Model deleted on server"
    assert call(catalog, "verify_model", model_id="dup")["http"] == 404
    assert call(catalog, "text2img", prompt="x", lora_model="dup")["http"] == 404
    assert load(catalog, url=url, model_id="dup", model_type="lora")["status"] == "success"


def test_delete_while_in_use_is_refused(catalog, files):
    load(catalog, url=f"{files['url']}/style_b.safetensors", model_id="busy-lora", model_type="lora")
    runtime = catalog.app.state.runtime
    job = runtime.jobs.create(_queued_job(generation_params(loras=(Lora(model_id="busy-lora", strength=1.0),))))
    refused = call(catalog, "delete_model", model_id="busy-lora")
    assert refused["http"] == 409 and str(job.id) in refused["message"]
    runtime.jobs.update(job.id, status="failed", message="test")
    assert call(catalog, "delete_model", model_id="busy-lora")["status"] == "success"


def _queued_job(params):
    from infra.jobs.job import Job

    return Job(id=0, endpoint="text2img", params=params, meta={}, output_keys=[], future_links=[], eta=1.0)


def test_load_outcome_is_posted_to_the_webhook(catalog, files, receiver):
    hook, received = receiver
    load(catalog, url=f"{files['url']}/style_a.safetensors", model_id="hooked", model_type="lora", webhook=hook)
    load(catalog, url=f"{files['url']}/missing.bin", model_id="hooked-bad", model_type="lora", webhook=hook)
    deadline = time.monotonic() + 30
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    by_id = {event["model_id"]: event for event in received}
    assert by_id["hooked"]["status"] == "success" and by_id["hooked"]["category"] == "lora"
    assert by_id["hooked-bad"]["status"] == "failed" and "404" in by_id["hooked-bad"]["message"]


def test_controlnet_11_repos_get_their_conventional_ids(catalog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = call(catalog, "load_model", url="lllyasviel/control_v11f1p_sd15_depth", model_type="controlnet")
    assert started["status"] == "success" and started["model_id"] == "depth"
    assert wait_loaded(catalog, "depth")["status"] == "error"  # no hub here; the id was claimed though
    unnamed = call(catalog, "load_model", url="someone/my-model", model_type="custom_ckpt")
    assert unnamed["http"] == 400 and "model_id" in unnamed["message"]


def test_sdxl_embedding(catalog, files, sdxl):
    root = files["root"]
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(14)
    save_file({"clip_l": torch.randn(1, 32, generator=generator), "clip_g": torch.randn(1, 64, generator=generator)},
              root / "xl_emb.safetensors")
    assert load(catalog, url=f"{files['url']}/xl_emb.safetensors", model_id="xl-emb", model_type="embeddings")[
        "status"] == "success"
    base = image_of(catalog, model_id="xl", prompt="a bench xl-emb")
    assert differs(image_of(catalog, model_id="xl", prompt="a bench xl-emb", embeddings_model="xl-emb"), base)
    assert same(image_of(catalog, model_id="xl", prompt="a bench xl-emb"), base)
    refused = call(catalog, "text2img", prompt="x", embeddings_model="xl-emb")  # on the SD 1.x default model
    assert refused["http"] == 400 and "was made for a model with" in refused["message"]


def test_sdxl_controlnet(catalog, files, sdxl):
    root = files["root"]
    with LOAD_LOCK:
        write_controlnet(root / "tiny-sdxl", root / "cn-xl", "diffusers_folder", seed=13)
    assert load(catalog, url=str(root / "cn-xl"), model_id="xl-canny", model_type="controlnet")["status"] == "success"
    hint = f"{files['url']}/hint.png"
    result = image_of(catalog, "controlnet", model_id="xl", controlnet_model="xl-canny", control_image=hint)
    assert result.shape == (64, 64, 3)
    refused = call(catalog, "controlnet", model_id="tiny-sd", controlnet_model="xl-canny", control_image=hint)
    assert refused["http"] == 400 and "was made for a model with" in refused["message"]


def test_delete_evicts_the_model_from_memory(catalog, files):
    load(catalog, url=f"{files['url']}/tiny.safetensors", model_id="evict-me", model_type="custom_ckpt")
    image_of(catalog, model_id="evict-me")
    engine = catalog.app.state.runtime.dispatcher.engine()
    assert "evict-me" in engine.cache.loaded
    assert call(catalog, "delete_model", model_id="evict-me")["status"] == "success"
    assert "evict-me" not in engine.cache.loaded
    assert not catalog.app.state.runtime.weights.folder("evict-me").exists()


def test_concurrent_jobs_with_different_loras_do_not_mix(catalog, files):
    for name, lora_id in (("style_a.safetensors", "mix-a"), ("style_b.safetensors", "mix-b")):
        load(catalog, url=f"{files['url']}/{name}", model_id=lora_id, model_type="lora")
    alone = {lora: image_of(catalog, lora_model=lora) for lora in ("mix-a", "mix-b")}
    alone[None] = image_of(catalog)
    queued = []
    for _ in range(2):
        for lora in ("mix-a", "mix-b", None):
            extra = {"lora_model": lora} if lora else {}
            result = call(catalog, "text2img", prompt="a red bench", instant_response="yes", **SMALL, **extra)
            queued.append((lora, result["id"]))
    for lora, job_id in queued:
        result = catalog.post(f"{API}/fetch/{job_id}", json={"key": KEY}).json()
        deadline = time.monotonic() + 120
        while result["status"] == "processing" and time.monotonic() < deadline:
            time.sleep(0.1)
            result = catalog.post(f"{API}/fetch/{job_id}", json={"key": KEY}).json()
        image = np.asarray(Image.open(io.BytesIO(catalog.get(result["output"][0]).content)).convert("RGB"), dtype=np.int16)
        assert same(image, alone[lora]), lora


def test_loading_state_and_restart_recovery(models_dir, tmp_path):
    from infra.catalog.loader import LoadRequest

    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    client = open_client(tmp_path / "data", models)
    weights = client.app.state.runtime.weights
    weights.begin(LoadRequest("half-done", "owner/repo", None).entry())  # a load whose server died
    assert call(client, "verify_model", model_id="half-done") == {
        "http": 200, "status": "processing", "message": "Model is still loading", "model_id": "half-done"
    }
    assert call(client, "delete_model", model_id="half-done")["http"] == 409
    client.__exit__(None, None, None)
    restarted = open_client(tmp_path / "data", models)
    answer = call(restarted, "verify_model", model_id="half-done")
    assert answer["http"] == 400 and "restarted" in answer["message"]
    restarted.__exit__(None, None, None)


def test_downloads_are_size_capped_and_local_paths_can_be_refused(files, tmp_path):
    from infra.catalog.loader import LoadError, fetch_source, source_kind
    from infra.settings import Settings
    from models.errors import BadInput

    with pytest.raises(LoadError, match="limit"):
        fetch_source(f"{files['url']}/tiny.safetensors", tmp_path / "dl", Settings(max_model_bytes=1000, fetch_allowlist=["127.0.0.1"]))
    with pytest.raises(BadInput, match="local paths are not allowed"):
        source_kind(str(files["root"] / "tiny.safetensors"), allow_local=False)
    named = fetch_source(f"{files['url']}/tiny.ckpt", tmp_path / "dl2", Settings(fetch_allowlist=["127.0.0.1"]))
    assert named.name == "tiny.ckpt" and named.stat().st_size == (files["root"] / "tiny.ckpt").stat().st_size


def test_hub_downloads_skip_duplicate_weights():
    from infra.catalog.loader import hub_files_to_fetch

    sd15 = [
        ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
        "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "tokenizer/vocab.json",
        "tokenizer/merges.txt", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin",
    ]
    assert sorted(hub_files_to_fetch(sd15)) == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.bin",
    ])
    lora_repo = ["README.md", "style.safetensors", "images/preview.png"]
    assert hub_files_to_fetch(lora_repo) == ["style.safetensors"]


def test_a_hub_source_can_name_some_files_and_folders_of_a_repo(tmp_path):
    """`owner/name:path,path` (how ModelsLab's IP-Adapter ids are fetched from h94/IP-Adapter): only the
    named file and folder are fetched, and they lie side by side as one IP-Adapter folder."""
    from infra.catalog.loader import LoadError, hub_paths_to_fetch, lay_out_hub_paths, source_kind
    from infra.catalog.known import IP_ADAPTERS
    from models.errors import BadInput

    repo = ["README.md", "models/ip-adapter_sd15.safetensors", "models/ip-adapter_sd15.bin",
            "models/ip-adapter-plus_sd15.safetensors", "models/image_encoder/config.json",
            "models/image_encoder/model.safetensors", "models/image_encoder/pytorch_model.bin",
            "sdxl_models/ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder/config.json",
            "sdxl_models/image_encoder/model.safetensors"]
    source = IP_ADAPTERS["ip-adapter_sd15"][0]
    assert source_kind(source) == "hub"
    paths = source.partition(":")[2].split(",")
    assert sorted(hub_paths_to_fetch(repo, paths, "h94/IP-Adapter")) == [
        "models/image_encoder/config.json", "models/image_encoder/model.safetensors", "models/ip-adapter_sd15.safetensors"]
    with pytest.raises(LoadError, match="no file or folder models/missing"):
        hub_paths_to_fetch(repo, ["models/missing"], "h94/IP-Adapter")
    for bad in ("h94/IP-Adapter:../secrets", "h94/IP-Adapter:/etc/passwd", "h94/IP-Adapter:models/../x", "h94/IP-Adapter:"):
        with pytest.raises(BadInput, match="is not a model source"):
            source_kind(bad)
    snapshot = tmp_path / "snapshot"
    for name in ("models/ip-adapter_sd15.safetensors", "models/image_encoder/config.json"):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(name)
    out = lay_out_hub_paths(snapshot, paths, tmp_path / "selected")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "image_encoder/config.json", "ip-adapter_sd15.safetensors"]
