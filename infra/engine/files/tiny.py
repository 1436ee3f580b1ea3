"""The built-in tiny models: pipelines of the supported families with random weights and byte-level
tokenizers, built offline in well under a second.

They make the whole API usable and testable on a CPU with no hub access: outputs are noise-like
images of the requested size, produced by the real diffusers pipelines.

The architectures are data, not code: each is a diffusers config folder under `configs/`
(model_index.json, one config per component, the tokenizer files; no weights). A builder reads
that folder, instantiates every model with `Cls.from_config(...)` from its JSON, draws random
weights from a seeded generator and saves a complete diffusers pipeline folder. Tokenizer and
processor folders (a processor bundles a tokenizer and an image processor) are copied as they are.

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

* `configs/tiny-qwen-image`: Qwen-Image-shaped (QwenImagePipeline, after diffusers' Qwen-Image tests;
  QwenImageImg2ImgPipeline and QwenImageInpaintPipeline take it through `from_pipe`): a
  1-layer QwenImageTransformer2DModel (patch 2, 2 heads of 16), a 16-wide 2-layer
  Qwen2_5_VLForConditionalGeneration text encoder with a 1-layer vision tower, an
  AutoencoderKLQwenImage with 4 latent channels, 8 wide, no encoder res blocks and four down stages
  (factor 16, so sizes are multiples of 32, where the real one has three: the edit pipelines always
  encode their input at about 1 MP, and the extra stage keeps that pass cheap), and Qwen-Image's
  dynamic-shift flow-matching Euler. Its Qwen2Tokenizer is byte-level BPE with no merges: the 256
  byte tokens, then <|endoftext|> (256, pad), <|im_start|>, <|im_end|> (258, eos), <|vision_start|>,
  <|vision_end|>, <|image_pad|> (261), <|video_pad|>, <think>, </think>; the text encoder's image /
  video / vision token ids are those.
* `configs/tiny-qwen-image-edit`: the same models as a QwenImageEditPipeline (or a QwenImageEditPlusPipeline,
  Qwen-Image-Edit-2509's; QwenImageEditInpaintPipeline through `from_pipe`), with the `processor` that Edit needs: a
  Qwen2VLProcessor of the same tokenizer and a Qwen2VLImageProcessor (patch 14, merge 2) whose
  min / max pixels of 56x56 make every image 4 vision tokens. With one seed both folders draw the
  same weights.
* `configs/tiny-z-image`: Z-Image-shaped (ZImagePipeline, after diffusers' Z-Image tests;
  ZImageImg2ImgPipeline / ZImageInpaintPipeline through `from_pipe`): a 32-wide ZImageTransformer2DModel
  of one layer and one refiner layer each, a 16-wide 2-layer Qwen3Model text encoder, the Qwen
  tokenizer above with a Qwen3-style chat template (`enable_thinking` honoured), an AutoencoderKL of
  4 blocks of 8 channels and 4 latent channels with Flux's scaling and shift (factor 8: multiples of
  16), and Z-Image-Turbo's static shift-3 flow-matching Euler.
* `configs/tiny-flux2`: Flux.2 [dev]-shaped (Flux2Pipeline; reference-image editing goes through its
  `image` argument): a 1+1-block Flux2Transformer2DModel with guidance embedding, a 16-wide
  Mistral3ForConditionalGeneration text encoder with 30 layers (the pipeline stacks hidden states
  10, 20 and 30 by default) and a 1-layer Pixtral vision tower, an AutoencoderKLFlux2 of 4 blocks of
  8 channels and 4 latent channels (factor 8: multiples of 16), and Flux.2's dynamic-shift Euler.
  Its `tokenizer` is a PixtralProcessor: byte-level BPE with no merges, <unk> <s> </s> <pad> [INST]
  [/INST] [SYSTEM_PROMPT] [/SYSTEM_PROMPT] [IMG] [IMG_BREAK] [IMG_END] as ids 0-10 then the 256 byte
  tokens, and a minimal Mistral chat template.
* `configs/tiny-flux2-klein`: Flux.2 [klein]-shaped (Flux2KleinPipeline, step-distilled;
  Flux2KleinInpaintPipeline / Flux2KleinKVPipeline through `from_pipe`): tiny-flux2's transformer
  without guidance embedding, a 16-wide Qwen3ForCausalLM with 27 layers (hidden states 9, 18 and 27
  by default), the Qwen tokenizer and chat template, and tiny-flux2's VAE and scheduler.
* `configs/tiny-svd`: Stable Video Diffusion-shaped (StableVideoDiffusionPipeline, after diffusers' SVD
  tests: img2video): a 2-block UNetSpatioTemporalConditionModel (32/64, one layer per block, 8 input
  channels: the noisy latents and the image's), an AutoencoderKLTemporalDecoder of 2 blocks (factor 2)
  and 4 latent channels, a 2-layer 32-wide CLIPVisionModelWithProjection at SVD's 224 px (patch 14)
  with its CLIPImageProcessor, and SVD's v-prediction Euler with Karras sigmas.

An inpainting variant is the same folder with a 9-channel UNet (`in_channels` 9). A Flux Fill one is
tiny-flux with a transformer of 12 input channels (packed latents, masked-image latents and mask) and
4 output ones, saved as a FluxFillPipeline; a Flux Kontext one is tiny-flux's models saved as a
FluxKontextPipeline.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

from infra.engine import CONFIGS_DIR, read_json

TINY_SD_CONFIGS = CONFIGS_DIR / "tiny-sd"
TINY_SDXL_CONFIGS = CONFIGS_DIR / "tiny-sdxl"
TINY_FLUX_CONFIGS = CONFIGS_DIR / "tiny-flux"
TINY_SD3_CONFIGS = CONFIGS_DIR / "tiny-sd3"
TINY_QWEN_IMAGE_CONFIGS = CONFIGS_DIR / "tiny-qwen-image"
TINY_QWEN_IMAGE_EDIT_CONFIGS = CONFIGS_DIR / "tiny-qwen-image-edit"
TINY_Z_IMAGE_CONFIGS = CONFIGS_DIR / "tiny-z-image"
TINY_FLUX2_CONFIGS = CONFIGS_DIR / "tiny-flux2"
TINY_FLUX2_KLEIN_CONFIGS = CONFIGS_DIR / "tiny-flux2-klein"
TINY_CONTROLNET_CONFIGS = CONFIGS_DIR / "controlnet-tiny-sd"
TINY_MOTION_ADAPTER_CONFIGS = CONFIGS_DIR / "tiny-motion-adapter"
TINY_SVD_CONFIGS = CONFIGS_DIR / "tiny-svd"

INPAINT_IN_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent channels
# A Flux Fill transformer on tiny-flux's latents (1 channel, VAE factor 1, packed 2x2): 4 packed latent +
# 4 packed masked-image latent + 4 packed mask channels (vae_scale_factor**2 * 4) in, 4 out.
FLUX_FILL_IN_CHANNELS = 12
FLUX_FILL_OUT_CHANNELS = 4

# The order in which the models draw their random weights from the seeded generator. Changing it
# changes every tiny model's weights (and so every tiny output); a new component goes last.
MODEL_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae", "image_encoder")
# The components saved as files in the config folder (copied, then loaded with their class from
# model_index.json): tokenizers, multimodal processors (Qwen-Image-Edit's Qwen2VLProcessor) and image
# processors (SVD's feature extractor).
TOKENIZER_COMPONENTS = ("tokenizer", "tokenizer_2", "tokenizer_3", "processor", "feature_extractor")

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


def build_from_configs(
    config_dir: Path,
    folder: Path,
    inpaint: bool = False,
    seed: int = 0,
    pipeline: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Save to `folder` the pipeline that the config folder `config_dir` describes, with random
    weights drawn from `seed`; `inpaint` swaps in the inpainting pipeline and a 9-channel UNet.
    `pipeline` names another diffusers pipeline class to save the components as (FluxFillPipeline,
    FluxKontextPipeline, ...), and `overrides` maps a diffusers model component to config values
    that replace its JSON's (a Flux Fill transformer's `in_channels`, ...)."""
    import diffusers
    import torch
    import transformers

    from infra.engine import quiet_libraries

    quiet_libraries()
    overrides = overrides or {}
    index = read_json(config_dir / "model_index.json")
    pipeline_name = pipeline or (INPAINT_PIPELINES[index["_class_name"]] if inpaint else index["_class_name"])
    pipeline_class = getattr(diffusers, pipeline_name)
    accepted = inspect.signature(pipeline_class.__init__).parameters  # FluxFillPipeline takes no image encoder

    components: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list):
            components[name] = value  # a pipeline flag such as force_zeros_for_empty_prompt
        elif value == [None, None] and name in accepted:
            components[name] = None  # an optional component left out (safety checker, image encoder, ...)

    for name in TOKENIZER_COMPONENTS:
        if index.get(name, [None])[0] is not None:
            shutil.copytree(config_dir / name, folder / name, dirs_exist_ok=True)
            tokenizer_class = getattr(transformers, index[name][1])
            components[name] = tokenizer_class.from_pretrained(folder / name)

    torch.manual_seed(seed)
    for name in MODEL_COMPONENTS:
        if index.get(name, [None])[0] is None:  # absent, or an optional component left out
            continue
        library = index[name][0]
        if library == "transformers":
            components[name] = transformers_model_from_config(config_dir / name)
        elif name == "unet" and inpaint:
            components[name] = diffusers_model_from_config(config_dir / name, in_channels=INPAINT_IN_CHANNELS)
        else:
            components[name] = diffusers_model_from_config(config_dir / name, **overrides.get(name, {}))
    components["scheduler"] = scheduler_from_config(config_dir / "scheduler")

    pipeline_class(**components).save_pretrained(folder)


