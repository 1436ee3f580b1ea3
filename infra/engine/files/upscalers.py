"""Super-resolution, face-restoration and LaMa-class inpainting networks (spandrel) in the weights
store: a downloaded weights file verified to be the claimed kind and saved as tensors only
(`prepare_upscaler`), and loaded as an eval-mode descriptor (`load_upscaler`). Running them:
`infra.engine.upscale`; the inpainting ones (category object_remover): `DiffusersEngine.remove_object`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from infra.engine import LOAD_LOCK

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

UPSCALER_FILE = "model.safetensors"
PURPOSES = {"upscaler": "SR", "face_restorer": "FaceSR", "object_remover": "Inpainting"}  # store category -> spandrel purpose
PURPOSE_WORDS = {"SR": "super-resolution", "FaceSR": "face restoration", "Restoration": "image restoration"}


# --------------------------------------------------------------------------- importing spandrel


def import_spandrel():
    """The spandrel module (imported on first use; it imports torchvision, which the hook in
    `infra.engine` makes importable beside a CPU torch)."""
    import spandrel

    return spandrel


# (the file readers are checkpoints' own: the same safety rules and error messages for every upload)
from infra.engine.files.checkpoints import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    _read_safetensors,
    _read_torch_file,
)

# --------------------------------------------------------------------------- store: prepare and load


def prepare_upscaler(category: str, path: Path, out: Path) -> dict:
    """Verify that the weights file `path` is a `category` ("upscaler", "face_restorer" or "object_remover") network
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


def load_upscaler(path: str | Path, device: str | torch.device, inpainting: bool = False) -> ImageModelDescriptor:
    """The store's `model.safetensors` as an eval-mode spandrel descriptor on `device`: fp16 on
    CUDA where the architecture supports it, fp32 otherwise. `inpainting`: a masked-image network
    (LaMa: image and mask in), else an image-to-image one."""
    spandrel = import_spandrel()
    device = torch.device(device)
    with LOAD_LOCK:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    wanted = spandrel.MaskedImageModelDescriptor if inpainting else spandrel.ImageModelDescriptor
    if not isinstance(descriptor, wanted):
        what = "an inpainting" if inpainting else "an image-to-image"
        raise CheckpointError(f"{Path(path).name} is not {what} network ({descriptor.purpose})")
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
    what = {"upscaler": "super-resolution", "face_restorer": "face restoration"}.get(category, "LaMa-class inpainting")
    try:
        return spandrel.MAIN_REGISTRY.load(state)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(
            f"the file is not a {what} model spandrel recognises (supported: Real-ESRGAN / ESRGAN, "
            "Compact, SwinIR, HAT, DAT, SPAN, ... upscalers; GFPGAN and RestoreFormer face restorers; LaMa inpainting)"
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
    if category == "object_remover":
        if not isinstance(descriptor, spandrel.MaskedImageModelDescriptor) or descriptor.output_channels != 3:
            kind = PURPOSE_WORDS.get(descriptor.purpose, descriptor.purpose.lower())
            raise CheckpointError(f"the file is a {arch} {kind} model; model_category "
                                  "object_remover needs an RGB inpainting network (LaMa) that takes an image and a mask")
        return
    if isinstance(descriptor, spandrel.MaskedImageModelDescriptor):
        raise CheckpointError(f"the file is a {arch} inpainting model: load it with model_category object_remover")
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise CheckpointError(
            f"the file is a {arch} {descriptor.purpose.lower()} model; "
            "this server loads only upscalers, face restorers and inpainting networks"
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


