"""Single-file Stable Diffusion checkpoints -> diffusers pipelines and models, fully offline.

Operators upload one-file checkpoints (.safetensors / .ckpt / .pt / .pth / .bin) in the original
LDM layout: SD 1.x, SD 2.x and SDXL pipelines (4-channel or 9-channel inpainting UNets), and
standalone VAEs and ControlNets (LDM or diffusers keys). diffusers converts them with
`from_single_file(..., config=<local folder>, local_files_only=True)`; the architecture config
folders ship in `configs/`, so the hub is never asked.

`configs/` holds data only:

* pipeline folders (a `model_index.json` and one config per component): `sd15`
  (runwayml/stable-diffusion-v1-5), `sd2` (stabilityai/stable-diffusion-2-1, 768 px v-prediction),
  `sdxl` (stabilityai/stable-diffusion-xl-base-1.0), and any other folder with a model_index.json
  (e.g. the tiny test models);
* ControlNet folders (a `config.json` of a ControlNetModel): `controlnet-sd15`
  (lllyasviel/control_v11p_sd15_canny), `controlnet-sdxl` (diffusers/controlnet-canny-sdxl-1.0);
* `clip-tokenizer`: the CLIP BPE vocabulary (vocab.json, 49408 tokens, + merges.txt), stored once.
  Every real SD tokenizer uses it; their `tokenizer*/tokenizer_config.json` differ only in the pad
  token ("<|endoftext|>" for CLIP-L, "!" for the OpenCLIP encoders). A tokenizer folder with its
  own vocab.json / tokenizer.json uses that instead. The files were built from open_clip's
  `bpe_simple_vocab_16e6.txt.gz` exactly as CLIP's SimpleTokenizer builds its vocabulary.

An architecture is chosen from tensor shapes only (meta tensors work): the UNet, text encoder and
VAE shapes of the checkpoint must equal what a folder's configs would build. A 9-channel checkpoint
matches the 4-channel folder of its base architecture; its UNet is then loaded with `in_channels=9`
(plus `INPAINT_OVERRIDES`), so no inpainting folders are shipped.

Known limits: SD 2.x "base" (512 px, epsilon) and "768-v" checkpoints have identical shapes; every
4-channel SD 2.x checkpoint gets the shipped 2.1 768-v configs. A .ckpt that pickles anything
besides tensors (e.g. PyTorch Lightning callbacks) is refused rather than unpickled.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from infra.engine import CONFIGS_DIR, read_json

SHARED_TOKENIZER_DIR = CONFIGS_DIR / "clip-tokenizer"

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}

# Key prefixes of the original (LDM / SGM) single-file layout.
UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIXES = {
    "sd1": ("cond_stage_model.transformer.",),  # OpenAI CLIP ViT-L/14 (transformers layout)
    "sd2": ("cond_stage_model.model.",),  # OpenCLIP ViT-H/14
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),  # CLIP-L + OpenCLIP bigG
}
# The activation of each text encoder: OpenAI CLIP uses quick_gelu, OpenCLIP gelu.
TEXT_ENCODER_ACTIVATIONS = {"sd1": ("quick_gelu",), "sd2": ("gelu",), "sdxl": ("quick_gelu", "gelu")}
VAE_PREFIXES = ("first_stage_model.", "vae.")  # a standalone LDM VAE may also have no prefix
CONTROLNET_PREFIX = "control_model."  # full ControlNet v1.0 files; v1.1 files have no prefix

# Config changes for a 9-channel (inpainting) checkpoint, by config folder name, on top of in_channels=9.
# stabilityai/stable-diffusion-2-inpainting is a 512 px epsilon-prediction model, unlike the 768-v SD 2.1 base.
# runwayml/stable-diffusion-inpainting and the SDXL inpainting release keep their base's configs.
INPAINT_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "sd2": {"unet": {"sample_size": 64}, "scheduler": {"prediction_type": "epsilon"}},
}

# The tokenizer_config.json entries that configure a tokenizer over the shared vocabulary.
TOKENIZER_SETTINGS = ("model_max_length", "bos_token", "eos_token", "unk_token", "pad_token")

# Hints for files that are weights, but not of the kind that was asked for.
OTHER_WEIGHT_KINDS = (
    (("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up"), "a LoRA"),
    (("string_to_param", "emb_params"), "a textual-inversion embedding"),
    (("input_hint_block.", "controlnet_cond_embedding.", "zero_convs."), "a ControlNet"),
    (("encoder.down.", "encoder.down_blocks.", "decoder.up."), "a VAE"),
    (("down_blocks.", "mid_block."), "a diffusers-format UNet"),
)


class CheckpointError(Exception):
    """The uploaded weights cannot be used; the message says why, for the API user."""


@dataclass(frozen=True)
class PipelineArchitecture:
    name: str  # the config folder's name, e.g. "sd15"
    family: Literal["sd1", "sd2", "sdxl"]
    inpaint: bool  # a 9-channel UNet
    config_dir: Path  # the shipped folder; for a derived inpaint variant, that of the 4-channel base


# --------------------------------------------------------------------------- reading files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU (memory-mapped where the format allows)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"unsupported weights file type {path.suffix or '(no extension)'!r}: "
            f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path.name}")
    if suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        state = _read_torch_file(path)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning / LDM training files
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"the {suffix} file holds a {type(state).__name__}, not a dictionary of weights")
    tensors = {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"the {suffix} file contains no weight tensors")
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"truncated or corrupt .safetensors file: {exc}") from exc


def _read_torch_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    try:
        # weights_only: never run code from an uploaded pickle; mmap needs the zip format of torch >= 1.6
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        forbidden = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if forbidden:
            raise CheckpointError(
                f"the {suffix} file contains pickled Python objects besides tensors ({forbidden[1]}), which are "
                "not loaded for safety: re-save the weights as .safetensors"
            ) from exc
        raise CheckpointError(f"truncated or corrupt {suffix} file, or not a PyTorch checkpoint at all") from exc
    except MemoryError:
        raise
    except Exception as exc:  # a damaged file fails inside torch.load in many ways (EOFError, RuntimeError, ...)
        raise CheckpointError(f"truncated or corrupt {suffix} file, or not a PyTorch checkpoint at all") from exc


# --------------------------------------------------------------------------- config folders


def _unet_pipeline(folder: Path) -> bool:
    """A config folder of the UNet families (SD 1.x/2.x, SDXL) this module converts single files
    of (the transformer families' folders, tiny-flux and tiny-sd3, are the built-in models' only)."""
    return (folder / "model_index.json").is_file() and (folder / "unet").is_dir()


def pipeline_config_dirs() -> list[Path]:
    """Every UNet pipeline config folder under configs/ (a model_index.json and a unet/), sorted by name."""
    return sorted(folder for folder in CONFIGS_DIR.iterdir() if _unet_pipeline(folder))


def component_config_dirs(kind: Literal["vae", "controlnet"]) -> list[Path]:
    """Every folder whose config.json builds a `kind` model: pipeline folders' vae/ and standalone folders."""
    class_name = {"vae": "AutoencoderKL", "controlnet": "ControlNetModel"}[kind]
    folders = []
    for folder in sorted(CONFIGS_DIR.iterdir()):
        if (folder / "model_index.json").is_file() and not _unet_pipeline(folder):
            continue
        for candidate in (folder, folder / "vae"):
            config_file = candidate / "config.json"
            if config_file.is_file() and read_json(config_file).get("_class_name") == class_name:
                folders.append(candidate)
    return folders


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The tokenizer of a tokenizer config folder: its own vocabulary files if it has them, else the
    shared CLIP vocabulary with the folder's tokenizer_config.json settings (pad token, max length)."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(folder)
    config = read_json(folder / "tokenizer_config.json")
    settings = {}
    for key in TOKENIZER_SETTINGS:
        if key in config:
            value = config[key]  # a token may be saved as an AddedToken dict
            settings[key] = value["content"] if isinstance(value, dict) else value
    return CLIPTokenizer.from_pretrained(SHARED_TOKENIZER_DIR, **settings)


