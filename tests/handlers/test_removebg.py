"""removebg_mask (spec §4.3, §7) end to end over HTTP, on the enterprise image_editing route and v6's:
the background remover is a tiny U²-Net-shaped ONNX graph (tests.model_files.write_background_remover:
random weights, nothing downloaded) loaded into the catalog under the default id `u2net`, run through
rembg. The answers are checked pixel by pixel against the model's own mask (the same file as a rembg
session, here): the cut-out is RGBA with the mask as its alpha, `only_mask` answers the mask,
`inverse_mask` inverts it, `post_process_mask` makes it black and white, alpha matting runs. A job
like the others: processing + fetch, the webhook, metering, cancel; bad input is a 4xx in the
route's error envelope, never a 5xx."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from infra.engine.files.background import load_background_remover
from tests.catalog.test_catalog import load, wait_loaded
from tests.conftest import KEY, open_client, png_bytes, until_ended
from tests.model_files import write_background_remover

V1, V6 = "/api/v1/enterprise", "/api/v6"
ROUTES = [f"{V1}/image_editing/removebg_mask", f"{V6}/image_editing/removebg_mask"]
FETCH = {V1: f"{V1}/image_editing/fetch", V6: f"{V6}/image_editing/fetch"}


def subject(width: int = 96, height: int = 80) -> Image.Image:
    """A bright disc (the subject) on a dark ground."""
    image = Image.new("RGB", (width, height), (20, 30, 40))
    ImageDraw.Draw(image).ellipse([width // 4, height // 5, width * 3 // 4, height * 4 // 5], fill=(240, 200, 180))
    return image


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_background_remover(tmp_path_factory.mktemp("u2net") / "tiny-u2net.onnx")


@pytest.fixture(scope="module")
def app(models_dir, model_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("removebg")
    shutil.copytree(models_dir, root / "models")
    client = open_client(root / "data", root / "models")
    answer = load(client, "load_model_v2", url=str(model_file), model_id="u2net", model_category="background_remover")
    assert answer["status"] == "success" and answer["category"] == "background_remover", answer
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def model_mask(model_file):
    """The model's own mask of an image: the same ONNX file as a rembg session."""
    session = load_background_remover(model_file)
    return lambda image: np.asarray(session.predict(image)[0])


def removed(client, route: str, **body) -> tuple[dict, Image.Image]:
    answer = client.post(route, json={"key": KEY, **body})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == "success", result
    return result, Image.open(io.BytesIO(client.get(result["output"][0]).content))


@pytest.mark.parametrize("route", ROUTES)
def test_the_cut_out_is_rgba_with_the_models_mask_as_its_alpha(app, model_mask, route):
    image = subject()
    result, cutout = removed(app, route, image=data_uri(image))
    assert cutout.format == "PNG" and cutout.mode == "RGBA" and cutout.size == image.size
    rgba, mask = np.asarray(cutout), model_mask(image)
    assert np.array_equal(rgba[..., 3], mask)
    assert 0 < (mask == 255).sum() < mask.size and (mask == 0).sum() > 0  # a subject and a background
    sure = mask == 255
    assert np.array_equal(rgba[..., :3][sure], np.asarray(image)[sure])  # the subject's pixels as they were
    assert (rgba[..., :3][mask == 0] == 0).all()  # the background: transparent black (rembg's cut-out)
    meta = result["meta"]
    assert meta["background_model"] == "u2net" and meta["image_url"] == "(base64 image)"
    assert (meta["alpha_matting"], meta["post_process_mask"], meta["only_mask"], meta["inverse_mask"]) == \
        ("0", "0", "0", "no")
    assert (meta["alpha_matting_foreground_threshold"], meta["alpha_matting_background_threshold"],
            meta["alpha_matting_erode_size"]) == (240, 20, 5)
    assert (meta["W"], meta["H"], meta["n_samples"], meta["base64"]) == (96, 80, 1, "no")
    assert result["output"][0].endswith(f"{meta['file_prefix']}.png")


