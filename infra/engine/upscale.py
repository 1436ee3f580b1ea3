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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from infra.engine import LOAD_LOCK

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

UPSCALER_FILE = "model.safetensors"
PURPOSES = {"upscaler": "SR", "face_restorer": "FaceSR"}  # store category -> spandrel purpose
FACE_SIZE = 512  # the input side of face restorers that state no minimum (GFPGAN and RestoreFormer: 512)
FACE_MARGIN = 1.6  # a face crop's side, in larger face-box sides: the restorers are trained on loose crops
FACE_FEATHER = 0.12  # the pasted face fades into the image over this fraction of the crop side


# --------------------------------------------------------------------------- importing spandrel


def import_spandrel():
    """The spandrel module (imported on first use; it imports torchvision, which the hook in
    `infra.engine` makes importable beside a CPU torch)."""
    import spandrel

    return spandrel


# (the file readers are checkpoints' own: the same safety rules and error messages for every upload)
from infra.engine.checkpoints import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    _read_safetensors,
    _read_torch_file,
)

# --------------------------------------------------------------------------- store: prepare and load


def prepare_upscaler(category: str, path: Path, out: Path) -> dict:
    """Verify that the weights file `path` is a `category` ("upscaler" or "face_restorer") network
    and write it as `out/model.safetensors`. Returns the manifest facts: category, format, file,
    family (spandrel's architecture id, e.g. "ESRGAN") and scale (the network's own factor)."""
    spandrel = import_spandrel()
    path = Path(path)
    state = _read_weights(spandrel, path)
    with LOAD_LOCK:
        descriptor = _detect(spandrel, state, category)
    _check_kind(spandrel, descriptor, category)
    facts = _facts(descriptor)
    tensors = {key: value.contiguous().clone() for key, value in state.items() if isinstance(value, torch.Tensor)}
    del descriptor, state
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / UPSCALER_FILE)
    del tensors
    # the store keeps the tensors only: the saved file must be detected as the same network again
    with LOAD_LOCK:
        saved = _detect(spandrel, spandrel.ModelLoader().load_state_dict_from_file(out / UPSCALER_FILE), category)
    if _facts(saved) != facts:
        raise CheckpointError(
            f"the weights were recognised as {_describe(facts)} but their tensors alone load as "
            f"{_describe(_facts(saved))}; re-save the model as a plain state dict in .safetensors"
        )
    return {"category": category, "format": "safetensors", "file": UPSCALER_FILE,
            "family": facts["family"], "scale": facts["scale"]}


def load_upscaler(path: str | Path, device: str | torch.device) -> ImageModelDescriptor:
    """The store's `model.safetensors` as an eval-mode spandrel descriptor on `device`: fp16 on
    CUDA where the architecture supports it, fp32 otherwise."""
    spandrel = import_spandrel()
    device = torch.device(device)
    with LOAD_LOCK:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise CheckpointError(f"{Path(path).name} is not an image-to-image network ({descriptor.purpose})")
    descriptor.to(device)
    if device.type == "cuda" and descriptor.supports_half:
        descriptor.half()
    return descriptor.eval()


def _read_weights(spandrel, path: Path) -> dict:
    """The file's state dict, unwrapped the way spandrel does it (Real-ESRGAN / GFPGAN releases
    store {"params_ema": sd} or {"params": sd}). Pickles are read with `weights_only` and
    .pt files are never run as TorchScript (spandrel's own loader would try)."""
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"unsupported weights file type {path.suffix or '(no extension)'!r}: "
            f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    raw = _read_safetensors(path) if suffix == ".safetensors" else _read_torch_file(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"the {suffix} file holds a {type(raw).__name__}, not a dictionary of weights")
    state = spandrel.canonicalize_state_dict(raw)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"the {suffix} file contains no weight tensors")
    return state


def _detect(spandrel, state: dict, category: str):
    """spandrel's architecture detection and model construction, its failures as CheckpointError."""
    what = "super-resolution" if category == "upscaler" else "face restoration"
    try:
        return spandrel.MAIN_REGISTRY.load(state)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(
            f"the file is not a {what} model spandrel recognises (supported: Real-ESRGAN / ESRGAN, "
            "Compact, SwinIR, HAT, DAT, SPAN, ... upscalers; GFPGAN and RestoreFormer face restorers)"
        ) from None
    except Exception as exc:  # a recognised architecture whose tensors do not fit it
        message = str(exc)
        message = message if len(message) <= 300 else message[:300] + "..."
        raise CheckpointError(
            f"the file looks like a {what} model spandrel knows but its weights do not load: "
            f"{type(exc).__name__}: {message}"
        ) from exc


def _check_kind(spandrel, descriptor, category: str) -> None:
    arch = descriptor.architecture.id
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise CheckpointError(
            f"the file is a {arch} {descriptor.purpose.lower()} model; "
            "this server loads only upscalers and face restorers"
        )
    purpose = descriptor.purpose
    if purpose == PURPOSES[category]:
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise CheckpointError(
                f"the {arch} model works on {descriptor.input_channels}-channel images "
                f"(output {descriptor.output_channels} channels); this server runs RGB models only"
            )
        return
    if purpose == "FaceSR":
        raise CheckpointError(
            f"the file is a {arch} face restoration model, not an upscaler: load it with model_category face_restorer"
        )
    if purpose == "SR" and category == "face_restorer":
        raise CheckpointError(
            f"the file is a {arch} x{descriptor.scale} super-resolution model, not a face restorer: "
            "load it with model_category upscaler"
        )
    if purpose == "Restoration":
        raise CheckpointError(
            f"the file is a {arch} 1x image restoration model (denoise / deblur / decompress), which does not "
            f"enlarge images; model_category {category} needs a "
            + ("super-resolution model (x2, x4, ...)" if category == "upscaler" else "face restoration model (GFPGAN)")
        )
    raise CheckpointError(f"the file is a {arch} {purpose} model, not a {category.replace('_', ' ')}")


def _facts(descriptor) -> dict:
    return {"family": descriptor.architecture.id, "scale": int(descriptor.scale), "purpose": descriptor.purpose,
            "tags": list(descriptor.tags)}


def _describe(facts: dict) -> str:
    tags = f" ({', '.join(facts['tags'])})" if facts["tags"] else ""
    return f"{facts['family']} x{facts['scale']}{tags}"


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
