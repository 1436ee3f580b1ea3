"""Super resolution and face restoration with spandrel networks (Real-ESRGAN, ESRGAN, Compact,
SwinIR, HAT, ... and GFPGAN).

- `prepare_upscaler`: a downloaded weights file -> the store's `model.safetensors`, verified to be
  the claimed kind (an "upscaler" is a super-resolution net, a "face_restorer" a face net).
- `load_upscaler`: that file -> an eval-mode spandrel `ImageModelDescriptor` on the device.
- `upscale`: a PIL image through an upscaler, tile by tile into a preallocated output, then
  resampled (Lanczos) from the network's own scale to the requested one.
- `restore_faces`: face boxes -> square crops through a face restorer, pasted back with a
  feathered edge; pixels outside the crops are untouched.

spandrel detects the architecture and its hyperparameters from the state dict alone, so the
store keeps only tensors: no pickles, no configs. Its image convention is NCHW float in [0, 1]
(`descriptor(image)` pads the input to the model's size requirements and crops the output back).
GFPGAN is the exception, see `_run_face_net`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

FACE_SIZE = 512  # the input side of face restorers that state no minimum (GFPGAN and RestoreFormer: 512)
FACE_MARGIN = 1.6  # a face crop's side, in larger face-box sides: the restorers are trained on loose crops
FACE_FEATHER = 0.12  # the pasted face fades into the image over this fraction of the crop side


# --------------------------------------------------------------------------- super resolution


def upscale(descriptor: ImageModelDescriptor, image: Image.Image, scale: float, tile: int, overlap: int) -> Image.Image:
    """`image` (converted to RGB) enlarged `scale` times by the network, returned as RGB.

    The network runs on tiles: cores of `tile` x `tile` input pixels, each read with `overlap`
    more pixels on every side (clipped at the image border) so the seams see real context; each
    tile's output is cropped to its core and written into a preallocated uint8 array of the
    network-scale size. Memory is bounded by the tile size, not the image size. `tile` <= 0, or
    an architecture that tiles internally, runs the whole image at once. Size requirements
    (a minimum side, a multiple of 4 for pixel-unshuffle nets, ...) are met by the descriptor
    call: it reflect-pads each tile and crops the output back; tile and overlap are rounded up to
    the required multiple so every tile sits on the grid the whole image would.

    The result, at the network's scale, is then resampled with Lanczos to
    (round(w * scale), round(h * scale)) when that differs: any scale from an x2 or x4 network.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    from spandrel import ModelTiling

    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    factor = int(descriptor.scale)
    if tile <= 0 or descriptor.tiling == ModelTiling.INTERNAL:
        tile = max(width, height)
    # tiles start on multiples of `multiple_of` (4 for the pixel-unshuffle x2 RRDB): each window is
    # then unshuffled on the same 2x2 grid as the whole image would be, and seams do not shift it
    step = descriptor.size_requirements.multiple_of
    tile, overlap = _round_up(tile, step), _round_up(max(0, overlap), step)
    output = np.empty((height * factor, width * factor, 3), dtype=np.uint8)
    with torch.inference_mode():
        for top in range(0, height, tile):
            bottom = min(top + tile, height)
            for left in range(0, width, tile):
                right = min(left + tile, width)
                y0, x0 = max(0, top - overlap), max(0, left - overlap)
                y1, x1 = min(height, bottom + overlap), min(width, right + overlap)
                result = _to_array(descriptor(_to_tensor(pixels[y0:y1, x0:x1], descriptor)))
                core = result[(top - y0) * factor:(bottom - y0) * factor, (left - x0) * factor:(right - x0) * factor]
                output[top * factor:bottom * factor, left * factor:right * factor] = core
    enlarged = Image.fromarray(output)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if enlarged.size != target:
        enlarged = enlarged.resize(target, Image.Resampling.LANCZOS)
    return enlarged


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _to_tensor(pixels: np.ndarray, descriptor) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW in [0, 1], on the model's device and dtype."""
    tensor = torch.from_numpy(np.array(pixels)).to(descriptor.device)  # a copy: PIL's arrays are read-only
    return tensor.permute(2, 0, 1).unsqueeze(0).to(descriptor.dtype).div_(255)


