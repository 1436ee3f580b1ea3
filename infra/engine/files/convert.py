"""Downloaded weights -> the store's layout, verified by loading them as the claimed kind.

Pipelines, VAEs and ControlNets are saved as diffusers folders (single-file checkpoints are
converted once here, so later loads are plain `from_pretrained`); LoRAs and embeddings are kept as
one normalised .safetensors file; a background remover as its one .onnx file (`files.background`). Every function raises `CheckpointError` with a message a
client can act on when the weights are not what the request said they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline
from safetensors.torch import save_file

from infra.catalog.weights import CATEGORY_TITLES, CONTROLNET_FAMILIES, PIPELINE_CATEGORIES
from infra.engine import LOAD_LOCK, quiet_libraries
from infra.engine.files.checkpoints import CheckpointError, load_component_file, load_pipeline_file, read_state_dict
from infra.engine.files.family_files import detect_family_file, load_family_file, read_keys

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up")
LORA_FILE, EMBEDDING_FILE = "lora.safetensors", "embedding.safetensors"


def prepare_model(category: str | None, download: Path, out: Path, precision: str, upcast_attention: bool,
                  base: Path | None = None) -> dict:
    """Verify `download` (a file or folder) as `category` and write the store payload into `out`.
    category None = a pipeline of any family, detected. `base`: the folder of the model a single
    Flux.1 / SD3 file takes the rest of its pipeline from (family_files). Returns the manifest facts."""
    quiet_libraries()
    with LOAD_LOCK:
        return _prepare(category, _single_entry(download), out, precision, upcast_attention, base)


def _prepare(category: str | None, source: Path, out: Path, precision: str, upcast_attention: bool,
             base: Path | None) -> dict:
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if category is None or category in PIPELINE_CATEGORIES:
        return _prepare_pipeline(category, source, out, dtype, upcast_attention, base)
    if category == "lora":
        return _prepare_lora(_weights_file(source, "LoRA"), out)
    if category == "embeddings":
        return _prepare_embedding(_weights_file(source, "embedding"), out)
    if category in ("vae", "controlnet"):
        return _prepare_component(category, source, out, dtype)
    if category == "preprocessor":
        return _prepare_preprocessor(source, out)
    if category == "translator":
        return _prepare_translator(source, out)
    if category == "segmenter":
        return _prepare_segmenter(source, out)
    if category == "ip_adapter":
        return _prepare_ip_adapter(source, out)
    if category in ("upscaler", "face_restorer", "object_remover"):
        from infra.engine.files.upscalers import prepare_upscaler

        return prepare_upscaler(category, _weights_file(source, category.replace("_", " ")), out)
    if category == "motion_adapter":
        from infra.engine.files.motion import prepare_motion_adapter

        return prepare_motion_adapter(source, out, dtype)
    if category == "image_to_video":
        return _prepare_image_to_video(source, out, dtype)
    if category == "background_remover":
        from infra.engine.files.background import prepare_background_remover

        return prepare_background_remover(source, out)
    raise CheckpointError(f"loading {category} models is not supported by this server")


# --------------------------------------------------------------------------- pipelines


def _prepare_pipeline(claimed: str | None, source: Path, out: Path, dtype, upcast_attention: bool,
                      base: Path | None) -> dict:
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise CheckpointError("the folder is not a diffusers pipeline (no model_index.json)")
        pipeline = _load_pipeline_folder(source, dtype)
        fmt = "diffusers"
    else:  # a single file: a Flux.1 / SD3 one (read from its keys: a header), else an SD one
        if source.suffix == ".safetensors" and detect_family_file(read_keys(source)) is not None:
            pipeline = load_family_file(source, base, dtype=dtype, category=claimed)
        else:
            pipeline = load_pipeline_file(source, dtype=dtype)
        fmt = source.suffix.lstrip(".")
    if type(pipeline).__name__ == IMAGE_TO_VIDEO_PIPELINE:
        if claimed is not None:
            raise CheckpointError(f"{claimed} was claimed but the folder is a Stable Video Diffusion pipeline; "
                                  "load it with model_category image_to_video")
        return _save_image_to_video(pipeline, out)
    kind = TRANSFORMER_FAMILIES.get(type(pipeline).__name__)
    if kind is not None:
        return _prepare_transformer_family(claimed, kind, pipeline, out, fmt)
    if getattr(pipeline, "unet", None) is None:
        raise CheckpointError(f"{type(pipeline).__name__} is not a pipeline this server runs (SD 1.x/2.x, SDXL, SD3, "
                              "Flux.1, Flux.2, Qwen-Image, Z-Image)")
    if claimed in (category for _, category in TRANSFORMER_FAMILIES.values()):
        raise CheckpointError(f"{claimed} was claimed but the weights are a Stable Diffusion 1.x/2.x/XL model (a UNet)")
    sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    family = "sdxl" if sdxl else "sd"
    category = "inpaint" if pipeline.unet.config.in_channels == 9 else ("stable_diffusion_xl" if sdxl else "stable_diffusion")
    if claimed == "stable_diffusion_xl" and not sdxl:
        raise CheckpointError("stable_diffusion_xl was claimed but the weights are a Stable Diffusion 1.x/2.x model")
    if claimed in ("stable_diffusion", "inpaint") and sdxl:
        raise CheckpointError(f"{claimed} was claimed but the weights are an SDXL model; use stable_diffusion_xl")
    if claimed == "inpaint" and category != "inpaint":
        raise CheckpointError("inpaint was claimed but the UNet is not an inpainting UNet (4 input channels, not 9)")
    pipeline.save_pretrained(out, safe_serialization=True)
    if upcast_attention:
        config_path = out / "unet" / "config.json"
        config = json.loads(config_path.read_text())
        config["upcast_attention"] = True
        config_path.write_text(json.dumps(config, indent=2))
    return {"category": category, "family": family, "format": fmt, "context_dim": pipeline.unet.config.cross_attention_dim}


# the transformer (flow-matching) families: pipeline class -> (family, category)
TRANSFORMER_FAMILIES = {
    "FluxPipeline": ("flux", "flux"),
    "FluxKontextPipeline": ("flux", "flux_kontext"),  # instruction editing (an image + what to change)
    "FluxFillPipeline": ("flux", "flux_fill"),  # inpainting: a transformer that reads the mask
    "StableDiffusion3Pipeline": ("sd3", "sd3"),
    "QwenImagePipeline": ("qwen", "qwen"),  # Qwen-Image: a Qwen2.5-VL text encoder
    "QwenImageEditPipeline": ("qwen", "qwen_edit"),  # Qwen-Image-Edit: instruction editing of one image
    "QwenImageEditPlusPipeline": ("qwen", "qwen_edit"),  # Qwen-Image-Edit-2509 (and later): of 1 to 3 images
    "ZImagePipeline": ("zimage", "zimage"),  # Z-Image (Turbo): a Qwen3 text encoder
    "Flux2Pipeline": ("flux2", "flux2"),  # Flux.2 dev: a Mistral 3 text encoder; reference images as its input
    "Flux2KleinPipeline": ("flux2_klein", "flux2_klein"),  # Flux.2 Klein: a Qwen3 text encoder
}


def _prepare_transformer_family(claimed: str | None, kind: tuple[str, str], pipeline, out: Path, fmt: str) -> dict:
    """A Flux.1 (dev, schnell, Kontext, Fill, fine-tunes) or SD3 / SD3.5 pipeline: stored as it is.
    Claiming the family ("flux") is enough for any Flux.1 kind; the category says which it is."""
    family, category = kind
    if claimed not in (None, family, category):
        raise CheckpointError(f"{claimed} was claimed but the weights are a {CATEGORY_TITLES[category]} model; "
                              f"use model_category {category}")
    pipeline.save_pretrained(out, safe_serialization=True)
    return {"category": category, "family": family, "format": fmt, "pipeline": type(pipeline).__name__,
            "context_dim": getattr(pipeline.transformer.config, "joint_attention_dim", 0) or 0}


def _load_pipeline_folder(folder: Path, dtype):
    index = json.loads((folder / "model_index.json").read_text())
    extra = {}
    if "safety_checker" in index:  # we run our own checker (or none); never load theirs
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        return DiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    except Exception as exc:
        raise CheckpointError(f"the diffusers folder does not load: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- image to video

IMAGE_TO_VIDEO_PIPELINE = "StableVideoDiffusionPipeline"


def _prepare_image_to_video(source: Path, out: Path, dtype) -> dict:
    """img2video's model: a diffusers folder of a Stable Video Diffusion pipeline (UNet
    spatio-temporal, temporal-decoder VAE, CLIP image encoder), verified by loading it."""
    if not (source.is_dir() and (source / "model_index.json").is_file()):
        raise CheckpointError("an image_to_video model is a diffusers folder of a Stable Video Diffusion pipeline "
                              "(model_index.json, unet/, vae/, image_encoder/, ...); single files are not taken")
    name = json.loads((source / "model_index.json").read_text()).get("_class_name")
    if name != IMAGE_TO_VIDEO_PIPELINE:
        raise CheckpointError(f"image_to_video was claimed but the folder is a {name}, not a {IMAGE_TO_VIDEO_PIPELINE}")
    return _save_image_to_video(_load_pipeline_folder(source, dtype), out)


def _save_image_to_video(pipeline, out: Path) -> dict:
    pipeline.save_pretrained(out, safe_serialization=True)
    return {"category": "image_to_video", "family": "svd", "format": "diffusers"}


# --------------------------------------------------------------------------- components


def _prepare_component(kind: str, source: Path, out: Path, dtype) -> dict:
    """A VAE or ControlNet: a diffusers folder, or a single file of an SD / SDXL one. A ControlNet
    folder may hold any class of `CONTROLNET_FAMILIES` (Flux.1, SD3, Qwen-Image, Z-Image ones: folders
    only); the family it fits goes into the manifest."""
    cls = AutoencoderKL if kind == "vae" else ControlNetModel
    family = ""
    if source.is_dir():
        folder = source / kind if (source / kind / "config.json").is_file() else source
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"the folder has no config.json: it is not a diffusers {kind}")
        if kind == "controlnet":
            cls, family = _controlnet_class(folder)
        try:
            model = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"the {kind} folder does not load: {type(exc).__name__}: {exc}") from exc
        fmt = "diffusers"
    else:
        model = load_component_file(kind, source, dtype=dtype)
        fmt = source.suffix.lstrip(".")
    model.save_pretrained(out, safe_serialization=True)
    context_dim = (model.config.get("cross_attention_dim") or 0) if kind == "controlnet" else 0
    return {"category": kind, "format": fmt, "context_dim": context_dim, "family": family}


def _controlnet_class(folder: Path):
    """The diffusers class of a ControlNet folder (its config's `_class_name`) and the family it fits."""
    import diffusers

    name = str(json.loads((folder / "config.json").read_text()).get("_class_name", ""))
    if name not in CONTROLNET_FAMILIES:
        raise CheckpointError(f"the folder holds a {name or 'model without _class_name'}, not a ControlNet "
                              f"(this server runs {', '.join(CONTROLNET_FAMILIES)})")
    return getattr(diffusers, name), CONTROLNET_FAMILIES[name]


def _prepare_preprocessor(source: Path, out: Path) -> dict:
    """A ControlNet hint network. Depth estimators (DPT, Depth Anything, ...: any transformers
    depth-estimation model with its image processor) are the kind this server runs."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    return _prepare_transformers_folder(source, out, "preprocessor", AutoModelForDepthEstimation, AutoImageProcessor,
                                        "image processor", "a depth-estimation model")


def _prepare_translator(source: Path, out: Path) -> dict:
    """multi_lingual's translator: a transformers sequence-to-sequence model with its tokenizer (Marian
    opus-mt-*-en, NLLB, T5, ...: anything that turns a prompt into English with `generate`)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return _prepare_transformers_folder(source, out, "translator", AutoModelForSeq2SeqLM, AutoTokenizer, "tokenizer",
                                        "a translation model")