def _configs_entry(folder: Path) -> str:
    """The name of the configs/ folder that `folder` is or lies in: "sdxl" for configs/sdxl/vae."""
    return folder.relative_to(CONFIGS_DIR).parts[0]


# --------------------------------------------------------------------------- pipeline detection


def detect_pipeline(state_dict: dict[str, torch.Tensor]) -> PipelineArchitecture:
    """The shipped architecture whose configs build exactly the shapes of this LDM checkpoint."""
    unet_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if unet_in is None:
        raise CheckpointError(
            f"the file is not a Stable Diffusion checkpoint: no UNet weights found ({UNET_PREFIX}*)"
            + _looks_like(state_dict)
        )
    family = _detect_family(state_dict)
    in_channels = unet_in.shape[1]
    if in_channels not in (4, 9):
        raise CheckpointError(
            f"the UNet takes {in_channels} input channels: only 4 (text-to-image) and 9 (inpainting) are supported"
        )
    found = {
        **_unet_checkpoint_features(state_dict, UNET_PREFIX),
        **_text_encoder_checkpoint_features(state_dict, family),
        **_vae_checkpoint_features(state_dict, "first_stage_model."),
    }
    for folder in pipeline_config_dirs():
        expected, folder_in_channels = _pipeline_config_features(folder)
        if expected != found:
            continue
        if in_channels == folder_in_channels:
            return PipelineArchitecture(folder.name, family, in_channels == 9, folder)
        if in_channels == 9 and folder_in_channels == 4:
            return PipelineArchitecture(folder.name, family, True, folder)
    raise CheckpointError(
        f"no supported architecture matches this {FAMILY_NAMES[family]} checkpoint; it has {_describe(found)}"
    )


