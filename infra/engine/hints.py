"""ControlNet hints derived from the input image (`auto_hint: yes`).

Canny edges need only OpenCV; `tile`, `ip2p` and `qrcode` ControlNets take the image itself;
`inpaint` takes the image with the area to repaint marked (-1, as ControlNet 1.1 inpaint was
trained). `depth` runs a depth-estimation network loaded into the weights store as a
`preprocessor` (passed in as `estimator`). Other kinds need networks this server does not run:
the handler refuses them before a job exists.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

CANNY_THRESHOLDS = (100, 200)


def make_hint(kind: str, image: Image.Image, mask: Image.Image | None = None, estimator=None):
    """The control image for a ControlNet of type `kind`, from the (already resized) input."""
    if kind == "depth":
        depth = estimator(image.convert("RGB"))["depth"].convert("L").resize(image.size, Image.Resampling.BICUBIC)
        return Image.merge("RGB", [depth] * 3)
    if kind == "canny":
        edges = cv2.Canny(np.asarray(image.convert("RGB")), *CANNY_THRESHOLDS)
        return Image.fromarray(np.stack([edges] * 3, axis=-1))
    if kind in ("tile", "ip2p", "qrcode"):
        return image.convert("RGB")
    if kind == "inpaint":
        return inpaint_condition(image, mask)
    raise ValueError(f"no preprocessor for {kind}")  # the handler refuses these first


def inpaint_condition(image: Image.Image, mask: Image.Image | None) -> torch.Tensor:
    """ControlNet 1.1 inpaint hint: pixels in [0, 1], the area to repaint set to -1."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if mask is not None:
        pixels[np.asarray(mask.convert("L")) > 127] = -1.0
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]
