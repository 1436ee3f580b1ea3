"""outpaint and object_removal (spec §4.2, §4.4, §7) end to end over HTTP: the enterprise image_editing
family's routes and v6's, the tiny inpainting model on the CPU, the outputs checked pixel by pixel."""

from __future__ import annotations

import base64
import http.server
import threading

import numpy as np
import pytest
from PIL import Image

from handlers.media import outpaint_inputs, outpaint_layout
from tests.conftest import KEY, centre_mask, fetch_png, png_bytes, scene, until_ended

V1, V6 = "/api/v1/enterprise", "/api/v6"
OUTPAINT = [f"{V1}/image_editing/outpaint", f"{V6}/image_editing/outpaint"]
OBJECT_REMOVAL = [f"{V1}/image_editing/object_removal", f"{V6}/image_editing/object_removal"]
FETCH = {V1: f"{V1}/image_editing/fetch", V6: f"{V6}/image_editing/fetch"}

# §4.2's request example, verbatim but for the image's host (a loopback server serves it at its path)
SPEC_IMAGE_PATH = "/wp0w7nt/1-d212fe65-f95c-4bbe-b275-99f0dedd901a.png"
SPEC_BODY = """{"key": "your_api_key", "seed": 12345, "width": 512, "height": 512,
 "prompt": "a majestic cat house, lush greenery, filled with plants, hig…",
 "image": "https://i.ibb.co/wp0w7nt/1-d212fe65-f95c-4bbe-b275-99f0dedd901a.png",
 "negative_prompt": "dull background, text, characters, symbols, unrealistic, rep…",
 "overlap_width": 32, "num_inference_steps": 15, "guidance_scale": 8.0, "temp": true,
 "base64": false, "webhook": null, "track_id": null}"""


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def ended(client, path: str, body: dict) -> dict:
    """A job's answer once it has ended: the sync answer, else its fetch route's until it ends."""
    answer = client.post(path, json=body).json()
    if answer.get("status") != "processing":
        return answer
    return until_ended(lambda: client.post(answer["fetch_result"], json={"key": KEY}).json())


def quick(**fields) -> dict:
    """A fast outpaint body: a 64x32 picture onto a 128x64 canvas, 2 steps."""
    return {"key": KEY, "image": data_uri(scene(64, 32)), "width": 128, "height": 64, "overlap_width": 4,
            "num_inference_steps": 2, "seed": 3, **fields}


@pytest.fixture(scope="module")
def spec_image_host():
    """A loopback server answering the spec example's image path with a 384x256 picture."""
    data = png_bytes(scene(384, 256))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != SPEC_IMAGE_PATH:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# --------------------------------------------------------------------------- outpaint


