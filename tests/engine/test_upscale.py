"""The super-resolution / face-restoration engine (infra.engine.upscale), without HTTP: weights
files of the real architectures (tiny random-weight ones, and GFPGAN at its one real size) through
prepare -> load -> upscale / restore_faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data

from infra.engine.files.upscalers import (  # first: it makes torchvision importable before diffusers imports it
    UPSCALER_FILE,
    CheckpointError,
    import_spandrel,
    load_upscaler,
    prepare_upscaler,
)
from infra.engine.upscale import _feather_mask, _to_array, _to_tensor, face_square, restore_faces, upscale
from infra.safety import detector
from tests import upscaler_files as files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A textured RGB test image: a crop of skimage's astronaut, shifted per seed."""
    return Image.fromarray(data.astronaut()[40 + seed:40 + seed + height, 100:100 + width])


def _prepared(folder, category: str, path):
    facts = prepare_upscaler(category, path, folder)
    return facts, load_upscaler(folder / facts["file"], "cpu")




@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("upscalers")


@pytest.fixture(scope="module")
def nets(store):
    """The x4 RRDB, the x2 RRDB (pixel-unshuffle) and the x4 Compact net, prepared and loaded."""
    writers = {"x4": lambda p: files.write_esrgan(p, scale=4), "x2": lambda p: files.write_esrgan(p, scale=2),
               "compact": lambda p: files.write_compact(p, scale=4)}
    return {name: _prepared(store / name, "upscaler", write(store / f"{name}.pth"))[1]
            for name, write in writers.items()}


@pytest.fixture(scope="module")
def gfpgan_file(store):
    return files.write_gfpgan(store / "GFPGANv1.4.pth")


@pytest.fixture(scope="module")
def gfpgan(store, gfpgan_file):
    return _prepared(store / "gfpgan", "face_restorer", gfpgan_file)


# --------------------------------------------------------------------------- importing


def test_spandrel_imports_beside_this_torchvision():
    spandrel = import_spandrel()
    import torchvision.transforms.functional as tv_functional

    assert callable(spandrel.ModelLoader().load_from_file)
    assert {"ESRGAN", "Compact", "GFPGAN", "RestoreFormer"} <= {arch.architecture.id for arch in spandrel.MAIN_REGISTRY}
    assert callable(tv_functional.normalize)


# --------------------------------------------------------------------------- prepare + load


@pytest.mark.parametrize(
    ("name", "write", "family", "scale", "tag"),
    [
        ("RealESRGAN_x4plus.pth", lambda p: files.write_esrgan(p, scale=4), "ESRGAN", 4, "1nb"),
        ("RealESRGAN_x2plus.pth", lambda p: files.write_esrgan(p, scale=2), "ESRGAN", 2, "unshuffle"),
        ("RealESRGAN_x4plus_anime_6B.pth", lambda p: files.write_esrgan(p, scale=4, num_block=6), "ESRGAN", 4, "6nb"),
        ("realesr-general-x4v3.pth", lambda p: files.write_compact(p, scale=4), "Compact", 4, "2nc"),
        ("x4.safetensors", lambda p: files.write_esrgan(p, scale=4, num_feat=16), "ESRGAN", 4, "16nf"),
    ],
)
def test_upscaler_round_trip(tmp_path, name, write, family, scale, tag):
    source = write(tmp_path / name)
    facts = prepare_upscaler("upscaler", source, tmp_path / "out")
    assert facts == {"category": "upscaler", "format": "safetensors", "file": UPSCALER_FILE, "family": family,
                     "scale": scale}
    saved = load_file(tmp_path / "out" / UPSCALER_FILE)
    assert saved and all(t.is_contiguous() for t in saved.values())

    descriptor = load_upscaler(tmp_path / "out" / UPSCALER_FILE, "cpu")
    assert (descriptor.architecture.id, descriptor.scale, descriptor.purpose) == (family, scale, "SR")
    assert tag in descriptor.tags
    assert descriptor.dtype == torch.float32 and not descriptor.model.training
    # the weights survived: the loaded net computes what the written one does
    reference = import_spandrel().ModelLoader().load_from_file(source).eval()
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(descriptor(x), reference(x))


