"""The weights store: one folder per model id under a root (the data dir locally, the Volume on
Modal), each with a `manifest.json` that says what the model is and whether it is usable.

Models are built or downloaded into a temporary folder and renamed into place, so a crash half
way never leaves a folder that looks ready.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from models.errors import BadInput

MANIFEST = "manifest.json"
READY, LOADING, FAILED = "ready", "loading", "failed"
# categories whose folder is a full diffusers pipeline a generation can run on
PIPELINE_CATEGORIES = ("stable_diffusion", "stable_diffusion_xl", "inpaint")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_model_id(model_id: str, field: str = "model_id") -> str:
    if not _MODEL_ID.match(model_id) or ".." in model_id:
        raise BadInput(
            f"{field} {model_id!r} is not a valid model id",
            tip="Use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/' or '..').",
        )
    return model_id


@dataclass
class ModelEntry:
    model_id: str
    category: str
    status: str = READY
    source: str = ""
    format: str = "diffusers"
    precision: str = "fp32"
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    size_bytes: int = 0
    message: str | None = None


class WeightsStore:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, model_id: str) -> Path:
        return self.root / validate_model_id(model_id)

    def get(self, model_id: str) -> ModelEntry | None:
        manifest = self.folder(model_id) / MANIFEST
        if not manifest.is_file():
            return None
        return ModelEntry(**json.loads(manifest.read_text()))

    def list(self) -> list[ModelEntry]:
        entries = []
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            try:
                entries.append(ModelEntry(**json.loads(manifest.read_text())))
            except (ValueError, TypeError):
                continue  # a foreign or damaged folder is not a model
        return entries

    def install(self, model_id: str, category: str, build: Callable[[Path], None], **manifest) -> ModelEntry:
        """Run `build(folder)` into a temporary folder, then move the result into place."""
        target = self.folder(model_id)
        started = time.time()
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{model_id}-"))
        try:
            build(tmp)
            entry = ModelEntry(
                model_id=model_id,
                category=category,
                loaded_at=time.time(),
                load_seconds=round(time.time() - started, 3),
                size_bytes=sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
                **manifest,
            )
            (tmp / MANIFEST).write_text(json.dumps(asdict(entry), indent=2))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            return entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def default_scheduler(self, model_id: str) -> str:
        """The scheduler class a pipeline model was saved with (read without loading it)."""
        config = self.folder(model_id) / "scheduler" / "scheduler_config.json"
        return json.loads(config.read_text())["_class_name"]
