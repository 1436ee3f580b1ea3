"""The NSFW detector is sure both ways, and flagged images are treated as safety_checker_type says.

tests/fixtures/nsfw_probe.png is an abstract pattern crafted against the detector by
scripts/make_nsfw_probe.py: no real content, but the classifier is certain it is explicit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from infra.engine.postprocess import treat_flagged
from infra.safety import detector

PROBE = Path(__file__).parent / "fixtures" / "nsfw_probe.png"
KINDS = ["blur", "pixelate", "black", "sensitive_content_text"]


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def gradient(width=512, height=384) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    return Image.fromarray(np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8))


def noise(width=512, height=384) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def high_frequency(image: Image.Image) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixels."""
    a = pixels(image)
    return float((np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()) / 2)


# the detector


def test_probe_is_flagged_with_certainty():
    with Image.open(PROBE) as probe:
        assert probe.size == (320, 320) and probe.mode == "RGB"
        assert detector().nsfw_score(probe) >= 0.9


@pytest.mark.parametrize("make", [
    astronaut,
    lambda: Image.new("RGB", (512, 512), (200, 120, 80)),
    gradient,
    noise,
], ids=["astronaut", "flat", "gradient", "noise"])
def test_safe_images_are_not_flagged(make):
    assert detector().nsfw_score(make()) <= 0.05


def test_astronaut_has_a_face():
    faces = detector().faces(astronaut())
    assert faces
    x, y, w, h = faces[0].box
    assert w > 0 and h > 0 and 0 <= x < 512 and 0 <= y < 512


@pytest.mark.parametrize("kind", KINDS)
def test_treated_probe_is_no_longer_flagged(kind):
    with Image.open(PROBE) as probe:
        treated = treat_flagged(probe, kind)
    assert treated.size == (320, 320)
    assert detector().nsfw_score(treated) < 0.2


# the treatments


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_treatments_keep_the_size_and_give_rgb(kind, mode):
    image = gradient(300, 200).convert(mode)
    treated = treat_flagged(image, kind)
    assert treated.size == (300, 200) and treated.mode == "RGB"


def test_black_is_all_black():
    treated = treat_flagged(astronaut(), "black")
    assert treated.size == (512, 512)
    assert not pixels(treated).any()


@pytest.mark.parametrize("size", [(512, 512), (300, 200), (100, 90)])
def test_pixelate_is_flat_blocks(size):
    image = noise(*size)
    treated = pixels(treat_flagged(image, "pixelate"))
    block = max(8, round(max(size) / 16))
    assert treated.shape[:2] == (size[1], size[0])
    for top in range(0, size[1], block):
        for left in range(0, size[0], block):
            tile = treated[top:top + block, left:left + block]
            assert (tile == tile[0, 0]).all(), (top, left)
    assert np.abs(treated - pixels(image)).mean() > 20  # noise averaged per block is nothing like the original


def test_pixelate_changes_a_photo():
    image = astronaut()
    treated = treat_flagged(image, "pixelate")
    assert high_frequency(treated) < high_frequency(image) / 2
    assert (pixels(treated) != pixels(image)).mean() > 0.9


@pytest.mark.parametrize("make", [astronaut, noise], ids=["astronaut", "noise"])
def test_blur_removes_detail(make):
    image = make()
    treated = treat_flagged(image, "blur")
    assert treated.size == image.size
    assert high_frequency(treated) < high_frequency(image) / 10
    # colours are averaged, not replaced: the mean colour stays close
    assert np.abs(pixels(treated).mean(axis=(0, 1)) - pixels(image).mean(axis=(0, 1))).max() < 20


def test_sensitive_content_text_is_a_notice_not_the_image():
    first = treat_flagged(astronaut(), "sensitive_content_text")
    second = treat_flagged(noise(512, 512), "sensitive_content_text")
    assert first.size == (512, 512)
    assert first.tobytes() == second.tobytes()  # nothing of the original survives
    grey = pixels(first.convert("L"))
    assert (grey < 64).mean() > 0.5  # a dark background...
    assert (grey > 192).sum() > 500  # ...with light text on it


@pytest.mark.parametrize("size", [(768, 320), (320, 1024), (64, 64)])
def test_sensitive_content_text_fits_any_size(size):
    notice = treat_flagged(Image.new("RGB", size, (255, 255, 255)), "sensitive_content_text")
    assert notice.size == size
    grey = pixels(notice.convert("L"))
    assert (grey > 128).any()
    # the text stays inside the image: the outer 1-pixel frame is background
    frame = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    assert (frame < 64).all()


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown safety_checker_type"):
        treat_flagged(astronaut(), "sepia")