def _detect_family(state_dict: dict[str, torch.Tensor]) -> Literal["sd1", "sd2", "sdxl"]:
    """Which text encoder(s) the checkpoint carries."""
    if any(key.startswith("conditioner.embedders.") for key in state_dict):
        if not any(key.startswith("conditioner.embedders.1.") for key in state_dict):
            raise CheckpointError(
                "SDXL refiner checkpoints are not supported: only SDXL base models (two text encoders)"
            )
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in state_dict):
        return "sd2"
    if any(key.startswith("cond_stage_model.transformer.") for key in state_dict):
        return "sd1"
    raise CheckpointError(
        "the checkpoint has a UNet but no text encoder weights "
        "(cond_stage_model.* for SD 1.x/2.x, conditioner.embedders.* for SDXL): upload a full pipeline checkpoint"
    )


def _pipeline_config_features(folder: Path) -> tuple[dict[str, Any], int]:
    """What a pipeline folder's configs build, as `_unet/_text_encoder/_vae_checkpoint_features` see
    a checkpoint; and the UNet's input channels."""
    index = read_json(folder / "model_index.json")
    unet = read_json(folder / "unet" / "config.json")
    text_encoders = [
        read_json(folder / name / "config.json")
        for name in ("text_encoder", "text_encoder_2")
        if index.get(name, [None])[0] is not None
    ]
    features = {
        **_unet_config_features(unet),
        "text encoder widths": tuple(config["hidden_size"] for config in text_encoders),
        "text encoder activations": tuple(config.get("hidden_act", "quick_gelu") for config in text_encoders),
        **_vae_config_features(read_json(folder / "vae" / "config.json")),
    }
    return features, unet.get("in_channels", 4)