@pytest.mark.parametrize("route", ROUTES)
def test_only_mask_answers_the_mask_and_inverse_mask_inverts_it(app, model_mask, route):
    image = subject()
    _, mask = removed(app, route, image=data_uri(image), only_mask=True)
    assert mask.mode == "L" and mask.size == image.size
    assert np.array_equal(np.asarray(mask), model_mask(image))
    result, inverse = removed(app, route, image=data_uri(image), only_mask="yes", inverse_mask=True)
    assert np.array_equal(np.asarray(inverse), 255 - model_mask(image))
    assert (result["meta"]["only_mask"], result["meta"]["inverse_mask"]) == ("1", "yes")
    # the cut-out of the inverted mask keeps the background
    _, kept = removed(app, route, init_image=data_uri(image), inverse_mask=True)  # (`init_image`: the alias)
    assert np.array_equal(np.asarray(kept)[..., 3], 255 - model_mask(image))


def test_post_process_mask_smooths_it_to_black_and_white_before_the_inversion(app, model_mask):
    image = subject()
    _, smooth = removed(app, ROUTES[0], image=data_uri(image), only_mask=True, post_process_mask=True)
    values = np.asarray(smooth)
    assert set(np.unique(values)) <= {0, 255} and not np.array_equal(values, model_mask(image))
    # the inversion comes after the post-processing: exactly the smoothed mask, inverted
    _, inverse = removed(app, ROUTES[1], image=data_uri(image), only_mask=True, post_process_mask=True,
                         inverse_mask=True)
    assert np.array_equal(np.asarray(inverse), 255 - values)


@pytest.mark.parametrize("route", ROUTES)
def test_alpha_matting_runs_and_keeps_the_sure_areas(app, model_mask, route):
    image = subject()
    result, matted = removed(app, route, image=data_uri(image), alpha_matting=True,
                             alpha_matting_foreground_threshold=200, alpha_matting_background_threshold=30,
                             alpha_matting_erode_size=2)
    assert matted.mode == "RGBA" and matted.size == image.size and result["meta"]["alpha_matting"] == "1"
    alpha, mask = np.asarray(matted)[..., 3], model_mask(image)
    assert (alpha[mask == 255].astype(int) >= 250).mean() > 0.95  # the sure subject stays opaque
    assert (alpha[mask == 0].astype(int) <= 5).mean() > 0.95  # the sure background transparent
    meta = result["meta"]
    assert (meta["alpha_matting_foreground_threshold"], meta["alpha_matting_erode_size"]) == (200, 2)
    # thresholds that leave no sure subject: rembg's fallback (the mask as the alpha), not an error
    result, fallback = removed(app, route, image=data_uri(image), alpha_matting=True,
                               alpha_matting_foreground_threshold=255)
    assert np.array_equal(np.asarray(fallback)[..., 3], mask)


def test_base64_answers_the_base64_of_the_png(app, model_mask):
    image = subject(64, 48)
    result = app.post(ROUTES[1], json={"key": KEY, "image": data_uri(image), "base64": True, "only_mask": True}).json()
    assert result["status"] == "success", result
    assert result["output"][0].endswith(".base64") and result["meta"]["base64"] == "yes"
    text = app.get(result["output"][0]).content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))), model_mask(image))


@pytest.mark.parametrize("route", ROUTES)
def test_a_job_like_any_other_processing_fetch_webhook_and_metering(app, model_mask, receivers, route):
    receiver = receivers()
    image = subject(64, 64)
    body = {"key": KEY, "image": data_uri(image), "only_mask": True, "instant_response": True,
            "webhook": receiver.url, "track_id": 7}
    queued = app.post(route, json=body).json()
    assert queued["status"] == "processing", queued
    generation = V1 if route.startswith(V1) else V6
    assert queued["fetch_result"] == f"http://testserver{FETCH[generation]}/{queued['id']}"
    assert queued["future_links"] and queued["meta"]["track_id"] == "7"
    result = until_ended(lambda: app.post(queued["fetch_result"], json={"key": KEY}).json())
    assert result["status"] == "success", result
    assert result["output"] == queued["future_links"]
    fetched = Image.open(io.BytesIO(app.get(result["output"][0]).content))
    assert np.array_equal(np.asarray(fetched), model_mask(image))
    [hook] = receiver.wait_for(1)
    payload = json.loads(hook.body)
    assert payload["status"] == "success" and payload["id"] == queued["id"] and payload["track_id"] == "7"
    usage = app.post(f"{V1}/usage", json={"key": KEY}).json()
    counted = [entry["endpoints"]["removebg_mask"] for entry in usage["keys"] if "removebg_mask" in entry["endpoints"]]
    assert counted and counted[0]["jobs_succeeded"] >= 1, usage


