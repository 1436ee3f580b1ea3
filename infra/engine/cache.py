"""Model cache: model id -> loaded weights, and per-job pipeline variants.

A pipeline model is loaded once (weights on the target device); the text2img / img2img / inpaint
/ ControlNet / panorama / self-attention pipelines of a job are built around the same components
with `from_pipe` (no weights copied), each with its own fresh scheduler so concurrent jobs never
share scheduler state. A variant without job-specific parts is built once per model and each job
gets a shallow copy of it with its scheduler (microseconds instead of from_pipe's milliseconds). VAEs and ControlNets are cached the same way, as components.

Entries are keyed by the manifest's version (id + load time): a model deleted and loaded again
under the same id is reloaded, in this process and in any other that shares the store. The cache
is bounded in bytes; the least recently used entries are evicted first.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    Flux2KleinInpaintPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlNetPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    QwenImageControlNetInpaintPipeline,
    QwenImageControlNetPipeline,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
    StableDiffusion3ControlNetInpaintingPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPanoramaPipeline,
    StableDiffusionPipeline,
    StableDiffusionSAGPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    ZImageControlNetInpaintPipeline,
    ZImageControlNetPipeline,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImagePipeline,
)

from infra.catalog.weights import CONTROLNET_FAMILIES, PIPELINE_CATEGORIES, WeightsStore
from infra.engine import LOAD_LOCK
from infra.engine.community.magic_mix import MagicMixPipeline
from infra.engine.protocol import Unsupported
from infra.engine.speed import FastPath, MemorySettings, family_dtype, load_offloaded, prepare
from infra.engine.types import LoadedComponent, LoadedModel

log = logging.getLogger(__name__)

# family -> what a job asks for -> the diffusers pipeline made for it
VARIANTS: dict[str, dict[str, type[DiffusionPipeline]]] = {
    "sd": {
        "text2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
        "controlnet": StableDiffusionControlNetPipeline,
        "controlnet_img2img": StableDiffusionControlNetImg2ImgPipeline,
        "controlnet_inpaint": StableDiffusionControlNetInpaintPipeline,
        "panorama": StableDiffusionPanoramaPipeline,
        "self_attention": StableDiffusionSAGPipeline,
        "magic_mix": MagicMixPipeline,  # image_editing/magic_mix (infra.engine.community)
    },
    "sdxl": {
        "text2img": StableDiffusionXLPipeline,
        "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline,
        "controlnet": StableDiffusionXLControlNetPipeline,
        "controlnet_img2img": StableDiffusionXLControlNetImg2ImgPipeline,
        "controlnet_inpaint": StableDiffusionXLControlNetInpaintPipeline,
    },
    "flux": {  # Flux.1 (dev, schnell, Kontext, Fill and their fine-tunes): a transformer, CLIP + T5, flow matching
        "text2img": FluxPipeline,
        "img2img": FluxImg2ImgPipeline,
        "inpaint": FluxInpaintPipeline,
        "edit": FluxKontextPipeline,  # a Kontext model's img2img: the image edited as the prompt says
        "edit_inpaint": FluxKontextInpaintPipeline,  # a Kontext model's inpaint
        "fill": FluxFillPipeline,  # a Fill model's inpaint (its transformer reads the mask)
        "controlnet": FluxControlNetPipeline,  # (a base Flux.1 model's, with a FluxControlNetModel)
        "controlnet_img2img": FluxControlNetImg2ImgPipeline,
        "controlnet_inpaint": FluxControlNetInpaintPipeline,
    },
    "sd3": {  # Stable Diffusion 3 / 3.5: an MMDiT transformer, two CLIPs + T5, flow matching
        "text2img": StableDiffusion3Pipeline,
        "img2img": StableDiffusion3Img2ImgPipeline,
        "inpaint": StableDiffusion3InpaintPipeline,
        "controlnet": StableDiffusion3ControlNetPipeline,  # (no SD3 ControlNet img2img in diffusers)
        "controlnet_inpaint": StableDiffusion3ControlNetInpaintingPipeline,  # (an inpainting ControlNet's)
    },
    "qwen": {  # Qwen-Image (+ Edit): an MMDiT on a Qwen2.5-VL text encoder, true CFG, flow matching
        "text2img": QwenImagePipeline,
        "img2img": QwenImageImg2ImgPipeline,
        "inpaint": QwenImageInpaintPipeline,
        "edit": QwenImageEditPipeline,  # an Edit model's img2img
        "edit_inpaint": QwenImageEditInpaintPipeline,  # an Edit model's inpaint
        "controlnet": QwenImageControlNetPipeline,
        "controlnet_inpaint": QwenImageControlNetInpaintPipeline,  # (an inpainting ControlNet's)
    },
    "zimage": {  # Z-Image (Turbo): a single-stream DiT on a Qwen3 text encoder
        "text2img": ZImagePipeline,
        "img2img": ZImageImg2ImgPipeline,
        "inpaint": ZImageInpaintPipeline,
        "controlnet": ZImageControlNetPipeline,
        "controlnet_inpaint": ZImageControlNetInpaintPipeline,
    },
    "flux2": {  # Flux.2 dev: a Mistral 3 text encoder; reference images are its input (no strength, no inpaint)
        "text2img": Flux2Pipeline,
        "edit": Flux2Pipeline,
    },
    "flux2_klein": {  # Flux.2 Klein: a Qwen3 text encoder
        "text2img": Flux2KleinPipeline,
        "edit": Flux2KleinPipeline,
        "edit_inpaint": Flux2KleinInpaintPipeline,
    },
}
# the families whose text encoders are CLIP only: A1111's prompt syntax, clip_skip, embeddings,
# ToMe and the classifier-free-guidance cut-off apply to them (infra.engine.prompts, speed)
CLIP_FAMILIES = ("sd", "sdxl")


# pipeline class name prefix -> family, the first that matches (Flux2Klein before Flux2 before Flux)
_FAMILY_PREFIXES = (("Flux2Klein", "flux2_klein"), ("Flux2", "flux2"), ("Flux", "flux"), ("StableDiffusion3", "sd3"),
                    ("QwenImage", "qwen"), ("ZImage", "zimage"))


def pipeline_family(pipeline) -> str:
    """The family of a loaded pipeline (VARIANTS' keys): from its class name for the transformer
    families; "sdxl" for a two-CLIP UNet pipeline, else "sd"."""
    family = class_family(type(pipeline).__name__)
    if family:
        return family
    return "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd"


def class_family(class_name: str) -> str:
    """The transformer family of a pipeline class name (a stored model_index.json's `_class_name`,
    read before loading: it decides the dtype); "" for the UNet families."""
    for prefix, family in _FAMILY_PREFIXES:
        if class_name.startswith(prefix):
            return family
    return ""


# the pipeline classes of a family's special-purpose models -> the model's `kind` (LoadedModel.kind)
# ("edit": img2img edits the image as the prompt says; inpaint runs the family's "edit_inpaint")
PIPELINE_KINDS = {"FluxKontextPipeline": "edit", "FluxFillPipeline": "fill", "QwenImageEditPipeline": "edit",
                  "QwenImageEditPlusPipeline": "edit", "Flux2Pipeline": "edit", "Flux2KleinPipeline": "edit"}
COMPONENTS = {"vae": AutoencoderKL, "controlnet": ControlNetModel}


def module_bytes(*modules) -> int:
    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return total


class ModelCache:
    def __init__(self, weights: WeightsStore, device: torch.device, dtype: torch.dtype,
                 max_bytes: int | Callable[[], int], fast: FastPath | None = None,
                 memory: MemorySettings | None = None):
        """`max_bytes`: the memory budget, or a function read at every load (the setting
        model_cache_mb, which update_server may change). `dtype`: the UNet families' (fp16 on CUDA,
        fp32 on the CPU); a transformer family runs in `speed.family_dtype` (bf16 for fp16)."""
        self.weights = weights
        self.fast = fast  # the GPU fast path (speed.py), applied wherever a pipeline lands on the GPU
        self.memory = memory  # the memory settings (speed.py), applied there too
        self.device = device
        self.dtype = dtype
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LoadedModel | LoadedComponent] = OrderedDict()
        self._lock = threading.Lock()

    # --- lookups (load on a miss)

    def model(self, model_id: str) -> LoadedModel:
        return self._get(model_id, PIPELINE_CATEGORIES, self._load_pipeline)

    def component(self, model_id: str, kind: str):
        """A VAE, ControlNet or motion adapter module, a preprocessor (a transformers pipeline), an
        upscaler / face restorer / object remover (a spandrel model descriptor), or a background
        remover (a rembg session)."""
        return self._get(model_id, (kind,), lambda entry: self._load_component(entry, kind)).module

    def pipeline(self, model: LoadedModel, variant: str, scheduler: str, karras: bool, algorithm: str | None, **parts):
        """A `variant` pipeline on the model's components, with a new scheduler (and `parts`
        such as a VAE or ControlNet swapped in for this job only)."""
        cls = VARIANTS[model.family].get(variant)
        if variant == "edit" and model.kind == "edit":  # an editing model edits with its own class (Qwen-Image-Edit-2509:
            cls = type(model.pipeline)                    # QwenImageEditPlusPipeline, which takes several images)
        if cls is None:
            what = variant.replace("_", " ")
            raise Unsupported(f"{what} is not available for {model.family.upper()} models like {model.model_id}")
        fresh = build_scheduler(scheduler, model.scheduler_config, karras, algorithm)
        if parts:  # a VAE / ControlNet of this job: a pipeline of its own around them
            return _from_pipe(cls, model.pipeline, scheduler=fresh, **parts)
        # the variant is built once per model (and again if a component was swapped); a job gets a shallow
        # copy: its own attributes and config, the same modules, and its own scheduler
        components = tuple(id(c) for c in model.pipeline.components.values())
        with _VARIANTS_LOCK:
            built = model.variants.get(variant)
            if built is None or built[0] != components:
                built = model.variants[variant] = (components, _from_pipe(cls, model.pipeline))
        pipeline = copy.copy(built[1])
        pipeline.scheduler = fresh  # DiffusionPipeline.__setattr__: a new config dict on the copy only
        return pipeline

    def move_to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move every cached model to `device` / `dtype` and load later ones there (a Modal worker
        loads on the CPU for its memory snapshot, then moves to the GPU after the restore)."""
        with self._lock:
            self.device, self.dtype = device, dtype
            for entry in self._entries.values():
                if isinstance(entry, LoadedModel):
                    prepare(entry.pipeline, device, family_dtype(entry.family, device, dtype), self.fast, self.memory)
                elif isinstance(entry.module, torch.nn.Module):
                    entry.module.to(device=device, dtype=dtype)
                elif hasattr(entry.module, "to"):  # spandrel descriptors, transformers pipelines
                    entry.module.to(device)
                elif isinstance(entry.module, tuple):  # a translator, a segmenter: (model, tokenizer / processor)
                    entry.module[0].to(device)

    # --- eviction

    def evict(self, model_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(model_id, None)
        if entry is not None:
            del entry
            _release_memory()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        _release_memory()

    @property
    def loaded(self) -> list[str]:
        return list(self._entries)

    def models(self) -> list[LoadedModel]:
        return [e for e in list(self._entries.values()) if isinstance(e, LoadedModel)]

    @property
    def used_bytes(self) -> int:
        return sum(e.size_bytes for e in self._entries.values())

    # --- internals

    def _get(self, model_id: str, categories: tuple[str, ...], load):
        entry = self.weights.require(model_id, categories)  # deleted or changed since the job was queued?
        with self._lock:
            cached = self._entries.get(model_id)
            if cached is not None and cached.version == entry.version:
                self._entries.move_to_end(model_id)
                return cached
            self._entries.pop(model_id, None)
            loaded = load(entry)
            self._entries[model_id] = loaded
            self._make_room(keep=model_id)
            return loaded

    def _make_room(self, keep: str) -> None:
        evicted = False
        limit = self.max_bytes() if callable(self.max_bytes) else self.max_bytes
        while self.used_bytes > limit and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            log.info("model cache full: evicting %s", oldest)
            self._entries.pop(oldest)
            evicted = True
        if evicted:
            _release_memory()

    def _load_pipeline(self, entry) -> LoadedModel:
        folder = self.weights.folder(entry.model_id)
        # 1. the dtype and the big text encoders kept in CPU memory, decided from the stored files
        index = json.loads((folder / "model_index.json").read_text())
        family = class_family(str(index.get("_class_name", "")))
        dtype = family_dtype(family, self.device, self.dtype)
        with LOAD_LOCK:
            offloaded = load_offloaded(folder, family, self.device, dtype, self.memory)
            # 2. the weights, straight onto the device; 3. moved, quantized, offloaded, compiled (speed.prepare)
            pipeline = DiffusionPipeline.from_pretrained(folder, dtype=dtype, **self._load_options(), **offloaded)
            prepare(pipeline, self.device, dtype, self.fast, self.memory)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        family = pipeline_family(pipeline)
        size = module_bytes(*pipeline.components.values())
        kind = PIPELINE_KINDS.get(type(pipeline).__name__, "")
        return LoadedModel(entry.model_id, entry.version, pipeline, scheduler_config, family, size, kind)

    def _load_options(self) -> dict:
        """Weights read from the store's safetensors into modules built on the meta device (no random
        init, no second copy in memory); on a GPU read straight onto it (a device map of one device,
        which `.to()` still moves), not into CPU memory first."""
        options = {"local_files_only": True, "low_cpu_mem_usage": True}
        if self.device.type == "cuda":
            options["device_map"] = "cuda"
        return options

    def _load_component(self, entry, kind: str) -> LoadedComponent:
        folder = self.weights.folder(entry.model_id)
        if kind == "preprocessor":
            from transformers import pipeline as transformers_pipeline

            with LOAD_LOCK:
                estimator = transformers_pipeline("depth-estimation", model=str(folder), device=self.device)
            return LoadedComponent(entry.model_id, entry.version, estimator, module_bytes(estimator.model))
        if kind == "translator":  # (model, tokenizer): infra.engine.prompts.translate
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            with LOAD_LOCK:
                model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True).to(self.device).eval()
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            return LoadedComponent(entry.model_id, entry.version, (model, tokenizer), module_bytes(model))
        if kind == "segmenter":  # (model, processor): DiffusersEngine.segment
            from transformers import AutoProcessor, CLIPSegForImageSegmentation

            with LOAD_LOCK:
                model = CLIPSegForImageSegmentation.from_pretrained(folder, local_files_only=True).to(self.device).eval()
                processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            return LoadedComponent(entry.model_id, entry.version, (model, processor), module_bytes(model))
        if kind == "ip_adapter":  # its CLIP image encoder (the adapter's weights load into the UNet per job)
            from transformers import CLIPVisionModelWithProjection

            with LOAD_LOCK:
                encoder = CLIPVisionModelWithProjection.from_pretrained(
                    folder / "image_encoder", dtype=self.dtype, local_files_only=True).to(self.device).eval()
            return LoadedComponent(entry.model_id, entry.version, encoder, module_bytes(encoder))
        if kind in ("upscaler", "face_restorer", "object_remover"):
            from infra.engine.files.upscalers import load_upscaler

            with LOAD_LOCK:
                descriptor = load_upscaler(self.weights.payload(entry.model_id), self.device,
                                           inpainting=kind == "object_remover")
            return LoadedComponent(entry.model_id, entry.version, descriptor, module_bytes(descriptor.model))
        if kind == "image_to_video":  # a StableVideoDiffusionPipeline: infra.engine.video.generate_image_video
            from diffusers import StableVideoDiffusionPipeline

            with LOAD_LOCK:
                pipeline = StableVideoDiffusionPipeline.from_pretrained(folder, dtype=self.dtype, **self._load_options())
                pipeline.to(self.device)
            pipeline.set_progress_bar_config(disable=True)
            return LoadedComponent(entry.model_id, entry.version, pipeline, module_bytes(*pipeline.components.values()))
        if kind == "background_remover":  # a rembg session on onnxruntime: DiffusersEngine.remove_background
            from infra.engine.files.background import load_background_remover

            path = self.weights.payload(entry.model_id)
            with LOAD_LOCK:
                session = load_background_remover(path)
            return LoadedComponent(entry.model_id, entry.version, session, path.stat().st_size)
        if kind == "motion_adapter":
            from infra.engine.files.motion import load_motion_adapter

            with LOAD_LOCK:
                adapter = load_motion_adapter(folder, self.device, self.dtype)
            return LoadedComponent(entry.model_id, entry.version, adapter, module_bytes(adapter))
        cls, dtype = COMPONENTS[kind], self.dtype
        if kind == "controlnet":  # a UNet's or a transformer family's (the manifest's family), in its dtype
            name = json.loads((folder / "config.json").read_text()).get("_class_name")
            cls = getattr(diffusers, name if name in CONTROLNET_FAMILIES else "ControlNetModel")
            dtype = family_dtype(entry.family, self.device, self.dtype)
        with LOAD_LOCK:
            module = cls.from_pretrained(folder, dtype=dtype, local_files_only=True).to(self.device)
        return LoadedComponent(entry.model_id, entry.version, module.eval(), module_bytes(module))


_VARIANTS_LOCK = threading.Lock()


def _from_pipe(cls, pipeline, **parts):
    # from_pipe casts every component to `dtype` in place (float32 when not given): keep the model's own
    variant = cls.from_pipe(pipeline, dtype=pipeline.dtype, **parts)
    variant.set_progress_bar_config(disable=True)
    return variant


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_scheduler(name: str, base_config: dict, karras: bool, algorithm: str | None):
    """A new scheduler of class `name` from the model's pristine config (never a previous job's:
    flags like use_karras_sigmas would leak from one job into the next). The names a request may
    use and how they resolve are the wire's (`models.schedulers`)."""
    import diffusers

    cls = getattr(diffusers, name)
    options: dict = {}
    accepted = inspect.signature(cls.__init__).parameters
    if "use_karras_sigmas" in accepted and not name.startswith("FlowMatch"):  # (Karras sigmas: the SD samplers')
        options["use_karras_sigmas"] = karras
    if algorithm and "algorithm_type" in accepted:
        options["algorithm_type"] = algorithm
    return cls.from_config(dict(base_config), **options)
