"""What the model cache holds: a loaded pipeline model and a loaded component, shared by the
cache, the adapters and the video pipelines (so none of them imports another for its types)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


@dataclass
class LoadedModel:
    model_id: str
    version: tuple
    pipeline: DiffusionPipeline
    scheduler_config: dict[str, Any]  # pristine, as saved with the model
    family: str  # "sd" | "sdxl" | "flux" | "sd3" | "qwen" | "zimage" | "flux2" | "flux2_klein" (cache.VARIANTS)
    size_bytes: int
    kind: str = ""  # "edit" (Kontext, Qwen-Image-Edit, Flux.2), "fill" (Flux.1 Fill), "" (the family's plain pipeline)
    # held for a whole job: LoRA / embedding / ToMe state lives in the shared modules
    lock: threading.RLock = field(default_factory=threading.RLock)
    loras: OrderedDict = field(default_factory=OrderedDict)  # lora id -> (version, adapter name)
    # variant -> (ids of the model's components it was built on, the pipeline): see ModelCache.pipeline
    variants: dict = field(default_factory=dict)


@dataclass
class LoadedComponent:
    model_id: str
    version: tuple
    module: torch.nn.Module
    size_bytes: int