def build_tiny_pipeline(folder: Path, inpaint: bool = False, seed: int = 0) -> None:
    """Save a tiny SD 1.x pipeline (4-channel UNet, or 9-channel for inpainting) to `folder`."""
    build_from_configs(TINY_SD_CONFIGS, folder, inpaint=inpaint, seed=seed)


def build_tiny_sdxl(folder: Path, inpaint: bool = False, seed: int = 0) -> None:
    """Save a tiny SDXL pipeline (StableDiffusionXLPipeline; StableDiffusionXLInpaintPipeline with a
    9-channel UNet for inpainting) to `folder`."""
    build_from_configs(TINY_SDXL_CONFIGS, folder, inpaint=inpaint, seed=seed)


def build_tiny_flux(folder: Path, seed: int = 0, fill: bool = False, kontext: bool = False) -> None:
    """Save a tiny Flux.1 pipeline (FluxPipeline: a 1+1-block FluxTransformer2DModel, CLIP and T5
    text encoders 32 wide, a 1-channel-latent VAE, flow-matching Euler) to `folder`. `fill` saves a
    FluxFillPipeline instead, whose transformer takes the packed masked-image latents and mask too
    (12 input channels, 4 output); `kontext` saves the same components as a FluxKontextPipeline."""
    if fill and kontext:
        raise ValueError("a tiny Flux pipeline is either Fill or Kontext")
    if fill:
        overrides = {"transformer": {"in_channels": FLUX_FILL_IN_CHANNELS, "out_channels": FLUX_FILL_OUT_CHANNELS}}
        build_from_configs(TINY_FLUX_CONFIGS, folder, seed=seed, pipeline="FluxFillPipeline", overrides=overrides)
    elif kontext:
        build_from_configs(TINY_FLUX_CONFIGS, folder, seed=seed, pipeline="FluxKontextPipeline")
    else:
        build_from_configs(TINY_FLUX_CONFIGS, folder, seed=seed)