def test_x2_release_layout_is_pixel_unshuffle(nets):
    x2 = nets["x2"]
    assert x2.size_requirements.multiple_of == 4
    assert x2.model.state_dict()["model.0.weight"].shape[1] == 12  # 3 channels x 2 x 2 unshuffled


def test_face_restorer_round_trip(gfpgan):
    facts, descriptor = gfpgan
    assert facts == {"category": "face_restorer", "format": "safetensors", "file": UPSCALER_FILE,
                     "family": "GFPGAN", "scale": 1}
    assert descriptor.purpose == "FaceSR" and descriptor.size_requirements.minimum == 512
    assert descriptor.dtype == torch.float32  # GFPGAN does not support fp16


# --------------------------------------------------------------------------- wrong files


def test_face_restorer_loaded_as_upscaler(tmp_path, gfpgan_file):
    with pytest.raises(CheckpointError, match="GFPGAN face restoration model, not an upscaler.*face_restorer"):
        prepare_upscaler("upscaler", gfpgan_file, tmp_path / "out")
    assert not (tmp_path / "out" / UPSCALER_FILE).exists()


def test_upscaler_loaded_as_face_restorer(tmp_path):
    source = files.write_esrgan(tmp_path / "RealESRGAN_x4plus.pth")
    with pytest.raises(CheckpointError, match="ESRGAN x4 super-resolution model, not a face restorer.*upscaler"):
        prepare_upscaler("face_restorer", source, tmp_path / "out")
    assert not (tmp_path / "out" / UPSCALER_FILE).exists()


def test_1x_restoration_model_is_not_an_upscaler(tmp_path):
    source = files.write_compact(tmp_path / "1x-denoise.pth", scale=1)
    with pytest.raises(CheckpointError, match="1x image restoration model"):
        prepare_upscaler("upscaler", source, tmp_path / "out")


@pytest.mark.parametrize(
    ("category", "what"), [("upscaler", "super-resolution"), ("face_restorer", "face restoration")]
)
def test_unknown_network(tmp_path, category, what):
    source = files.write_not_a_model(tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match=f"not a {what} model spandrel recognises"):
        prepare_upscaler(category, source, tmp_path / "out")


def test_file_that_is_no_checkpoint(tmp_path):
    text = tmp_path / "RealESRGAN_x4plus.pth"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        prepare_upscaler("upscaler", text, tmp_path / "out")
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\x08\x07")
    with pytest.raises(CheckpointError, match="unsupported weights file type '.onnx'"):
        prepare_upscaler("upscaler", other, tmp_path / "out")


def test_recognised_architecture_with_wrong_shapes(tmp_path):
    """An RRDBNet with 4 growth channels: spandrel recognises ESRGAN keys but builds 32."""
    source = files.write_esrgan(tmp_path / "odd.pth", num_grow_ch=4)
    with pytest.raises(CheckpointError, match="weights do not load: RuntimeError"):
        prepare_upscaler("upscaler", source, tmp_path / "out")


# --------------------------------------------------------------------------- upscale


@pytest.mark.parametrize("net", ["x4", "x2"])
@pytest.mark.parametrize("scale", [1, 1.5, 2, 3, 4])
@pytest.mark.parametrize("size", [(37, 53), (16, 11)])
def test_output_size(nets, net, scale, size):
    out = upscale(nets[net], _image(*size), scale, tile=256, overlap=16)
    assert out.mode == "RGB"
    assert out.size == (round(size[0] * scale), round(size[1] * scale))