def _prepare_segmenter(source: Path, out: Path) -> dict:
    """mask_creator's segmenter: a transformers CLIPSeg folder (CLIPSegForImageSegmentation and its
    CLIPSegProcessor, as CIDAS/clipseg-rd64-refined)."""
    from transformers import AutoProcessor, CLIPSegForImageSegmentation

    return _prepare_transformers_folder(source, out, "segmenter", CLIPSegForImageSegmentation, AutoProcessor,
                                        "processor", "a CLIPSeg model")


def _prepare_transformers_folder(source: Path, out: Path, category: str, model_class, processor_class,
                                 processor: str, what: str) -> dict:
    """A transformers model folder with its tokenizer / processor, verified by loading both as the
    given classes, saved again into the store."""
    if not (source.is_dir() and (source / "config.json").is_file()):
        raise CheckpointError(f"a {category} is a transformers model folder (config.json + weights + {processor})")
    try:
        model = model_class.from_pretrained(source, local_files_only=True)
        extra = processor_class.from_pretrained(source, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"the folder is not {what}: {type(exc).__name__}: {exc}") from exc
    model.save_pretrained(out)
    extra.save_pretrained(out)
    return {"category": category, "format": "transformers"}


IP_ADAPTER_FILE, IMAGE_ENCODER = "ip_adapter.safetensors", "image_encoder"


