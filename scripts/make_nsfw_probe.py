"""Make tests/fixtures/nsfw_probe.png: an abstract pattern NudeNet's 320n model scores as explicit.

What: a 320x320 RGB PNG, crafted by gradient ascent on the NSFW detector itself (infra/safety.py:
NudeNet's bundled ONNX YOLO model), so that `detector().nsfw_score(Image.open(probe))` is >= 0.9
through the real onnxruntime path. It is an adversarial pattern: no real content, nothing a person
would recognise as anything.

Why: the safety tests run offline and need an image the classifier is certain is NSFW, to show the
detector flags it (and that flagged images get treated); no explicit image belongs in a repository.

How it works: the ONNX model is converted to torch with onnx2torch; NudeNet's preprocessing is
reproduced exactly (our detector hands it a BGR array, NudeNet's cvtColor(COLOR_RGBA2BGR) swaps it
back to RGB, blobFromImage(swapRB=True) swaps again: the model sees B, G, R scaled by 1/255; a
320x320 image is neither padded nor resampled), and the best explicit-class score over all anchors
(output 1x22x2100: 4 box values, then 18 class scores) is maximised. The image is a low-resolution
grid upsampled bilinearly (a smooth pattern compresses well), then quantised to uint8 and checked
with the real detector.

Re-run (the extra packages stay out of the project's venv and pyproject):

    .venv/bin/python -m pip install --target /tmp/probe_deps --no-deps onnx onnx2torch ml_dtypes
    PYTHONPATH=/tmp/probe_deps .venv/bin/python scripts/make_nsfw_probe.py [output.png]

It needs torch (the project's CPU build) and takes a few minutes on a CPU. onnx2torch imports
torchvision only for NMS/RoIAlign converters this model does not use; if torchvision cannot be
imported, a stub stands in for it.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.safety import EXPLICIT, detector  # noqa: E402

SIZE = 320
GRID = 80  # the optimised grid, upsampled 4x to SIZE
TARGET = 0.97  # aim above the 0.9 the tests need, so quantisation cannot drop it below
LABELS = [
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
]  # nudenet/nudenet.py's order
EXPLICIT_IDS = [LABELS.index(label) for label in sorted(EXPLICIT)]


def import_onnx2torch():
    try:
        import torchvision  # noqa: F401
    except Exception:  # a broken or missing torchvision: stub what onnx2torch imports
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.roi_align = ops.nms = ops.box_convert = None
        stub.ops = ops
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    import onnx
    import onnx2torch

    return onnx, onnx2torch


def load_model() -> torch.nn.Module:
    import nudenet

    onnx, onnx2torch = import_onnx2torch()
    model = onnx2torch.convert(onnx.load(os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"))).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_input(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in 0..255 -> the blob NudeNet feeds its model: (1, 3, H, W) BGR in 0..1."""
    return (rgb.flip(0) / 255.0).unsqueeze(0)


def check_preprocessing(model: torch.nn.Module) -> None:
    """Our model_input must equal what NudeNet builds from the array our detector hands it."""
    from nudenet.nudenet import _read_image

    rgb = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    blob = _read_image(np.ascontiguousarray(rgb[:, :, ::-1]), SIZE)[0]
    ours = model_input(torch.from_numpy(rgb).permute(2, 0, 1).float()).numpy()
    assert blob.shape == ours.shape and np.abs(blob - ours).max() < 1e-6, "preprocessing differs from NudeNet's"


def render(latent: torch.Tensor) -> torch.Tensor:
    """The (1, 3, GRID, GRID) latent -> a (3, SIZE, SIZE) image in 0..255."""
    up = F.interpolate(latent, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return torch.sigmoid(up[0]) * 255.0


def explicit_scores(model: torch.nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    """The explicit-class scores (5, 2100) of every anchor."""
    out = model(model_input(rgb))
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out[0, 4:][EXPLICIT_IDS]


def craft(model: torch.nn.Module, steps: int = 400, seed: int = 0) -> np.ndarray:
    torch.manual_seed(seed)
    latent = (torch.randn(1, 3, GRID, GRID) * 0.5).requires_grad_(True)
    optimiser = torch.optim.Adam([latent], lr=0.05)
    for step in range(steps):
        rgb = render(latent)
        # quantisation noise during the ascent keeps the optimum robust to the uint8 rounding
        scores = explicit_scores(model, rgb + (torch.rand_like(rgb) - 0.5).detach())
        best = scores.max()
        # ascend the log-odds of the best explicit detection (a sigmoid output saturates)
        loss = -torch.logit(best.clamp(1e-6, 1 - 1e-6))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 20 == 0:
            print(f"step {step}: best explicit score {best.item():.4f}", flush=True)
        if best.item() >= TARGET and step >= 50:
            with torch.no_grad():
                rounded = render(latent).round()
                if explicit_scores(model, rounded).max().item() >= TARGET:
                    break
    with torch.no_grad():
        return render(latent).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module="onnx2torch")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "nsfw_probe.png"
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = load_model()
    check_preprocessing(model)
    pixels = craft(model)
    image = Image.fromarray(pixels, "RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    score = detector().nsfw_score(Image.open(out))  # the real path: PNG -> PIL -> NudeNet -> onnxruntime
    print(f"{out}: {out.stat().st_size} bytes, nsfw_score {score:.4f}")
    if score < 0.9:
        sys.exit("the probe scores below 0.9 through the real detector; re-run with another seed or more steps")


if __name__ == "__main__":
    main()