@pytest.mark.parametrize("net", ["x4", "x2"])
def test_network_scale_is_the_raw_network_output(nets, net):
    descriptor, image = nets[net], _image(37, 53).convert("RGBA")  # RGBA in, RGB out
    raw = _to_array(descriptor(_to_tensor(np.asarray(image.convert("RGB")), descriptor)))
    same = upscale(descriptor, image, descriptor.scale, tile=0, overlap=0)
    assert same.mode == "RGB" and np.array_equal(np.asarray(same), raw)
    assert raw.std() > 10  # a textured image: the comparisons here and below are not trivial
    other = upscale(descriptor, image, 3, tile=0, overlap=0)
    expected = Image.fromarray(raw).resize((111, 159), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(other), np.asarray(expected))


@pytest.mark.parametrize(
    ("net", "tile", "overlap"),
    # overlap >= the net's receptive radius: ~19 input pixels for the 1-block x4 RRDB, twice that
    # for the x2 one (its body runs on the pixel-unshuffled half-size image), 4 for Compact; the
    # odd tile of the x2 case is rounded up to its multiple of 4
    [("x4", 32, 24), ("x2", 25, 40), ("compact", 17, 8)],
)
def test_tiles_match_the_whole_image(nets, net, tile, overlap):
    descriptor, image = nets[net], _image(96, 70)
    whole = np.asarray(upscale(descriptor, image, descriptor.scale, tile=0, overlap=0)).astype(int)
    tiled = np.asarray(upscale(descriptor, image, descriptor.scale, tile=tile, overlap=overlap)).astype(int)
    assert tiled.shape == whole.shape
    assert np.abs(tiled - whole).max() <= 2
    # without overlap the tile borders show: the tiles really ran separately
    seams = np.asarray(upscale(descriptor, image, descriptor.scale, tile=tile, overlap=0)).astype(int)
    assert np.abs(seams - whole).max() > 2


# --------------------------------------------------------------------------- face restoration


def test_face_square_fits_the_image():
    assert face_square((100, 100, 50, 40), 512, 512) == (85, 80, 80)  # 1.6 x 50, centred on the box
    assert face_square((0, 0, 50, 50), 512, 512) == (0, 0, 80)  # shifted inside at a corner
    assert face_square((480, 490, 40, 30), 512, 512) == (448, 448, 64)
    assert face_square((10, 10, 300, 300), 200, 120) == (80, 0, 120)  # shrunk to the image
    assert face_square((10, 10, 0, 20), 512, 512) is None


def test_feather_mask_is_zero_at_the_edge_and_one_inside():
    mask = _feather_mask(100)
    assert mask.shape == (100, 100)
    assert mask[0].max() == 0 and mask[:, -1].max() == 0
    assert mask[20:80, 20:80].min() == 1
    assert np.all(np.diff(mask[50, :50]) >= 0)  # rises monotonically from the edge


def test_restore_faces_on_astronaut(gfpgan):
    restorer = gfpgan[1]
    image = Image.fromarray(data.astronaut())
    faces = detector().faces(image)
    assert faces, "NudeNet finds the astronaut's face"
    boxes = [face.box for face in faces]
    restored = restore_faces(restorer, image, boxes)
    assert restored.size == image.size and restored.mode == "RGB"

    before, after = np.asarray(image).astype(int), np.asarray(restored).astype(int)
    outside = np.ones(before.shape[:2], dtype=bool)
    for x, y, w, h in boxes:
        left, top, side = face_square((x, y, w, h), *image.size)
        assert left <= x and top <= y and x + w <= left + side and y + h <= top + side
        outside[top:top + side, left:left + side] = False
        assert np.abs(after - before)[y:y + h, x:x + w].mean() > 5  # the face changed
    assert np.array_equal(after[outside], before[outside])  # nothing else did


def test_restore_faces_without_faces_changes_nothing(gfpgan):
    image = _image(64, 48)
    assert np.array_equal(np.asarray(restore_faces(gfpgan[1], image, [])), np.asarray(image))
    assert np.array_equal(np.asarray(restore_faces(gfpgan[1], image, [(5, 5, 0, 0)])), np.asarray(image))