def _prepare_ip_adapter(source: Path, out: Path) -> dict:
    """An IP-Adapter: a folder with its weights (one .safetensors or .bin of `image_proj` and
    `ip_adapter` weights, as tencent-ailab / h94 publish them) and its CLIP image encoder in
    `image_encoder/` (a transformers CLIPVisionModelWithProjection folder; h94/IP-Adapter's models/
    and sdxl_models/ folders are laid out so). Stored as ip_adapter.safetensors (flat keys) + image_encoder/."""
    from transformers import CLIPVisionModelWithProjection

    if not source.is_dir() or not (source / IMAGE_ENCODER / "config.json").is_file():
        raise CheckpointError("an IP-Adapter is a folder with its weights file and its CLIP image encoder in "
                              "image_encoder/ (as h94/IP-Adapter's models/ folder)")
    files = [path for path in sorted(source.iterdir()) if path.is_file() and path.suffix in WEIGHT_SUFFIXES]
    if len(files) != 1:
        raise CheckpointError(f"the IP-Adapter folder must hold one weights file beside image_encoder/, not {len(files)}")
    if files[0].suffix == ".safetensors":
        state = read_state_dict(files[0])
    else:  # the .bin layout: {"image_proj": {...}, "ip_adapter": {...}} (tensors only: weights_only)
        try:
            nested = torch.load(files[0], map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"the IP-Adapter file does not load: {type(exc).__name__}: {exc}") from exc
        parts = ("image_proj", "ip_adapter")
        state = {f"{part}.{key}": value for part in parts if isinstance(nested.get(part), dict)
                 for key, value in nested[part].items()} if isinstance(nested, dict) else {}
    if not any(key.startswith("image_proj.") for key in state) or "ip_adapter.1.to_k_ip.weight" not in state:
        raise CheckpointError("the file is not an IP-Adapter: it has no image_proj / ip_adapter weights")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(source / IMAGE_ENCODER, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"image_encoder/ is not a CLIP image encoder: {type(exc).__name__}: {exc}") from exc
    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, out / IP_ADAPTER_FILE)
    encoder.save_pretrained(out / IMAGE_ENCODER)
    context_dim = int(state["ip_adapter.1.to_k_ip.weight"].shape[1])  # the text-embedding width it was made for
    return {"category": "ip_adapter", "format": files[0].suffix.lstrip("."), "file": IP_ADAPTER_FILE,
            "context_dim": context_dim}


