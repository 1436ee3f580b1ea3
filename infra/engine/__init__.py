"""The only package that imports torch and diffusers: the model cache, the pipelines and what
adapts them per job (LoRA, embeddings, ToMe, schedulers, the GPU fast path), upscaling, video, and
`files/` (weights files in and out of the store). Import its modules lazily from the rest (the web
tier must start without torch). May import the catalog, net, infra's leaves and models."""

import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

# architecture config folders shipped with the code (see configs/): real SD families and tiny ones
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# diffusers/accelerate build models under `init_empty_weights`, which patches torch.nn globally:
# a model constructed on another thread meanwhile gets `meta` tensors. Every load in this process
# (pipelines, components, LoRAs, conversions) takes this lock.
LOAD_LOCK = threading.RLock()


# torchao (the `quant` extra), which diffusers imports whenever it is installed, logs at import that its
# CUDA kernel libraries do not load on this machine (a CPU torch, a card they were not built for) and
# that Triton is missing, and torch logs a deprecation of how torchao registers its enums: noise in every
# process that imports diffusers. torchao's own errors still show, and quantizing raises where it cannot.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Errors only from diffusers / transformers, and no progress bars in the server log."""
    import diffusers
    import transformers

    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- torchvision beside a CPU torch
#
# PyPI's torchvision wheel is built for the CUDA torch. Beside the CPU torch build (local runs, CI)
# its C++ ops cannot load, and its import then fails in `_meta_registrations` ("operator
# torchvision::nms does not exist"): it registers fake kernels for `torchvision::nms` and `qnms`
# without checking that the ops exist. transformers imports torchvision whenever it is installed,
# and spandrel (super resolution) needs it. So the first import of torchvision in the process is
# preceded by this: load torchvision's ops the way it would, and only if they cannot load, define
# those two op schemas (schemas only: torchvision.ops.nms still cannot run, and nothing here calls
# it). Where the ops load (the CUDA image on Modal) nothing is defined. Importing this package does
# not import torch; the hook imports it only when torchvision is being imported.

_TORCHVISION_FRAGMENTS: list = []  # the op definitions live as long as their Library object


def _define_missing_torchvision_ops() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return  # not installed: transformers does without it
    import torch

    package = Path(spec.origin).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (package / f"_C{suffix}").is_file():
            try:
                torch.ops.load_library(str(package / f"_C{suffix}"))
                return
            except (OSError, RuntimeError):
                break
    fragment = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            fragment.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_FRAGMENTS.append(fragment)


class _TorchvisionOpsHook(importlib.abc.MetaPathFinder):
    """Runs `_define_missing_torchvision_ops` once, just before torchvision is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" and self in sys.meta_path:
            sys.meta_path.remove(self)
            _define_missing_torchvision_ops()
        return None  # the normal finders import torchvision itself


if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionOpsHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsHook())