def test_a_queued_job_is_cancelled_like_any_other(models_dir, model_file, tmp_path):
    """On an app whose jobs are recorded, not run: the job waits queued until its cancel ends it."""
    shutil.copytree(models_dir, tmp_path / "models")
    client = open_client(tmp_path / "data", tmp_path / "models")
    try:
        load(client, "load_model_v2", url=str(model_file), model_id="u2net", model_category="background_remover")
        client.app.state.runtime.dispatcher.submit = lambda job_id: None
        queued = client.post(ROUTES[1], json={"key": KEY, "image": data_uri(subject()), "instant_response": True}).json()
        assert queued["status"] == "processing", queued
        cancelled = client.post(f"{V1}/cancel", json={"key": KEY, "request_id": queued["id"]})
        assert cancelled.status_code == 200, cancelled.text
        ended = client.post(queued["fetch_result"], json={"key": KEY}).json()
        assert ended["status"] == "failed" and "cancel" in ended["message"].lower(), ended
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(("route", "body", "status", "words"), [
    (ROUTES[0], {"image": ""}, 422, "image"),
    (ROUTES[1], {"image": None}, 422, "image"),
    (ROUTES[0], {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, 400, "image"),
    (ROUTES[1], {"alpha_matting_foreground_threshold": 300}, 422, "alpha_matting_foreground_threshold"),
    (ROUTES[0], {"alpha_matting_background_threshold": -1}, 422, "alpha_matting_background_threshold"),
    (ROUTES[1], {"alpha_matting_erode_size": 33}, 422, "alpha_matting_erode_size"),
    (ROUTES[0], {"only_mask": "maybe"}, 422, "only_mask"),
    (ROUTES[1], {"alpha_matting": True, "alpha_matting_foreground_threshold": 20,
                 "alpha_matting_background_threshold": 20}, 400, "alpha_matting_background_threshold"),
])
def test_bad_input_is_named_in_the_error_envelope(app, route, body, status, words):
    answer = app.post(route, json={"key": KEY, "image": data_uri(subject(32, 32)), **body})
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["status"] == "error" and words in str(error["message"]), error


def test_without_the_model_the_tip_is_the_load_call(make_client):
    bare = make_client()  # no background remover, and no fetch of known models in tests
    refused = bare.post(ROUTES[1], json={"key": KEY, "image": data_uri(subject(32, 32))})
    assert refused.status_code == 404, refused.text
    assert "u2net.onnx" in refused.json()["tip"] and "background_remover" in refused.json()["tip"]


def other_model(path, shape: list[int], squeeze: bool = False):
    """A valid ONNX graph that is not U²-Net-shaped: its input of `shape` answered as it is, or with
    `squeeze` averaged over its channels into a 3-dimensional output."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0) if squeeze else \
        helper.make_node("Identity", ["x"], ["y"])
    out = [shape[0], *shape[2:]] if squeeze else shape
    graph = helper.make_graph([node], "not-u2net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.mark.parametrize(("name", "make", "words"), [
    ("garbage", lambda path: path.write_bytes(b"not a model"), "not an ONNX model"),
    ("small-input", lambda path: other_model(path, [1, 3, 64, 64]), "takes one image input of shape [1, 3, 320, 320]"),
    ("flat-output", lambda path: other_model(path, [1, 3, 320, 320], squeeze=True), "first output is a mask map"),
])
def test_a_file_that_is_not_a_background_remover_fails_its_load_saying_why(app, tmp_path, name, make, words):
    path = tmp_path / "u2net.onnx"
    make(path)
    started = app.post(f"{V1}/load_model_v2", json={"key": KEY, "url": str(path), "model_id": name,
                                                   "model_category": "background_remover"})
    assert started.status_code == 200 and started.json()["status"] == "success", started.text
    ended = wait_loaded(app, name)
    assert ended["status"] == "error" and words in ended["message"], ended