def _unet_checkpoint_features(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """UNet (or ControlNet encoder) shapes of an LDM state dict whose UNet keys start with `prefix`."""
    conv_in = state_dict[prefix + "input_blocks.0.0.weight"]
    conv_out = state_dict.get(prefix + "out.2.weight")
    added = state_dict.get(prefix + "label_emb.0.0.weight")
    return {
        "model channels": conv_in.shape[0],
        "input blocks": len(_indices(state_dict, prefix + "input_blocks.")),
        "cross-attention dim": _cross_attention_dim(state_dict, prefix),
        "output channels": None if conv_out is None else conv_out.shape[0],
        "added conditioning dim": None if added is None else added.shape[1],
        "linear attention projections": _linear_projection(state_dict, prefix),
    }


def _unet_config_features(config: dict[str, Any]) -> dict[str, Any]:
    """What `_unet_checkpoint_features` finds in a checkpoint of this UNet2DConditionModel config."""
    blocks = config.get("block_out_channels", [320, 640, 1280, 1280])
    added = config.get("projection_class_embeddings_input_dim")
    return {
        "model channels": blocks[0],
        "input blocks": _input_block_count(config, len(blocks)),
        "cross-attention dim": _first(config.get("cross_attention_dim", 1280)),
        "output channels": config.get("out_channels", 4),
        "added conditioning dim": added if config.get("addition_embed_type") == "text_time" else None,
        "linear attention projections": config.get("use_linear_projection", False),
    }


def _input_block_count(config: dict[str, Any], levels: int) -> int:
    """LDM input_blocks: conv_in, the resnets of every level and a downsampler between levels."""
    layers = config.get("layers_per_block", 2)
    per_level = layers if isinstance(layers, list) else [layers] * levels
    return sum(count + 1 for count in per_level)


def _text_encoder_checkpoint_features(state_dict: dict[str, torch.Tensor], family: str) -> dict[str, Any]:
    widths = []
    for prefix in TEXT_ENCODER_PREFIXES[family]:
        embedding = next(
            (t for key, t in state_dict.items() if key.startswith(prefix) and key.endswith("token_embedding.weight")),
            None,
        )
        if embedding is None:
            raise CheckpointError(f"the checkpoint's text encoder is incomplete: no token embedding under {prefix}*")
        widths.append(embedding.shape[1])
    return {"text encoder widths": tuple(widths), "text encoder activations": TEXT_ENCODER_ACTIVATIONS[family]}


def _vae_checkpoint_features(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """VAE shapes of a state dict in LDM or diffusers layout, keys starting with `prefix`."""
    conv_in = state_dict.get(prefix + "encoder.conv_in.weight")
    latent_in = state_dict.get(prefix + "decoder.conv_in.weight")
    if conv_in is None or latent_in is None:
        raise CheckpointError(f"no VAE weights found ({prefix}encoder.* / {prefix}decoder.*)")
    levels = _indices(state_dict, prefix + "encoder.down.") or _indices(state_dict, prefix + "encoder.down_blocks.")
    resnets = _indices(state_dict, prefix + "encoder.down.0.block.") or _indices(
        state_dict, prefix + "encoder.down_blocks.0.resnets."
    )
    return {
        "VAE image channels": conv_in.shape[1],
        "VAE base channels": conv_in.shape[0],
        "VAE levels": len(levels),
        "VAE resnets per level": len(resnets),
        "VAE top channels": latent_in.shape[0],
        "VAE latent channels": latent_in.shape[1],
    }


def _vae_config_features(config: dict[str, Any]) -> dict[str, Any]:
    """What `_vae_checkpoint_features` finds in a checkpoint of this AutoencoderKL config."""
    blocks = config.get("block_out_channels", [64])
    return {
        "VAE image channels": config.get("in_channels", 3),
        "VAE base channels": blocks[0],
        "VAE levels": len(blocks),
        "VAE resnets per level": config.get("layers_per_block", 1),
        "VAE top channels": blocks[-1],
        "VAE latent channels": config.get("latent_channels", 4),
    }


def _indices(state_dict: dict[str, torch.Tensor], prefix: str) -> set[int]:
    """The numbers N of keys `prefix` + "N." + ..."""
    numbers = set()
    for key in state_dict:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                numbers.add(int(head))
    return numbers


def _cross_attention_dim(state_dict: dict[str, torch.Tensor], prefix: str) -> int | None:
    for key, tensor in state_dict.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight"):
            return tensor.shape[1]
    return None


def _linear_projection(state_dict: dict[str, torch.Tensor], prefix: str) -> bool | None:
    """SD 2.x / SDXL transformers project in and out with linear layers, SD 1.x with 1x1 convolutions."""
    for key, tensor in state_dict.items():
        if key.startswith(prefix) and key.endswith("proj_in.weight"):
            return tensor.ndim == 2
    return None


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


def _describe(features: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in features.items())


def _looks_like(state_dict: dict[str, torch.Tensor]) -> str:
    for markers, kind in OTHER_WEIGHT_KINDS:
        if any(marker in key for key in state_dict for marker in markers):
            return f"; the file looks like {kind}"
    return ""


# --------------------------------------------------------------------------- pipeline loading


def load_pipeline_file(path: str | Path, dtype: torch.dtype = torch.float32):
    """A single-file SD 1.x / 2.x / SDXL checkpoint (text-to-image or inpainting) as a diffusers pipeline
    on the CPU: StableDiffusion(XL)Pipeline or StableDiffusion(XL)InpaintPipeline, without a safety checker."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" and path.suffix != ".safetensors":
        raise CheckpointError("rename the file to end in .safetensors (lowercase): diffusers reads it by its extension")
    state_dict = read_state_dict(path)
    arch = detect_pipeline(state_dict)
    index = read_json(arch.config_dir / "model_index.json")
    components: dict[str, Any] = {"image_encoder": None, "feature_extractor": None}
    for name in ("tokenizer", "tokenizer_2"):
        if index.get(name, [None])[0] is not None:
            components[name] = load_tokenizer(arch.config_dir / name)
    if arch.family == "sdxl":
        pipeline_class = StableDiffusionXLInpaintPipeline if arch.inpaint else StableDiffusionXLPipeline
    else:
        pipeline_class = StableDiffusionInpaintPipeline if arch.inpaint else StableDiffusionPipeline
        components.update(safety_checker=None, requires_safety_checker=False)

    # The UNet and VAE are converted here from the state dict already read; the pipeline call converts the
    # text encoder(s) and reads the file a second time (memory-mapped, so it costs little).
    unet_config = read_json(arch.config_dir / "unet" / "config.json")
    unet_changes = {}
    if arch.inpaint and unet_config.get("in_channels", 4) != 9:  # the inpainting variant of a 4-channel folder
        overrides = INPAINT_OVERRIDES.get(arch.name, {})
        unet_changes = {"in_channels": 9, **overrides.get("unet", {})}
        if "scheduler" in overrides:
            scheduler_class = getattr(diffusers, index["scheduler"][1])
            components["scheduler"] = scheduler_class.from_pretrained(
                arch.config_dir, subfolder="scheduler", **overrides["scheduler"]
            )
    single_file_options = {"config": str(arch.config_dir), "local_files_only": True, "dtype": dtype}
    with _conversion_errors(arch.name, "unet"):
        components["unet"] = UNet2DConditionModel.from_single_file(
            state_dict, subfolder="unet", **single_file_options, **unet_changes
        )
    with _conversion_errors(arch.name, "vae"):
        components["vae"] = AutoencoderKL.from_single_file(state_dict, subfolder="vae", **single_file_options)
    del state_dict
    with _conversion_errors(arch.name, "text encoder"):
        pipeline = pipeline_class.from_single_file(str(path), **single_file_options, **components)
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            _check_no_meta_tensors(component, name)
    return pipeline


# --------------------------------------------------------------------------- components


def detect_component(
    kind: Literal["vae", "controlnet"], state_dict: dict[str, torch.Tensor], config_name: str | None = None
) -> Path:
    """The config folder (holding config.json) whose `kind` model has exactly the checkpoint's shapes.
    `config_name` restricts the search to one configs/ folder, e.g. "sdxl" so that an SDXL VAE gets
    SDXL's scaling factor (the SD 1.x, 2.x and SDXL VAEs have identical shapes; the first match wins)."""
    if kind == "vae":
        found = _vae_checkpoint_features(state_dict, _vae_prefix(state_dict))
    elif kind == "controlnet":
        found = _controlnet_checkpoint_features(state_dict)
    else:
        raise ValueError(f"unknown component kind {kind!r}")
    candidates = component_config_dirs(kind)
    if config_name is not None:
        candidates = [folder for folder in candidates if _configs_entry(folder) == config_name]
    for folder in candidates:
        config = read_json(folder / "config.json")
        expected = _vae_config_features(config) if kind == "vae" else _controlnet_config_features(config)
        if expected == found:
            return folder
    where = f" in configs/{config_name}" if config_name is not None else ""
    raise CheckpointError(f"no supported {kind} architecture{where} matches this file; it has {_describe(found)}")


def load_component_file(
    kind: Literal["vae", "controlnet"],
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    config_name: str | None = None,
):
    """A single-file VAE (AutoencoderKL) or ControlNet (ControlNetModel) in LDM or diffusers layout.
    A full SD checkpoint also works as a VAE file (its first_stage_model.* weights are used)."""
    state_dict = read_state_dict(path)
    config_dir = detect_component(kind, state_dict, config_name)
    ldm_layout = "controlnet_cond_embedding.conv_in.weight" not in state_dict
    if kind == "controlnet" and ldm_layout and read_json(config_dir / "config.json").get("addition_embed_type"):
        # diffusers' LDM ControlNet converter does not map SDXL's added-conditioning (label_emb) weights
        raise CheckpointError(
            "SDXL ControlNets are supported in the diffusers layout only (diffusion_pytorch_model.safetensors), "
            "not in the original LDM layout"
        )
    model_class = AutoencoderKL if kind == "vae" else ControlNetModel
    with _conversion_errors(str(config_dir.relative_to(CONFIGS_DIR)), kind):
        model = model_class.from_single_file(state_dict, config=str(config_dir), local_files_only=True, dtype=dtype)
    _check_no_meta_tensors(model, kind)
    return model


def _vae_prefix(state_dict: dict[str, torch.Tensor]) -> str:
    for prefix in VAE_PREFIXES:
        if any(key.startswith(prefix + "encoder.") for key in state_dict):
            return prefix
    if any(key.startswith("encoder.") for key in state_dict):
        return ""
    raise CheckpointError("the file is not a VAE: no encoder/decoder weights found" + _looks_like(state_dict))


def _controlnet_checkpoint_features(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ControlNet shapes, from diffusers keys or LDM keys (with or without the control_model. prefix)."""
    if "controlnet_cond_embedding.conv_in.weight" in state_dict and "conv_in.weight" in state_dict:  # diffusers
        prefix = ""
        conv_in = state_dict["conv_in.weight"]
        hint_in = state_dict["controlnet_cond_embedding.conv_in.weight"]
        outputs = _indices(state_dict, "controlnet_down_blocks.")
        added = state_dict.get("add_embedding.linear_1.weight")
    else:  # LDM
        has_prefix = any(key.startswith(CONTROLNET_PREFIX) for key in state_dict)
        prefix = CONTROLNET_PREFIX if has_prefix else ""
        conv_in = state_dict.get(prefix + "input_blocks.0.0.weight")
        hint_in = state_dict.get(prefix + "input_hint_block.0.weight")
        if conv_in is None or hint_in is None:
            raise CheckpointError(
                "the file is not a ControlNet: no hint encoder (input_hint_block / controlnet_cond_embedding) found"
                + _looks_like(state_dict)
            )
        outputs = _indices(state_dict, prefix + "zero_convs.")
        added = state_dict.get(prefix + "label_emb.0.0.weight")
    return {
        "model channels": conv_in.shape[0],
        "latent channels": conv_in.shape[1],
        "hint channels": hint_in.shape[1],
        "hint embedding channels": hint_in.shape[0],
        "control outputs": len(outputs),
        "cross-attention dim": _cross_attention_dim(state_dict, prefix),
        "added conditioning dim": None if added is None else added.shape[1],
    }


def _controlnet_config_features(config: dict[str, Any]) -> dict[str, Any]:
    """What `_controlnet_checkpoint_features` finds in a checkpoint of this ControlNetModel config."""
    blocks = config.get("block_out_channels", [320, 640, 1280, 1280])
    added = config.get("projection_class_embeddings_input_dim")
    return {
        "model channels": blocks[0],
        "latent channels": config.get("in_channels", 4),
        "hint channels": config.get("conditioning_channels", 3),
        "hint embedding channels": config.get("conditioning_embedding_out_channels", [16, 32, 96, 256])[0],
        "control outputs": _input_block_count(config, len(blocks)),
        "cross-attention dim": _first(config.get("cross_attention_dim", 1280)),
        "added conditioning dim": added if config.get("addition_embed_type") == "text_time" else None,
    }


# --------------------------------------------------------------------------- checks


@contextmanager
def _conversion_errors(architecture: str, component: str):
    """Turns diffusers' conversion failures into CheckpointErrors naming the component and architecture."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except SingleFileComponentError as exc:
        raise CheckpointError(f"checkpoint is missing weights for {component}") from exc
    except NotImplementedError as exc:
        if "meta tensor" not in str(exc):
            raise
        # from_single_file leaves the weights the file lacks on the meta device, then fails to move them
        raise CheckpointError(f"checkpoint is missing weights for {component}") from exc
    except (ValueError, KeyError, RuntimeError, IndexError, OSError) as exc:
        raise CheckpointError(
            f"the checkpoint's {component} does not fit the {architecture} architecture: {type(exc).__name__}: {exc}"
        ) from exc


def _check_no_meta_tensors(module: torch.nn.Module, name: str) -> None:
    """from_single_file leaves weights the checkpoint lacks on the meta device: refuse such a model."""
    missing = [
        tensor_name
        for tensor_name, tensor in chain(module.named_parameters(), module.named_buffers())
        if tensor.is_meta
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CheckpointError(f"checkpoint is missing weights for {name}: {shown} ({len(missing)} tensors)")
