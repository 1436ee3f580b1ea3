"""The weights store: one folder per model id under a root (the data dir locally, the Volume on
Modal), each with a `manifest.json` that says what the model is and whether it is usable.

A load first writes a manifest with status `loading` (so verify_model can answer at once), then
builds the payload in a temporary folder beside it and moves it in; the manifest turns `ready`
last, with one atomic replace. A crash at any point leaves `loading` (turned `failed` on the next
start) or `failed`, never a half model that looks ready.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from models.errors import ApiError, BadInput, Conflict, NotFound

MANIFEST = "manifest.json"
MODEL_WAIT_SECONDS = 3600  # longest a job waits for a model it needs to finish loading
READY, LOADING, FAILED = "ready", "loading", "failed"

# what a folder holds; these are full diffusers pipelines a generation can run on ("flux_kontext": a
# Flux.1 Kontext instruction-editing model; "flux_fill": a Flux.1 Fill inpainting model; "qwen_edit":
# a Qwen-Image-Edit model)
PIPELINE_CATEGORIES = ("stable_diffusion", "stable_diffusion_xl", "inpaint", "flux", "flux_kontext", "flux_fill", "sd3",
                       "qwen", "qwen_edit", "zimage", "flux2", "flux2_klein")
# the pipelines that only repaint a masked area: the inpaint endpoint (or a masked ControlNet) only
INPAINT_ONLY_CATEGORIES = ("inpaint", "flux_fill")
CATEGORY_TITLES = {"stable_diffusion": "Stable Diffusion", "stable_diffusion_xl": "SDXL", "inpaint": "SD inpainting",
                   "flux": "Flux.1", "flux_kontext": "Flux.1 Kontext", "flux_fill": "Flux.1 Fill", "sd3": "SD3 / SD3.5",
                   "qwen": "Qwen-Image", "qwen_edit": "Qwen-Image-Edit", "zimage": "Z-Image", "flux2": "Flux.2 dev",
                   "flux2_klein": "Flux.2 Klein"}
ADAPTER_CATEGORIES = ("lora", "embeddings", "vae", "controlnet", "ip_adapter")
# the ControlNet classes a diffusers folder may hold -> the model family it fits ("": a UNet ControlNet
# for SD 1.x / 2.x or SDXL, told apart by its cross-attention width)
CONTROLNET_FAMILIES = {"ControlNetModel": "", "FluxControlNetModel": "flux", "SD3ControlNetModel": "sd3",
                       "QwenImageControlNetModel": "qwen", "ZImageControlNetModel": "zimage"}
# "preprocessor": a network that turns an image into a ControlNet hint (a depth estimator, ...)
# "upscaler" / "face_restorer": super-resolution and face-restoration networks (spandrel);
# "motion_adapter": an AnimateDiff motion module for text2video; "translator": a transformers translation
# model (sequence to sequence, any language to English: multi_lingual); "segmenter": a text-prompted segmentation
# model (CLIPSeg through transformers: mask_creator); "image_to_video": a Stable Video Diffusion pipeline
# (img2video; a pipeline of its own kind that no image endpoint runs); "object_remover": a LaMa-class
# inpainting network (spandrel: an image and its mask in, the hole filled; object_removal);
# "background_remover": a salient-object segmentation network as one ONNX file (U²-Net, run through rembg on
# onnxruntime: removebg_mask)
CATEGORIES = (*PIPELINE_CATEGORIES, *ADAPTER_CATEGORIES, "preprocessor", "upscaler", "face_restorer", "motion_adapter",
              "translator", "segmenter", "image_to_video", "object_remover", "background_remover")

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
    # "sd", "sdxl", "flux", "sd3", "qwen", "zimage", "flux2" or "flux2_klein" for pipelines; the text-embedding width (cross-attention dim) the weights
    # were made for, so a LoRA / ControlNet / embedding is never applied to a model it cannot fit
    family: str = ""
    context_dim: int = 0
    # the stored pipeline class of a transformer family's model (model_index.json's `_class_name`): what it
    # takes beyond its category (QwenImageEditPlusPipeline: several images); "" for the others
    pipeline: str = ""
    file: str = ""  # the payload file of single-file kinds (lora, embeddings, upscalers, background removers), relative to the folder
    scale: int = 0  # upscalers: the network's own scale factor
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    size_bytes: int = 0
    message: str | None = None

    @classmethod
    def from_json(cls, text: str) -> ModelEntry:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def version(self) -> tuple[str, float]:
        """Changes whenever the model id is deleted and loaded again: caches key on it."""
        return (self.model_id, self.loaded_at)


@dataclass
class LoadRequest:
    """What to load: `category` None means a pipeline whose family is detected."""

    model_id: str
    source: str
    category: str | None
    precision: str | None = None  # None: the setting store_precision
    upcast_attention: bool = False
    webhook: str | None = None
    base_model: str | None = None  # a single transformer file's base model: the rest of its pipeline

    def entry(self) -> ModelEntry:
        """The manifest a load starts with; the format and family are filled in once verified."""
        return ModelEntry(
            model_id=self.model_id,
            category=self.category or "stable_diffusion",
            source=self.source,
            format="",
            precision=self.precision,
        )


class WeightsStore:
    def __init__(self, root: Path, on_write: Callable[[], None] | None = None,
                 refresh: Callable[[], None] | None = None, refresh_seconds: float = 2.0):
        """On Modal `root` is a Volume several containers share: `on_write` (Volume.commit) runs
        after every manifest change or delete so the others can see it, and `refresh`
        (Volume.reload) runs before reads, at most every `refresh_seconds`."""
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.on_write, self.refresh, self.refresh_seconds = on_write, refresh, refresh_seconds
        self._refreshed = 0.0

    def folder(self, model_id: str) -> Path:
        return self.root / validate_model_id(model_id)

    def get(self, model_id: str) -> ModelEntry | None:
        self._refresh()
        manifest = self.folder(model_id) / MANIFEST
        try:
            return ModelEntry.from_json(manifest.read_text())
        except (OSError, ValueError, TypeError):
            return None

    def require(self, model_id: str, categories: tuple[str, ...], field: str = "model_id") -> ModelEntry:
        """The entry of a model that a request (or a job) uses as `field`: one read of its manifest,
        checked to exist, be ready and be of one of `categories`; else the error that says so. Handlers
        and the engine ask here, once per model, and pass the entry on."""
        entry = self.get(validate_model_id(model_id, field))
        if entry is None:
            raise NotFound(
                f"Model id not found: {model_id} ({field})",
                tip="get_all_models lists the models on this server; load_model adds one.",
            )
        if entry.status != READY:
            raise BadInput(f"{field}: model {model_id} is not ready ({entry.status}); check it with verify_model")
        if entry.category not in categories:
            raise BadInput(
                f"{field}: model {model_id} is a {entry.category} model, not {' or '.join(categories)}",
                tip="get_all_models shows each model's category.",
            )
        return entry

    def wait_ready(self, model_ids: list[str], timeout: float = MODEL_WAIT_SECONDS, poll: float = 0.2) -> None:
        """Wait for models a job needs that were still loading when it was queued (fetched on first
        use); an error naming the model when its load failed, it was deleted or it takes too long."""
        deadline = time.monotonic() + timeout
        for model_id in model_ids:
            while (entry := self.get(model_id)) is not None and entry.status == LOADING:
                if time.monotonic() > deadline:
                    raise ApiError(f"{model_id} is still loading; try again later")
                time.sleep(poll)
            if entry is None or entry.status == FAILED:
                reason = entry.message if entry is not None else "it was deleted"
                raise ApiError(f"{model_id} could not be loaded: {reason}")

    def list(self) -> list[ModelEntry]:
        self._refresh()
        entries = []
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            try:
                entries.append(ModelEntry.from_json(manifest.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a foreign or damaged folder is not a model
        return entries

    def first_ready(self, categories: tuple[str, ...], family: str | None = None) -> ModelEntry | None:
        """The earliest loaded ready model of these categories (and family, when given): what a
        model-family route runs, and where a single Flux / SD3 file takes the rest of its pipeline."""
        ready = [e for e in self.list() if e.status == READY and e.category in categories
                 and (family is None or e.family == family)]
        return min(ready, key=lambda e: e.loaded_at, default=None)

    # --- loading in steps: begin -> (build in a temp folder) -> finish | fail

    def begin(self, entry: ModelEntry) -> ModelEntry:
        """Claim `entry.model_id` with a `loading` manifest; an existing id is a conflict."""
        folder = self.folder(entry.model_id)
        try:
            folder.mkdir()
        except FileExistsError:
            existing = self.get(entry.model_id)
            state = f"is {existing.status}" if existing else "exists"
            raise Conflict(
                f"Model id {entry.model_id} already {state} on this server",
                tip="Choose another model_id, or delete_model it first to replace it.",
            ) from None
        entry.status, entry.message, entry.loaded_at = LOADING, None, time.time()
        self._write_manifest(folder, entry)
        return entry

    def temp_dir(self, model_id: str) -> Path:
        """A scratch folder on the same file system as the store (so the final move is a rename)."""
        return Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{model_id}-"))

    def finish(self, entry: ModelEntry, built: Path, started: float) -> ModelEntry:
        """Move the files of `built` into the model's folder, then mark it ready."""
        folder = self.folder(entry.model_id)
        for item in built.iterdir():
            if item.name != MANIFEST:
                item.rename(folder / item.name)
        entry.status, entry.message = READY, None
        if not entry.context_dim:
            entry.context_dim = _context_dim(folder)
        entry.loaded_at = time.time()
        entry.load_seconds = round(entry.loaded_at - started, 3)
        entry.size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        self._write_manifest(folder, entry)
        shutil.rmtree(built, ignore_errors=True)
        return entry

    def fail(self, entry: ModelEntry, message: str) -> ModelEntry:
        """Mark a load failed: the folder keeps only the manifest with the reason."""
        folder = self.folder(entry.model_id)
        for item in folder.iterdir():
            if item.name != MANIFEST:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        entry.status, entry.message = FAILED, message
        self._write_manifest(folder, entry)
        return entry

    def install(self, model_id: str, category: str, build: Callable[[Path], None], **manifest) -> ModelEntry:
        """begin + build(temp folder) + finish in one go (built-in models)."""
        entry = self.begin(ModelEntry(model_id=model_id, category=category, **manifest))
        started = time.time()
        built = self.temp_dir(model_id)
        try:
            build(built)
            return self.finish(entry, built, started)
        except BaseException as exc:
            self.fail(entry, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            shutil.rmtree(built, ignore_errors=True)

    def delete(self, model_id: str) -> None:
        shutil.rmtree(self.folder(model_id))
        self._written()

    def recover(self, message: str) -> list[str]:
        """After a restart: loads that were running are failed, scratch folders removed."""
        for scratch in self.root.glob(".tmp-*"):
            shutil.rmtree(scratch, ignore_errors=True)
        failed = []
        for entry in self.list():
            if entry.status == LOADING:
                self.fail(entry, message)
                failed.append(entry.model_id)
        return failed

    def remove_stale_scratch(self) -> tuple[int, int]:
        """Delete download/build scratch folders no running load owns: (folders, bytes freed)."""
        removed = freed = 0
        for scratch in self.root.glob(".tmp-*"):
            model_id = scratch.name[len(".tmp-"):].rpartition("-")[0]
            entry = self.get(model_id) if _MODEL_ID.match(model_id or "-") else None
            if entry is not None and entry.status == LOADING:
                continue
            freed += sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
            shutil.rmtree(scratch, ignore_errors=True)
            removed += 1
        return removed, freed

    # --- reading model facts without loading the weights

    def default_scheduler(self, model_id: str) -> str:
        """The scheduler class a pipeline model was saved with."""
        config = self.folder(model_id) / "scheduler" / "scheduler_config.json"
        return json.loads(config.read_text())["_class_name"]

    def payload(self, model_id: str) -> Path:
        """The weights of a model: its single file (lora, embeddings) or its folder."""
        entry = self.get(model_id)
        folder = self.folder(model_id)
        return folder / entry.file if entry and entry.file else folder

    def archive(self, model_id: str):
        """The model's files (not its manifest) as a streamed tar: an iterator of byte chunks."""
        folder = self.folder(model_id)
        read_end, write_end = os.pipe()

        def write() -> None:
            try:
                with os.fdopen(write_end, "wb") as pipe, tarfile.open(fileobj=pipe, mode="w|") as tar:
                    for item in sorted(folder.iterdir()):
                        if item.name != MANIFEST:
                            tar.add(item, arcname=item.name)
            except OSError:  # the reader went away
                pass

        threading.Thread(target=write, daemon=True, name=f"archive-{model_id}").start()
        with os.fdopen(read_end, "rb") as pipe:
            while chunk := pipe.read(1 << 20):
                yield chunk

    def _write_manifest(self, folder: Path, entry: ModelEntry) -> None:
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(asdict(entry), indent=2))
        os.replace(tmp, folder / MANIFEST)
        self._written()

    def _written(self) -> None:
        if self.on_write is not None:
            self.on_write()

    def _refresh(self) -> None:
        if self.refresh is not None and time.monotonic() - self._refreshed >= self.refresh_seconds:
            self._refreshed = time.monotonic()
            try:
                self.refresh()
            except Exception:  # a reload can fail while a file is open; the next read tries again
                pass


def _context_dim(folder: Path) -> int:
    """The cross-attention width a pipeline (unet/) or ControlNet folder was built for, or 0."""
    for config in (folder / "unet" / "config.json", folder / "config.json"):
        if config.is_file():
            return int(json.loads(config.read_text()).get("cross_attention_dim") or 0)
    return 0