def build_tiny_sd3(folder: Path, seed: int = 0) -> None:
    """Save a tiny SD3 / SD3.5 pipeline (StableDiffusion3Pipeline: a 1-layer SD3Transformer2DModel
    on 16 latent channels, two CLIP encoders with projection and a T5 encoder, 32 wide) to `folder`."""
    build_from_configs(TINY_SD3_CONFIGS, folder, seed=seed)


def build_tiny_qwen_image(folder: Path, seed: int = 0, edit: bool = False, plus: bool = False) -> None:
    """Save a tiny Qwen-Image pipeline (QwenImagePipeline: a 1-layer QwenImageTransformer2DModel, a
    16-wide 2-layer Qwen2.5-VL text encoder, a 4-channel AutoencoderKLQwenImage, flow-matching Euler)
    to `folder`; `edit` saves QwenImageEditPipeline with the same weights and a Qwen2VLProcessor,
    `plus` (with `edit`) QwenImageEditPlusPipeline, Qwen-Image-Edit-2509's (several images per edit)."""
    build_from_configs(TINY_QWEN_IMAGE_EDIT_CONFIGS if edit else TINY_QWEN_IMAGE_CONFIGS, folder, seed=seed,
                       pipeline="QwenImageEditPlusPipeline" if edit and plus else None)


def build_tiny_z_image(folder: Path, seed: int = 0) -> None:
    """Save a tiny Z-Image pipeline (ZImagePipeline: a 1-layer ZImageTransformer2DModel, a 16-wide
    2-layer Qwen3Model text encoder, a 4-channel AutoencoderKL, flow-matching Euler) to `folder`."""
    build_from_configs(TINY_Z_IMAGE_CONFIGS, folder, seed=seed)


def build_tiny_flux2(folder: Path, seed: int = 0) -> None:
    """Save a tiny Flux.2 [dev] pipeline (Flux2Pipeline: a 1+1-block Flux2Transformer2DModel with
    guidance embedding, a 16-wide 30-layer Mistral3ForConditionalGeneration text encoder with a
    PixtralProcessor as its tokenizer, a 4-channel AutoencoderKLFlux2, flow-matching Euler) to `folder`."""
    build_from_configs(TINY_FLUX2_CONFIGS, folder, seed=seed)


def build_tiny_flux2_klein(folder: Path, seed: int = 0) -> None:
    """Save a tiny Flux.2 [klein] pipeline (Flux2KleinPipeline, distilled: a 1+1-block
    Flux2Transformer2DModel without guidance embedding, a 16-wide 27-layer Qwen3ForCausalLM text
    encoder, a 4-channel AutoencoderKLFlux2, flow-matching Euler) to `folder`."""
    build_from_configs(TINY_FLUX2_KLEIN_CONFIGS, folder, seed=seed)


def build_tiny_svd(folder: Path, seed: int = 0) -> None:
    """Save a tiny Stable Video Diffusion pipeline (StableVideoDiffusionPipeline: a 2-block
    UNetSpatioTemporalConditionModel, a temporal-decoder VAE, a 32-wide CLIP image encoder) to `folder`."""
    build_from_configs(TINY_SVD_CONFIGS, folder, seed=seed)


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
