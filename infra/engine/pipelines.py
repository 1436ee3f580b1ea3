"""Pipeline cache: model id -> loaded components, and per-job pipeline variants.

A model is loaded once (weights on the target device); text2img / img2img / inpaint pipelines
are built around the same components with `from_pipe` (milliseconds, no copy), each with its
own fresh scheduler so concurrent jobs never share scheduler state.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from infra.engine.schedulers import build_scheduler
from infra.weights import WeightsStore

VARIANTS = {
    "text2img": StableDiffusionPipeline,
    "img2img": StableDiffusionImg2ImgPipeline,
    "inpaint": StableDiffusionInpaintPipeline,
}


@dataclass
class LoadedModel:
    model_id: str
    pipeline: DiffusionPipeline
    scheduler_config: dict[str, Any]  # pristine, as saved with the model


class PipelineCache:
    def __init__(self, weights: WeightsStore, device: torch.device, dtype: torch.dtype):
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def model(self, model_id: str) -> LoadedModel:
        with self._lock:
            if model_id not in self._models:
                self._models[model_id] = self._load(model_id)
            return self._models[model_id]

    def pipeline(self, model_id: str, task: str, scheduler: str, karras: bool, algorithm: str | None):
        """A pipeline for `task` on the cached components of `model_id`, with a new scheduler."""
        model = self.model(model_id)
        fresh = build_scheduler(scheduler, model.scheduler_config, karras, algorithm)
        pipeline = VARIANTS[task].from_pipe(model.pipeline, scheduler=fresh)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def clear(self) -> None:
        with self._lock:
            self._models.clear()

    def _load(self, model_id: str) -> LoadedModel:
        folder = self.weights.folder(model_id)
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        cls = StableDiffusionInpaintPipeline if unet_config.get("in_channels") == 9 else StableDiffusionPipeline
        pipeline = cls.from_pretrained(
            folder, dtype=self.dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
        ).to(self.device)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return LoadedModel(model_id, pipeline, scheduler_config)
