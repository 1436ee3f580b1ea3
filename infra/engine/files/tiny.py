"""The built-in tiny models: Stable Diffusion-shaped pipelines with random weights and a byte-level
CLIP tokenizer, built offline in well under a second.

They make the whole API usable and testable on a CPU with no hub access: outputs are noise-like
images of the requested size, produced by the real diffusers pipelines.

The architectures are data, not code: each is a diffusers config folder under `configs/`
(model_index.json, one config per component, the tokenizer files; no weights). A builder reads
that folder, instantiates every model with `Cls.from_config(...)` from its JSON, draws random
weights from a seeded generator and saves a complete diffusers pipeline folder.

* `configs/tiny-sd`: SD 1.x-shaped (PNDM, 2-block UNet 32/64, 4-block VAE 8/16/32/32, one
  12-layer 32-wide CLIP text encoder).
* `configs/tiny-sdxl`: SDXL-shaped (Euler, `text_time` UNet, the same VAE with SDXL's scaling
  factor, a 32-wide CLIPTextModel and a 64-wide CLIPTextModelWithProjection, 12 layers each).
  The two encoders must differ in width: diffusers' single-file loader tells the SDXL text
  encoders apart only by the width of their position embeddings.
* `configs/tiny-flux`: Flux.1-shaped (FluxPipeline, as diffusers' own Flux tests build it: a
  FluxTransformer2DModel of one double and one single block, a 32-wide CLIP text encoder and a
  2-layer 32-wide T5 encoder, a VAE with 1 latent channel; FlowMatchEulerDiscreteScheduler). Its
  T5 tokenizer is a unigram one with a piece per printable ASCII character (tokenizer.json).
* `configs/tiny-sd3`: SD3 / SD3.5-shaped (StableDiffusion3Pipeline, as diffusers' SD3 tests build
  it, with 16 latent channels as its img2img / inpaint pipelines require; the tokenizers are
  tiny-flux's).
* `configs/controlnet-tiny-sd`: a ControlNet matching the tiny SD UNet (config.json only).
* `configs/tiny-motion-adapter`: an AnimateDiff `MotionAdapter` matching the tiny SD UNet (2 blocks,
  32/64 channels, 1 motion layer per block, a mid-block motion module, 32 frames at most; config.json
  only). It has 8 attention heads like every released AnimateDiff module, so the original
  single-file layout of it loads back exactly (see `video.py`). diffusers initialises motion
  modules randomly (no zero-initialised output projection), so the tiny adapter really mixes the
  frames: a video with it differs from one with another seed's adapter.

An inpainting variant is the same folder with a 9-channel UNet (`in_channels` 9).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from infra.engine import CONFIGS_DIR, read_json

TINY_SD_CONFIGS = CONFIGS_DIR / "tiny-sd"
TINY_SDXL_CONFIGS = CONFIGS_DIR / "tiny-sdxl"
TINY_FLUX_CONFIGS = CONFIGS_DIR / "tiny-flux"
TINY_SD3_CONFIGS = CONFIGS_DIR / "tiny-sd3"
TINY_CONTROLNET_CONFIGS = CONFIGS_DIR / "controlnet-tiny-sd"
TINY_MOTION_ADAPTER_CONFIGS = CONFIGS_DIR / "tiny-motion-adapter"

INPAINT_IN_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent channels

# The order in which the models draw their random weights from the seeded generator. Changing it
# changes every tiny model's weights (and so every tiny output).
MODEL_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")
TOKENIZER_COMPONENTS = ("tokenizer", "tokenizer_2", "tokenizer_3")

INPAINT_PIPELINES = {  # pipeline class in model_index.json -> its inpainting counterpart
    "StableDiffusionPipeline": "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLInpaintPipeline",
}

TOKENIZER_MAX_LENGTH = 77


def diffusers_model_from_config(config_path: Path, **overrides: Any):
    """A diffusers model (UNet, VAE, ControlNet, ...) with random weights, from a config.json (or a
    folder holding one); the class comes from its `_class_name`. Seed torch first for fixed weights."""
    import diffusers

    if config_path.is_dir():
        config_path = config_path / "config.json"
    config = read_json(config_path)
    model_class = getattr(diffusers, config["_class_name"])
    return model_class.from_config({**config, **overrides}).eval()


def transformers_model_from_config(config_path: Path):
    """A transformers model (the CLIP text encoders) with random weights, from its config.json (or a
    folder holding one); the class comes from its `architectures`. Seed torch first for fixed weights."""
    import transformers

    if config_path.is_dir():
        config_path = config_path / "config.json"
    model_class = getattr(transformers, read_json(config_path)["architectures"][0])
    return model_class(model_class.config_class.from_json_file(config_path)).eval()


def scheduler_from_config(config_path: Path):
    """A scheduler from its scheduler_config.json (or the folder holding one)."""
    import diffusers

    if config_path.is_dir():
        config_path = config_path / "scheduler_config.json"
    config = read_json(config_path)
    return getattr(diffusers, config["_class_name"]).from_config(config)


def build_from_configs(config_dir: Path, folder: Path, inpaint: bool = False, seed: int = 0) -> None:
    """Save to `folder` the pipeline that the config folder `config_dir` describes, with random
    weights drawn from `seed`; `inpaint` swaps in the inpainting pipeline and a 9-channel UNet."""
    import diffusers
    import torch
    import transformers

    from infra.engine import quiet_libraries

    quiet_libraries()
    index = read_json(config_dir / "model_index.json")
    pipeline_name = INPAINT_PIPELINES[index["_class_name"]] if inpaint else index["_class_name"]
    pipeline_class = getattr(diffusers, pipeline_name)

    components: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list):
            components[name] = value  # a pipeline flag such as force_zeros_for_empty_prompt
        elif value == [None, None]:
            components[name] = None  # an optional component left out (safety checker, image encoder, ...)

    for name in TOKENIZER_COMPONENTS:
        if name in index:
            shutil.copytree(config_dir / name, folder / name, dirs_exist_ok=True)
            tokenizer_class = getattr(transformers, index[name][1])
            components[name] = tokenizer_class.from_pretrained(folder / name)

    torch.manual_seed(seed)
    for name in MODEL_COMPONENTS:
        if name not in index:
            continue
        library = index[name][0]
        if library == "transformers":
            components[name] = transformers_model_from_config(config_dir / name)
        elif name == "unet" and inpaint:
            components[name] = diffusers_model_from_config(config_dir / name, in_channels=INPAINT_IN_CHANNELS)
        else:
            components[name] = diffusers_model_from_config(config_dir / name)
    components["scheduler"] = scheduler_from_config(config_dir / "scheduler")

    pipeline = pipeline_class(**components)
    pipeline.save_pretrained(folder)


def build_tiny_pipeline(folder: Path, inpaint: bool = False, seed: int = 0) -> None:
    """Save a tiny SD 1.x pipeline (4-channel UNet, or 9-channel for inpainting) to `folder`."""
    build_from_configs(TINY_SD_CONFIGS, folder, inpaint=inpaint, seed=seed)


def build_tiny_sdxl(folder: Path, inpaint: bool = False, seed: int = 0) -> None:
    """Save a tiny SDXL pipeline (StableDiffusionXLPipeline; StableDiffusionXLInpaintPipeline with a
    9-channel UNet for inpainting) to `folder`."""
    build_from_configs(TINY_SDXL_CONFIGS, folder, inpaint=inpaint, seed=seed)


def build_tiny_flux(folder: Path, seed: int = 0) -> None:
    """Save a tiny Flux.1 pipeline (FluxPipeline: a 1+1-block FluxTransformer2DModel, CLIP and T5
    text encoders 32 wide, a 1-channel-latent VAE, flow-matching Euler) to `folder`."""
    build_from_configs(TINY_FLUX_CONFIGS, folder, seed=seed)


def build_tiny_sd3(folder: Path, seed: int = 0) -> None:
    """Save a tiny SD3 / SD3.5 pipeline (StableDiffusion3Pipeline: a 1-layer SD3Transformer2DModel
    on 16 latent channels, two CLIP encoders with projection and a T5 encoder, 32 wide) to `folder`."""
    build_from_configs(TINY_SD3_CONFIGS, folder, seed=seed)


def build_tiny_motion_adapter(folder: Path, seed: int = 0) -> None:
    """Save a tiny AnimateDiff MotionAdapter for the tiny SD UNet to `folder` (config.json +
    diffusion_pytorch_model.safetensors), with random weights drawn from `seed`."""
    import torch

    from infra.engine import LOAD_LOCK, quiet_libraries

    quiet_libraries()
    with LOAD_LOCK:  # no model construction while another thread loads under accelerate's patch
        torch.manual_seed(seed)
        adapter = diffusers_model_from_config(TINY_MOTION_ADAPTER_CONFIGS)
    adapter.save_pretrained(folder, safe_serialization=True)


def _byte_chars() -> list[str]:
    """The GPT-2 / CLIP byte -> printable character table."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write a byte-level CLIP tokenizer with no merges (every character is a token): this is how
    the tokenizer folders under `configs/` were made. SDXL's second tokenizer pads with "!"."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]  # ids 512, 513
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        **special,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)  # built from vocab.json + merges.txt
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