def _to_array(tensor: torch.Tensor) -> np.ndarray:
    """1x3xHxW in [0, 1] -> HxWx3 uint8."""
    scaled = tensor[0].float().clamp(0, 1).mul_(255).round_().to(torch.uint8)
    return scaled.permute(1, 2, 0).cpu().numpy()


# --------------------------------------------------------------------------- face restoration


def restore_faces(
    restorer: ImageModelDescriptor, image: Image.Image, boxes: Iterable[tuple[int, int, int, int]]
) -> Image.Image:
    """`image` (RGB) with each face box (x, y, w, h) restored by `restorer`, one after another.

    Each face is a square crop (`face_square`), resized to the restorer's input size (512 for
    GFPGAN), run through it, resized back and blended in with a mask that is 1 inside and fades
    to 0 at the crop's edge: no seam, and every pixel outside the crops stays exactly the same.
    """
    pixels = np.array(image.convert("RGB"))  # a writable copy
    height, width = pixels.shape[:2]
    size = restorer.size_requirements.minimum or FACE_SIZE
    with torch.inference_mode():
        for box in boxes:
            square = face_square(box, width, height)
            if square is None:
                continue
            left, top, side = square
            crop = pixels[top:top + side, left:left + side]
            face = Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS)
            restored = _to_array(_run_face_net(restorer, _to_tensor(np.asarray(face), restorer)))
            restored = Image.fromarray(restored).resize((side, side), Image.Resampling.LANCZOS)
            restored = np.asarray(restored, dtype=np.float32)
            mask = _feather_mask(side)[:, :, None]
            blended = crop.astype(np.float32) * (1 - mask) + restored * mask
            pixels[top:top + side, left:left + side] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def face_square(box: Iterable[float], width: int, height: int) -> tuple[int, int, int] | None:
    """(left, top, side) of the square crop restored for a face box (x, y, w, h): centred on the
    box, FACE_MARGIN times its larger side, shifted (and if need be shrunk) to fit the image.
    None for an empty box."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0 or width <= 0 or height <= 0:
        return None
    side = min(max(1, round(FACE_MARGIN * max(w, h))), width, height)
    left = min(max(0, round(x + w / 2 - side / 2)), width - side)
    top = min(max(0, round(y + h / 2 - side / 2)), height - side)
    return int(left), int(top), int(side)


def _run_face_net(restorer, face: torch.Tensor) -> torch.Tensor:
    """A face restorer on a 1x3xSxS [0, 1] tensor, returning [0, 1].

    GFPGAN works in [-1, 1]; spandrel's descriptor call would hand it [0, 1] and clamp its output
    to [0, 1], so the module is called directly (as GFPGAN's own inference does), with the
    decoder's stored noise instead of fresh random noise: the same input gives the same face.
    Other face restorers (RestoreFormer) normalise inside their descriptor call.
    """
    if restorer.architecture.id == "GFPGAN":
        output = restorer.model(face * 2 - 1, return_rgb=False, randomize_noise=False)[0]
        return (output.clamp(-1, 1) + 1) / 2
    return restorer(face)


def _feather_mask(side: int) -> np.ndarray:
    """side x side float32: 0 on the outermost pixels, rising smoothly to 1 over FACE_FEATHER of the side."""
    ramp = max(1, math.ceil(side * FACE_FEATHER))
    edge = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32)  # distance to the nearer edge
    weight = np.clip(edge / ramp, 0, 1)
    weight = weight * weight * (3 - 2 * weight)  # smoothstep: no visible band where the ramp starts
    return np.minimum(weight[:, None], weight[None, :])