def _prepare_lora(path: Path, out: Path) -> dict:
    state = read_state_dict(path)
    if not any(marker in key for key in state for marker in LORA_MARKERS):
        raise CheckpointError("the file is not a LoRA: none of its keys are LoRA weights (lora_up/lora_down/lora_A/...)")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}, out / LORA_FILE)
    return {"category": "lora", "format": path.suffix.lstrip("."), "family": lora_family(state), "file": LORA_FILE,
            "context_dim": _lora_context_dim(state)}


# key fragments that name the denoiser a LoRA was trained on, in every format diffusers loads
# (diffusers/peft `transformer.single_transformer_blocks.*`, kohya `lora_unet_double_blocks_*`,
# BFL / ai-toolkit `diffusion_model.double_blocks.*`; SAI's SD3 `joint_blocks`)
_FLUX_LORA_KEYS = ("double_blocks", "single_blocks", "single_transformer_blocks")
_SD3_LORA_KEYS = ("joint_blocks",)


def lora_family(state: dict) -> str:
    """The family a LoRA's keys were trained for: "flux", "sd3", "transformer" (a diffusers-format
    transformer LoRA without Flux's single blocks: Flux or SD3, told apart when it loads), "sdxl"
    (a second text encoder), or "" (a UNet LoRA: SD 1.x / 2.x or SDXL, told apart by the width of
    its cross-attention keys, `context_dim`)."""
    keys = list(state)
    if any(part in key for key in keys for part in _FLUX_LORA_KEYS):
        return "flux"
    if any(part in key for key in keys for part in _SD3_LORA_KEYS):
        return "sd3"
    if any(key.startswith("transformer.") for key in keys):
        return "transformer"
    return "sdxl" if any(("lora_te2_" in k) or k.startswith("text_encoder_2.") for k in keys) else ""


