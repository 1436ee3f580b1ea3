"""mask_creator (issue 20, spec §7): a mask of the object `specific_object` names in `init_image`, by
the catalog's text-prompted segmentation model (CLIPSeg through transformers; a tiny random one,
tests.model_files.write_segmenter, loaded from a folder), on the enterprise image_editing route and
v6's, a job like any other (processing + fetch, metering)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.catalog.test_catalog import load
from tests.catalog.test_transformer_families import data_uri
from tests.conftest import KEY, open_client, scene
from tests.model_files import write_segmenter

ROUTES = ["/api/v1/enterprise/image_editing/mask_creator", "/api/v6/image_editing/mask_creator"]


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mask-creator")
    shutil.copytree(models_dir, root / "models")
    client = open_client(root / "data", root / "models")
    answer = load(client, "load_model_v2", url=str(write_segmenter(root / "clipseg")), model_id="clipseg-rd64-refined",
                  model_category="segmenter")
    assert answer["status"] == "success" and answer["category"] == "segmenter", answer
    yield client
    client.__exit__(None, None, None)


def mask_of(client, route: str, **body) -> tuple[dict, np.ndarray]:
    answer = client.post(route, json={"key": KEY, **body}).json()
    assert answer["status"] == "success", answer
    mask = Image.open(io.BytesIO(client.get(answer["output"][0]).content))
    return answer, np.asarray(mask)


@pytest.mark.parametrize("route", ROUTES)
def test_the_mask_is_black_and_white_at_the_image_size_and_follows_the_words(app, route):
    image = data_uri(scene(96, 64))
    answer, ball = mask_of(app, route, init_image=image, specific_object="the ball", threshold=0.5)
    assert ball.shape == (64, 96) and set(np.unique(ball)) <= {0, 255}
    assert answer["meta"]["specific_object"] == "the ball" and answer["meta"]["mask_model"] == "clipseg-rd64-refined"
    _, again = mask_of(app, route, init_image=image, specific_object="the ball", threshold=0.5)
    assert np.array_equal(ball, again)
    # other words, another mask; a lower threshold masks at least as much
    _, dog = mask_of(app, route, init_image=image, specific_object="a dog on the left", threshold=0.5)
    assert not np.array_equal(ball, dog)
    _, looser = mask_of(app, route, init_image=image, specific_object="the ball", threshold=0.3)
    assert (looser >= ball).all() and looser.sum() > ball.sum()


def test_bad_requests_are_named(app, make_client):
    route = ROUTES[0]
    image = data_uri(scene(64, 64))
    missing = app.post(route, json={"key": KEY, "init_image": image})
    assert missing.status_code == 422 and "specific_object" in str(missing.json()["message"])
    blank = app.post(route, json={"key": KEY, "init_image": image, "specific_object": "   "}).json()
    assert blank["status"] == "error"
    # without the segmenter (and no fetch of known models): a 404 whose tip is the load call
    bare = make_client()
    refused = bare.post(route, json={"key": KEY, "init_image": image, "specific_object": "the ball"})
    assert refused.status_code == 404 and "CIDAS/clipseg-rd64-refined" in refused.json()["tip"], refused.json()