def test_the_layout_centres_the_image_and_scales_it_down_only():
    same = outpaint_layout((64, 32), (128, 64), 4)
    assert (same.image_width, same.image_height, same.scale) == (64, 32, 1.0)
    assert (same.left, same.right, same.top, same.bottom) == (32, 32, 16, 16)
    assert same.keep_box() == (36, 20, 92, 44)
    wide = outpaint_layout((256, 64), (128, 64), 10)  # too wide: halved, the border above and below only
    assert (wide.image_width, wide.image_height, wide.scale) == (128, 32, 0.5)
    assert (wide.left, wide.right, wide.top, wide.bottom) == (0, 0, 16, 16)
    assert wide.keep_box() == (0, 26, 128, 38)  # no band where the image meets the canvas's edge
    canvas, mask = outpaint_inputs(scene(256, 64), wide)
    assert canvas.size == mask.size == (128, 64)
    placed = scene(256, 64).resize((128, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(pixels(canvas.crop((0, 16, 128, 48))), pixels(placed))
    keep = np.asarray(mask) == 0
    assert keep.sum() == 128 * 12 and set(np.unique(np.asarray(mask))) == {0, 255}
    # the border is pre-filled from the image's edges (not black): the sky above, the grass below
    assert pixels(canvas)[0].mean() > 60 and pixels(canvas)[-1, :, 1].mean() > 100
    tiny = outpaint_layout((8, 8), (64, 64), 42)
    assert tiny.keep_box() is None  # the band covers the whole image: all of it is repainted


@pytest.mark.parametrize("path", OUTPAINT)
def test_outpaint_keeps_the_image_and_paints_the_border(module_client, path):
    answer = module_client.post(path, json=quick())
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == "success", result
    image = fetch_png(module_client, result["output"][0])
    assert image.size == (128, 64)
    got, source = pixels(image), pixels(scene(64, 32))
    # outside the 4 px band the picture is where it belongs, bit for bit; the border and band are painted
    assert np.array_equal(got[20:44, 36:92], source[4:28, 4:60])
    assert not np.array_equal(got[16:48, 32:96], source)
    border = np.ones((64, 128), bool)
    border[16:48, 32:96] = False
    assert np.abs(got[border] - pixels(outpaint_inputs(scene(64, 32), outpaint_layout((64, 32), (128, 64), 4))[0])[border]).mean() > 1
    meta = result["meta"]
    assert (meta["width"], meta["height"], meta["overlap_width"], meta["num_inference_steps"]) == (128, 64, 4, 2)
    assert (meta["padding_left"], meta["padding_right"], meta["padding_top"], meta["padding_bottom"]) == (32, 32, 16, 16)
    assert (meta["image_width"], meta["image_height"], meta["image_scale"]) == (64, 32, 1.0)
    assert meta["model_id"] == "tiny-sd-inpaint" and meta["strength"] == 1 and meta["seed"] == 3
    assert meta["init_image"] == "(base64 image)" and "mask_image" not in meta


def test_outpaint_defaults_and_rounding(module_client):
    body = {"key": KEY, "image": data_uri(scene(64, 32)), "width": "133", "height": 70, "num_inference_steps": 1}
    result = module_client.post(f"{V1}/image_editing/outpaint", json=body).json()
    assert result["status"] == "success", result
    assert fetch_png(module_client, result["output"][0]).size == (128, 64)  # rounded down to multiples of 8
    meta = result["meta"]
    assert (meta["prompt"], meta["negative_prompt"]) == ("high quality", "low quality")  # not enhanced
    assert meta["overlap_width"] == 10 and meta["guidance_scale"] == 8.0 and meta["temp"] == "yes"
    assert meta["base64"] == "no" and isinstance(meta["seed"], int)
    # the canvas's own default, 1280x720, in the processing answer (the job is cancelled, not run)
    queued = module_client.post(f"{V6}/image_editing/outpaint",
                                json={"key": KEY, "image": data_uri(scene(64, 32)), "instant_response": True}).json()
    assert queued["status"] == "processing", queued
    assert queued["fetch_result"].endswith(f"{FETCH[V6]}/{queued['id']}")
    assert (queued["meta"]["width"], queued["meta"]["height"], queued["meta"]["num_inference_steps"]) == (1280, 720, 10)
    assert (queued["meta"]["padding_left"], queued["meta"]["padding_top"]) == (608, 344)
    module_client.post(f"{V1}/cancel", json={"key": KEY, "request_id": queued["id"]})


def test_outpaint_up_to_1440(module_client):
    # (fetched until it ends: on a busy machine a 1440-wide job may outlast the sync budget)
    result = ended(module_client, OUTPAINT[0], quick(width=1440, height=720, num_inference_steps=1))
    assert result["status"] == "success", result
    image = fetch_png(module_client, result["output"][0])
    assert image.size == (1440, 720)
    assert np.array_equal(pixels(image)[348:372, 692:748], pixels(scene(64, 32))[4:28, 4:60])


@pytest.mark.parametrize(("changes", "field", "status"), [
    ({"image": None}, "image", 422),
    ({"width": 2000}, "width", 422),
    ({"height": 1441}, "height", 422),
    ({"overlap_width": 50}, "overlap_width", 422),
    ({"num_inference_steps": 31}, "num_inference_steps", 422),
    ({"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image", 400),
    ({"model_id": "no-such-model"}, "no-such-model", 404),
])
def test_outpaint_refuses_bad_fields_naming_them(module_client, changes, field, status):
    answer = module_client.post(OUTPAINT[1], json=quick(**changes))
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["status"] == "error"
    assert field in body["message"], body  # a field's name among the 422's keys, or in the 400's text


def test_the_spec_example_body_works_verbatim(make_client, spec_image_host):
    client = make_client(api_keys=["your_api_key"], sync_timeout=120)
    body = SPEC_BODY.replace("https://i.ibb.co", spec_image_host)
    answer = client.post(OUTPAINT[0], content=body.encode(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == "success", result
    image = fetch_png(client, result["output"][0])
    assert image.size == (512, 512)
    meta = result["meta"]
    assert (meta["seed"], meta["overlap_width"], meta["num_inference_steps"], meta["guidance_scale"]) == (12345, 32, 15, 8)
    assert meta["init_image"] == f"{spec_image_host}{SPEC_IMAGE_PATH}" and meta["temp"] == "yes"
    assert (meta["padding_left"], meta["padding_top"], meta["padding_right"], meta["padding_bottom"]) == (64, 128, 64, 128)
    assert np.array_equal(pixels(image)[160:352, 96:416], pixels(scene(384, 256))[32:224, 32:352])


# --------------------------------------------------------------------------- object_removal


@pytest.mark.parametrize("path", OBJECT_REMOVAL)
def test_object_removal_changes_only_the_masked_area(module_client, path):
    body = {"key": KEY, "init_image": data_uri(scene(64, 64)), "mask_image": data_uri(centre_mask(64, 64)),
            "track_id": None, "webhook": None, "instant_response": True}
    queued = module_client.post(path, json=body).json()
    assert queued["status"] == "processing", queued
    generation = V1 if path.startswith(V1) else V6
    assert queued["fetch_result"] == f"http://testserver{FETCH[generation]}/{queued['id']}"
    result = until_ended(lambda: module_client.post(queued["fetch_result"], json={"key": KEY}).json())
    assert result["status"] == "success", result
    image = fetch_png(module_client, result["output"][0])
    assert image.size == (64, 64)
    keep = np.asarray(centre_mask(64, 64)) == 0
    got, init = pixels(image), pixels(scene(64, 64))
    assert np.array_equal(got[keep], init[keep])
    assert not np.array_equal(got[~keep], init[~keep])
    meta = queued["meta"]
    assert meta["removal_model"] == "tiny-sd-inpaint (SD inpainting, empty prompt)"
    assert meta["model_id"] == "tiny-sd-inpaint" and meta["prompt"] == "" and meta["strength"] == 1
    assert meta["negative_prompt"] == "object, person, text, watermark"
    assert meta["image_path"] == meta["mask_path"] == "(base64 image)"


def test_object_removal_needs_both_images(module_client):
    answer = module_client.post(OBJECT_REMOVAL[0], json={"key": KEY, "init_image": data_uri(scene(64, 64))})
    assert answer.status_code == 422 and set(answer.json()["message"]) == {"mask_image"}, answer.text
    mismatched = {"key": KEY, "init_image": data_uri(scene(64, 64)), "mask_image": data_uri(centre_mask(128, 64))}
    answer = module_client.post(OBJECT_REMOVAL[1], json=mismatched)
    assert answer.status_code == 400 and "mask_image" in answer.json()["message"], answer.text


def test_object_removal_runs_the_lama_network_when_one_is_loaded(models_dir, tmp_path):
    """With removal_model_id naming a loaded LaMa (category object_remover; here big-lama's architecture
    with random weights), object_removal is that network's one pass at the image's own size: only the
    masked pixels change, meta says which network ran; a file that is no inpainting network does not
    load as one; removal_model_id naming nothing loaded falls back to the inpainting model."""
    import shutil

    from infra.engine import LOAD_LOCK
    from tests.catalog.test_catalog import load
    from tests.conftest import open_client
    from tests.upscaler_files import write_esrgan, write_lama

    shutil.copytree(models_dir, tmp_path / "models")
    with LOAD_LOCK:
        lama = write_lama(tmp_path / "big-lama.safetensors")
        esrgan = write_esrgan(tmp_path / "x2.pth", scale=2)
    client = open_client(tmp_path / "data", tmp_path / "models", removal_model_id="big-lama")
    try:
        init, mask = scene(72, 40), Image.new("L", (72, 40), 0)
        mask.paste(255, (20, 8, 52, 32))
        body = {"key": KEY, "init_image": data_uri(init), "mask_image": data_uri(mask)}
        fallback = ended(client, OBJECT_REMOVAL[0], body)
        assert fallback["meta"]["removal_model"] == "tiny-sd-inpaint (SD inpainting, empty prompt)", fallback
        wrong = load(client, "load_model_v2", url=str(esrgan), model_id="not-lama", model_category="object_remover")
        assert wrong["status"] == "error" and "super-resolution" in wrong["message"], wrong
        loaded = load(client, "load_model_v2", url=str(lama), model_id="big-lama", model_category="object_remover")
        assert loaded["status"] == "success" and loaded["category"] == "object_remover", loaded
        for path in OBJECT_REMOVAL:
            result = ended(client, path, body)
            assert result["status"] == "success", result
            assert result["meta"]["removal_model"] == "big-lama (LaMa-class inpainting network)"
            image = fetch_png(client, result["output"][0])
            assert image.size == (72, 40)  # its own size (LaMa pads to multiples of 8 and crops back)
            keep = np.asarray(mask) == 0
            assert np.array_equal(pixels(image)[keep], pixels(init)[keep])
            assert not np.array_equal(pixels(image)[~keep], pixels(init)[~keep])
    finally:
        client.__exit__(None, None, None)


# --------------------------------------------------------------------------- magic_mix

MAGIC_MIX = f"{V1}/image_editing/magic_mix"


def magic_mix_body(**changes) -> dict:
    """The docs' body (spec §7), at the tiny model's size."""
    body = {"key": KEY, "prompt": "Bed", "negative_prompt": "low quality", "image": data_uri(scene(64, 64)),
            "width": 64, "height": 64, "kmin": 0.3, "kmax": 0.5, "mix_factor": 0.5, "steps": 20, "samples": 1,
            "seed": 12, "webhook": None, "track_id": None}
    return {**body, **changes}


def test_magic_mix_keeps_the_layout_and_follows_kmax(module_client):
    """A job like the others (the same seed: the same bytes); the output is the requested size; a higher
    kmax starts from more noise, so it strays further from the layout image; meta echoes the docs' keys."""
    def run(**changes):
        result = ended(module_client, MAGIC_MIX, magic_mix_body(**changes))
        assert result["status"] == "success", result
        return result, pixels(fetch_png(module_client, result["output"][0]))

    first, image = run()
    assert image.shape == (64, 64, 3)
    assert np.array_equal(run()[1], image)
    layout = pixels(scene(64, 64))
    far = run(kmax=0.9)[1]
    assert np.abs(far - layout).mean() > np.abs(image - layout).mean()
    assert not np.array_equal(run(mix_factor=0.9)[1], image)
    meta = first["meta"]
    assert {key: meta[key] for key in ("W", "H", "kmin", "kmax", "mix_factor", "steps", "n_samples", "seed", "prompt")} == {
        "W": 64, "H": 64, "kmin": 0.3, "kmax": 0.5, "mix_factor": 0.5, "steps": 20, "n_samples": 1, "seed": 12,
        "prompt": "Bed"}
    assert meta["model_id"] == "tiny-sd"


@pytest.mark.parametrize(("changes", "status", "says"), [
    ({"kmin": 0.6, "kmax": 0.4}, 400, "kmin (0.6) must be at most kmax (0.4)"),
    ({"samples": 2}, 422, "samples"),
    ({"steps": 51}, 422, "steps"),
    ({"image": None}, 422, "image"),
    ({"model_id": "tiny-sd-inpaint"}, 400, "inpainting model"),
])
def test_magic_mix_refuses_what_it_cannot_run_naming_it(module_client, changes, status, says):
    body = {k: v for k, v in magic_mix_body(**changes).items() if v is not None or k in ("webhook", "track_id")}
    answer = module_client.post(MAGIC_MIX, json=body)
    assert answer.status_code == status and says in str(answer.json()["message"]), answer.text