def _lora_context_dim(state: dict) -> int:
    """Width of the text embeddings the LoRA's cross-attention key projections expect, or 0."""
    for key, tensor in state.items():
        if "attn2" in key and "to_k" in key and any(m in key for m in ("lora_down", "lora_A", "lora.down")):
            return int(tensor.shape[1])
    return 0


def _prepare_embedding(path: Path, out: Path) -> dict:
    state = _embedding_tensors(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in state.items()}, out / EMBEDDING_FILE)
    if "clip_g" in state:
        family, dim = "sdxl", state["clip_l"].shape[-1] + state["clip_g"].shape[-1]
    else:
        family, dim = "", state["emb_params"].shape[-1]
    return {"category": "embeddings", "format": path.suffix.lstrip("."), "family": family, "file": EMBEDDING_FILE,
            "context_dim": int(dim)}


def _embedding_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Any textual-inversion format -> {"emb_params": [n, dim]} or SDXL's {"clip_l", "clip_g"}."""
    if path.suffix in (".pt", ".bin", ".ckpt", ".pth"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"the embedding file does not load: {type(exc).__name__}") from exc
    else:
        raw = read_state_dict(path)
    if isinstance(raw, dict) and "string_to_param" in raw:  # A1111 .pt
        raw = {"emb_params": next(iter(raw["string_to_param"].values()))}
    if isinstance(raw, dict) and {"clip_l", "clip_g"} <= raw.keys():
        tensors = {"clip_l": raw["clip_l"], "clip_g": raw["clip_g"]}
    elif isinstance(raw, dict) and len(raw) == 1:  # {"emb_params": t} or diffusers {"<token>": t}
        tensors = {"emb_params": next(iter(raw.values()))}
    else:
        raise CheckpointError("the file is not a textual-inversion embedding (expected one vector set)")
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2) or not tensor.is_floating_point():
            raise CheckpointError("the file is not a textual-inversion embedding (no float vectors)")
        tensors[name] = tensor if tensor.ndim == 2 else tensor[None]
    return tensors


# --------------------------------------------------------------------------- files


def _single_entry(download: Path) -> Path:
    """A download folder holding exactly one file or folder stands for that entry."""
    if download.is_dir():
        entries = [p for p in download.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1:
            return _single_entry(entries[0]) if entries[0].is_dir() and not _is_model_folder(entries[0]) else entries[0]
    return download


def _is_model_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("model_index.json", "config.json"))


def _weights_file(source: Path, what: str) -> Path:
    if source.is_file():
        return source
    files = sorted(p for p in source.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise CheckpointError(f"expected one {what} weights file, found {len(files)}")
    return files[0]
