"""Single-file checkpoints of the flow-matching transformer families (Flux.1, SD3 / SD3.5) ->
diffusers pipelines, fully offline.

Formats
-------
* **Flux.1 transformer files**, as Black Forest Labs and CivitAI publish them (`flux1-dev.safetensors`,
  `flux1-schnell.safetensors`, `flux1-kontext-dev.safetensors`, `flux1-fill-dev.safetensors`, fine-tunes;
  bf16, fp16 or fp8 tensors): the original (BFL) keys
  `double_blocks.N.*`, `single_blocks.N.*`, `img_in.*`, `txt_in.*`, `time_in.*`, `vector_in.*`,
  `guidance_in.*` (dev only), `final_layer.*`, optionally prefixed `model.diffusion_model.`.
* **All-in-one Flux.1 files** (ComfyUI's "checkpoint" saves, e.g. `flux1-dev-fp8.safetensors`): the
  same transformer under `model.diffusion_model.`, plus any of `first_stage_model.*` / `vae.*` (the VAE,
  LDM layout), `text_encoders.clip_l.transformer.*` (CLIP-L) and `text_encoders.t5xxl.transformer.*`
  (T5-XXL), both in the transformers layout.
* **SD3 / SD3.5 files** as Stability AI publishes them (`sd3_medium.safetensors`,
  `sd3_medium_incl_clips.safetensors`, `sd3_medium_incl_clips_t5xxlfp16.safetensors`,
  `sd3.5_large.safetensors`, `sd3.5_large_turbo.safetensors`, `sd3.5_medium.safetensors`, fine-tunes):
  `model.diffusion_model.joint_blocks.N.*` (the MMDiT), `first_stage_model.*` (the VAE) and, when
  included, `text_encoders.clip_l.transformer.*`, `text_encoders.clip_g.transformer.*`,
  `text_encoders.t5xxl.transformer.*`.

Detection (`detect_family_file`, from the key names only: a .safetensors header is enough)
----------------------------------------------------------------------------------------
`double_blocks.*` + `single_blocks.*` -> "flux"; `joint_blocks.*` -> "sd3" (with or without the
`model.diffusion_model.` prefix); anything else (an SD 1.x/2.x/XL UNet checkpoint, a LoRA, ...) -> None,
which `checkpoints.load_pipeline_file` handles or refuses. `load_flux_file` then tells the Flux.1 kinds
apart by img_in's input channels against the base model's VAE (16 latent channels, factor 8): 64 (packed
latents) is text-to-image -> FluxPipeline, or FluxKontextPipeline when model_category flux_kontext is
claimed (Kontext has dev's shapes, so only the claim says so); 384 (+ masked-image latents + packed mask)
is Fill -> FluxFillPipeline. It refuses Flux.1 Depth / Canny (128 channels), Flux.2, Chroma and quantised
files (bitsandbytes NF4, ComfyUI "scaled fp8"). dev, Kontext, Fill and their guidance-distilled
fine-tunes have `guidance_in.*` (`guidance_embeds`), schnell has not.

Where each component comes from
-------------------------------
* The transformer: always the file. Its config is derived from the tensor shapes, so the real 12B
  Flux.1 / 2B-8B SD3 models and the tiny test models load alike:
  Flux: num_layers / num_single_layers = the number of double / single blocks, attention_head_dim =
  the width of the query norm, num_attention_heads = img_in's width / head dim, in_channels = img_in's
  input width, out_channels = final_layer's output width, joint_attention_dim = txt_in's input width,
  pooled_projection_dim = vector_in's, guidance_embeds = whether guidance_in exists, axes_dims_rope =
  the base model's (it must sum to the head dim).
  SD3: num_layers = the number of joint blocks, patch_size / in_channels from x_embedder's convolution,
  pos_embed_max_size = sqrt of pos_embed's length, caption_projection_dim / joint_attention_dim from
  context_embedder, pooled_projection_dim from y_embedder, qk_norm = "rms_norm" when the blocks have
  `ln_q` (3.5; "layer_norm" if those have a bias), dual_attention_layers = the blocks with an `attn2`
  (3.5 medium), attention_head_dim = ln_q's width, else the reference config's (below) if its width
  matches, else 64 (MMDiT's convention: width = 64 x depth); sample_size = the reference config's, else 128.
  The Flux transformer is converted by this module's port of diffusers'
  `convert_flux_transformer_checkpoint_to_diffusers` (which hard-codes Flux.1's 3072 width and 4x MLP,
  so it cannot convert anything else, tiny models included); SD3 by diffusers' own
  `convert_sd3_transformer_checkpoint_to_diffusers`. Every converted tensor must fill exactly one
  parameter of the derived architecture: nothing missing, nothing left over.
* The VAE and text encoders: the file's weights when it carries them (the VAE converted by diffusers'
  `convert_ldm_vae_checkpoint`, the text encoders by stripping their prefix as diffusers does; an SD3
  file's CLIP-L gets an identity text projection, as diffusers' converter gives it), built on the
  base model's configs; else the base model's own.
* Tokenizers and scheduler: the base model's. A Flux base of the other variant gets the variant's
  scheduler settings (`FLUX_SCHEDULER_SETTINGS`: dev shifts with the image size, schnell does not).
  Any Flux.1 pipeline (FluxPipeline, FluxKontextPipeline, FluxFillPipeline) is a base for any Flux.1 file:
  their text encoders, tokenizers and VAE are the same.

The base model is a pipeline of the same family already in the store (a diffusers folder whose
`model_index.json` names FluxPipeline, FluxKontextPipeline or FluxFillPipeline; StableDiffusion3Pipeline).
Flux files always need one: a T5 tokenizer cannot be shipped, and Flux cannot run without T5. SD3
files need one unless they carry CLIP-L, CLIP-G and the VAE (`sd3_medium_incl_clips.safetensors`): then
`configs/sd3` stands in for it (the real SD3 / SD3.5 text encoder, VAE and scheduler configs, CLIP
tokenizers over the shared vocabulary, no T5 tokenizer), and the pipeline runs without T5 as Stability
AI intends for that file.
An SD3 file with T5 weights still needs a base model for the T5 tokenizer.

Errors: every refusal is a `CheckpointError` whose message says what to do, e.g. "a Flux transformer
file needs a base Flux model ...: load one first (model_category flux) and name it in base_model".

Not supported: transformer files in the diffusers layout (upload the diffusers folder instead), GGUF
files, ControlNets / LoRAs / IP-adapters of these families.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from infra.engine import CONFIGS_DIR, read_json
from infra.engine.files.checkpoints import (
    CheckpointError,
    _check_no_meta_tensors,
    _conversion_errors,
    load_tokenizer,
    read_state_dict,
)

Family = Literal["flux", "sd3"]

DIFFUSION_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # diffusers' LDM_VAE_KEYS
# the text encoders of all-in-one files (ComfyUI's / SAI's layout, transformers keys under the prefix)
TEXT_ENCODER_PREFIXES = {
    "text_encoders.clip_l.transformer.": "clip_l",  # CLIP ViT-L/14
    "text_encoders.clip_g.transformer.": "clip_g",  # OpenCLIP ViT-bigG/14 (SD3 only)
    "text_encoders.t5xxl.transformer.": "t5xxl",  # T5 v1.1 XXL encoder
}
# ... and the pipeline component each one is (Flux: CLIPTextModel + T5; SD3: two CLIPTextModelWithProjection + T5)
TEXT_ENCODER_COMPONENTS = {
    "flux": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
}
COMPONENT_PREFIXES = (*VAE_PREFIXES, "text_encoders.", "cond_stage_model.", "conditioner.")

# The architecture folder that stands in for a base model when an SD3 file carries CLIP-L, CLIP-G and the VAE.
SD3_CONFIGS = CONFIGS_DIR / "sd3"

# FLUX.1-dev's and FLUX.1-schnell's scheduler_config.json, where they differ.
FLUX_SCHEDULER_SETTINGS = {
    "dev": {"use_dynamic_shifting": True, "shift": 3.0, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "schnell": {"use_dynamic_shifting": False, "shift": 1.0},
}
FLUX_MLP_RATIO = 4  # FluxTransformer2DModel's blocks have no other
MMDIT_HEAD_DIM = 64  # SD3 / SD3.5: width = 64 x depth, heads = depth
SD3_SAMPLE_SIZE = 128  # latent pixels: 1024 px images

QUANTISED_MARKERS = (".absmax", ".quant_map", ".quant_state", ".nested_absmax", ".scale_weight", ".scale_input")
FLUX2_MARKERS = ("double_stream_modulation_img.", "single_stream_modulation.")
CHROMA_MARKERS = ("distilled_guidance_layer.",)
# The Flux.1 pipelines a transformer file can make, by model_category (their components are the same,
# so any of them is a base for any other): text-to-image (dev, schnell), Kontext (same shapes as dev) and Fill.
FLUX_PIPELINES = {"flux": "FluxPipeline", "flux_kontext": "FluxKontextPipeline", "flux_fill": "FluxFillPipeline"}

BASE_HINT = {
    "flux": "load one first (model_category flux, e.g. black-forest-labs/FLUX.1-dev or FLUX.1-schnell as a "
            "diffusers folder) and name it in base_model",
    "sd3": "load one first (model_category sd3, e.g. stabilityai/stable-diffusion-3.5-large as a diffusers "
           "folder) and name it in base_model",
}
PIPELINE_CLASSES = {"flux": tuple(FLUX_PIPELINES.values()), "sd3": ("StableDiffusion3Pipeline",)}
TITLES = {"flux": "Flux.1", "sd3": "SD3 / SD3.5"}


# --------------------------------------------------------------------------- detection


def read_keys(path: str | Path) -> list[str]:
    """The tensor names of a weights file: from the header alone for .safetensors, else by reading it."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"truncated or corrupt .safetensors file: {exc}") from exc
    return list(read_state_dict(path))


def detect_family_file(keys: Iterable[str]) -> Family | None:
    """"flux" for a Flux-layout transformer (double + single blocks), "sd3" for an MMDiT (joint
    blocks), None for anything else (an SD UNet checkpoint, a LoRA, a VAE, ...)."""
    names = {key.removeprefix(DIFFUSION_PREFIX).split(".", 1)[0] for key in keys}
    if {"double_blocks", "single_blocks"} <= names:
        return "flux"
    if "joint_blocks" in names:
        return "sd3"
    return None


def describe_file(keys: Iterable[str]) -> str:
    """What a weights file is, for an error message: "a Flux.1 transformer (use model_category flux)"."""
    keys = list(keys)
    family = detect_family_file(keys)
    if family == "flux":
        return "a Flux.1 transformer (use model_category flux)"
    if family == "sd3":
        return "an SD3 / SD3.5 model (use model_category sd3)"
    if any(key.startswith(DIFFUSION_PREFIX + "input_blocks.") for key in keys):
        return "a Stable Diffusion 1.x/2.x/XL checkpoint (a UNet)"
    if any(marker in key for key in keys for marker in ("lora_down", "lora_up", "lora_A", "lora_B")):
        return "a LoRA"
    if any(key.startswith(("single_transformer_blocks.", "transformer_blocks.")) for key in keys):
        return "a transformer in the diffusers layout (upload the whole diffusers folder instead)"
    return "not a model this server recognises"


def load_family_file(path: str | Path, base_folder: Path | None, dtype: torch.dtype = torch.float32,
                     category: str | None = None):
    """A Flux.1 or SD3 / SD3.5 single file as a Flux(Fill|Kontext)Pipeline / StableDiffusion3Pipeline
    (see the module doc); `category`, the claimed model_category, picks Kontext for a Flux.1 file."""
    keys = read_keys(path)
    family = detect_family_file(keys)
    if family == "flux":
        return load_flux_file(path, base_folder, dtype, category)
    if family == "sd3":
        return load_sd3_file(path, base_folder, dtype)
    raise CheckpointError(f"the file is not a Flux.1 or SD3 model: it is {describe_file(keys)}")


# --------------------------------------------------------------------------- Flux.1


def load_flux_file(path: str | Path, base_folder: Path | None, dtype: torch.dtype = torch.float32,
                   category: str | None = None):
    """A Flux.1 transformer file (or an all-in-one Flux.1 file) as a pipeline on the CPU, its other
    components taken from the base Flux.1 pipeline folder `base_folder` where the file lacks them.
    The pipeline is a FluxFillPipeline for a Fill transformer, a FluxKontextPipeline when `category`
    (the claimed model_category) is "flux_kontext", else a FluxPipeline; claiming flux_fill for a
    text-to-image transformer, or flux_kontext for a Fill one, is refused."""
    import diffusers
    from diffusers import FluxTransformer2DModel

    _check_family_keys(path, "flux")
    base_index = _base_index(base_folder, "flux", "a Flux transformer file needs a base Flux model for its "
                             "text encoders, tokenizers, VAE and scheduler")
    parts = _split_components(read_state_dict(path))  # no other reference: tensors free as they are used
    transformer_state = parts.pop("transformer")
    base_transformer = _optional_json(base_folder / "transformer" / "config.json")
    config = flux_transformer_config(transformer_state, base_transformer)
    _check_fits_base(config, base_transformer, ("joint_attention_dim", "pooled_projection_dim"), "flux")
    pipeline_class = getattr(diffusers, _flux_pipeline(config, _optional_json(base_folder / "vae" / "config.json"),
                                                       category))
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    with _conversion_errors("Flux.1", "transformer"):
        converted = convert_flux_transformer(transformer_state, inner, FLUX_MLP_RATIO * inner)
    components: dict[str, Any] = {
        "transformer": _build_model(FluxTransformer2DModel, config, converted, dtype, "flux", "transformer",
                                    left_over=transformer_state),
    }
    components.update(_file_components(parts, base_folder, base_index, dtype, "flux"))
    variant = "dev" if config["guidance_embeds"] else "schnell"
    if bool(base_transformer.get("guidance_embeds", False)) != config["guidance_embeds"]:
        components["scheduler"] = _scheduler(base_folder, base_index, FLUX_SCHEDULER_SETTINGS[variant])
    with _conversion_errors("Flux.1", "base model"):
        pipeline = pipeline_class.from_pretrained(base_folder, dtype=dtype, local_files_only=True, **components)
    _check_pipeline(pipeline)
    return pipeline


def flux_transformer_config(state: dict[str, torch.Tensor], base_config: dict[str, Any]) -> dict[str, Any]:
    """The FluxTransformer2DModel config of a BFL-layout state dict (no prefix), from its shapes;
    axes_dims_rope comes from `base_config` (the base model's transformer config)."""
    img_in = _need(state, "img_in.weight", "flux")
    inner, in_channels = img_in.shape
    double, single = _indices(state, "double_blocks."), _indices(state, "single_blocks.")
    norm = state.get("double_blocks.0.img_attn.norm.query_norm.scale",
                     state.get("single_blocks.0.norm.query_norm.scale"))
    if norm is None:
        raise CheckpointError("the Flux transformer has no attention query norm (double_blocks.0.img_attn.norm.*)")
    head_dim = int(norm.shape[0])
    if inner % head_dim:
        raise CheckpointError(f"the Flux transformer's width {inner} is no multiple of its head width {head_dim}")
    mlp = state.get("double_blocks.0.img_mlp.0.weight")
    mlp_hidden = mlp.shape[0] if mlp is not None else state["single_blocks.0.linear1.weight"].shape[0] - 3 * inner
    if mlp_hidden != FLUX_MLP_RATIO * inner:
        raise CheckpointError(f"the Flux transformer's MLPs are {mlp_hidden} wide, not {FLUX_MLP_RATIO} x its width "
                              f"{inner}: not a Flux.1 architecture")
    out_channels = int(_need(state, "final_layer.linear.weight", "flux").shape[0])
    in_channels = int(in_channels)
    axes = list(base_config.get("axes_dims_rope", (16, 56, 56)))
    if sum(axes) != head_dim:
        raise CheckpointError(f"the transformer's attention heads are {head_dim} wide but base_model's rotary "
                              f"embedding covers {sum(axes)} ({axes}): base_model is not a matching Flux.1 model")
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,  # None: as many as in
        "num_layers": len(double),
        "num_single_layers": len(single),
        "attention_head_dim": head_dim,
        "num_attention_heads": int(inner // head_dim),
        "joint_attention_dim": int(_need(state, "txt_in.weight", "flux").shape[1]),
        "pooled_projection_dim": int(_need(state, "vector_in.in_layer.weight", "flux").shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in state,
        "axes_dims_rope": axes,
    }


def convert_flux_transformer(state: dict[str, torch.Tensor], inner_dim: int,
                             mlp_hidden_dim: int) -> dict[str, torch.Tensor]:
    """BFL keys (no prefix) -> FluxTransformer2DModel keys. The mapping of diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers`, key for key, with the single blocks' fused
    qkv+mlp projection split by the given widths instead of Flux.1's 3072 / 12288. Consumes `state`:
    what is left in it afterwards fits no parameter."""
    out: dict[str, torch.Tensor] = {}

    def move(new: str, old: str) -> None:
        out[f"{new}.weight"] = state.pop(f"{old}.weight")
        out[f"{new}.bias"] = state.pop(f"{old}.bias")

    def split(old: str, news: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        for suffix in ("weight", "bias"):
            for new, piece in zip(news, torch.split(state.pop(f"{old}.{suffix}"), sizes, dim=0), strict=True):
                out[f"{new}.{suffix}"] = piece.clone()

    move("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    move("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    move("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    move("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if any("guidance" in key for key in state):
        move("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        move("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    thirds = (inner_dim,) * 3
    for i in sorted(_indices(state, "double_blocks.")):
        old, new = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        move(f"{new}norm1.linear", f"{old}img_mod.lin")
        move(f"{new}norm1_context.linear", f"{old}txt_mod.lin")
        split(f"{old}img_attn.qkv", (f"{new}attn.to_q", f"{new}attn.to_k", f"{new}attn.to_v"), thirds)
        split(f"{old}txt_attn.qkv", (f"{new}attn.add_q_proj", f"{new}attn.add_k_proj", f"{new}attn.add_v_proj"), thirds)
        out[f"{new}attn.norm_q.weight"] = state.pop(f"{old}img_attn.norm.query_norm.scale")
        out[f"{new}attn.norm_k.weight"] = state.pop(f"{old}img_attn.norm.key_norm.scale")
        out[f"{new}attn.norm_added_q.weight"] = state.pop(f"{old}txt_attn.norm.query_norm.scale")
        out[f"{new}attn.norm_added_k.weight"] = state.pop(f"{old}txt_attn.norm.key_norm.scale")
        move(f"{new}ff.net.0.proj", f"{old}img_mlp.0")
        move(f"{new}ff.net.2", f"{old}img_mlp.2")
        move(f"{new}ff_context.net.0.proj", f"{old}txt_mlp.0")
        move(f"{new}ff_context.net.2", f"{old}txt_mlp.2")
        move(f"{new}attn.to_out.0", f"{old}img_attn.proj")
        move(f"{new}attn.to_add_out", f"{old}txt_attn.proj")
    for i in sorted(_indices(state, "single_blocks.")):
        old, new = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(f"{new}norm.linear", f"{old}modulation.lin")
        split(f"{old}linear1", (f"{new}attn.to_q", f"{new}attn.to_k", f"{new}attn.to_v", f"{new}proj_mlp"),
              (*thirds, mlp_hidden_dim))
        out[f"{new}attn.norm_q.weight"] = state.pop(f"{old}norm.query_norm.scale")
        out[f"{new}attn.norm_k.weight"] = state.pop(f"{old}norm.key_norm.scale")
        move(f"{new}proj_out", f"{old}linear2")
    move("proj_out", "final_layer.linear")
    for suffix in ("weight", "bias"):  # BFL's final modulation is (shift, scale), diffusers' (scale, shift)
        out[f"norm_out.linear.{suffix}"] = _swap_halves(state.pop(f"final_layer.adaLN_modulation.1.{suffix}"))
    return out


def _flux_pipeline(config: dict[str, Any], vae_config: dict[str, Any], category: str | None) -> str:
    """The Flux.1 pipeline class for a transformer, from its input channels against the base's VAE:
    packed latents (2x2 patches of the VAE's latent channels) for text-to-image and Kontext; packed
    latents, packed masked-image latents and the packed mask (an 8x8 pixel patch per latent pixel at
    VAE factor 8) for Fill; latents and control latents for Depth / Canny (not supported)."""
    packed = 4 * vae_config.get("latent_channels", 16)
    factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    fill = 2 * packed + 4 * factor * factor
    # any other claim (none, "sd3", ...) is checked by the caller against the pipeline class returned
    channels, claimed = config["in_channels"], FLUX_PIPELINES.get(category or "flux", FLUX_PIPELINES["flux"])
    if channels == packed:
        if claimed == FLUX_PIPELINES["flux_fill"]:
            raise CheckpointError(f"flux_fill was claimed but the transformer is not a Fill one (img_in takes "
                                  f"{channels} channels, a Fill transformer {fill}); use model_category flux")
        return claimed
    if channels == fill and (config["out_channels"] or channels) == packed:
        if claimed == FLUX_PIPELINES["flux_kontext"]:
            raise CheckpointError("flux_kontext was claimed but the transformer is a Flux.1 Fill one; "
                                  "use model_category flux_fill")
        return FLUX_PIPELINES["flux_fill"]
    if channels == 2 * packed:
        raise CheckpointError(f"Flux.1 Depth / Canny models (img_in of {channels} channels) are not supported: "
                              "only Flux.1 text-to-image, Kontext and Fill models")
    raise CheckpointError(f"the transformer takes {channels} input channels, but base_model's VAE gives "
                          f"{packed} (and a Fill transformer takes {fill}): base_model is not a matching Flux.1 model")


def _refuse_flux_variants(keys: list[str]) -> None:
    names = [key.removeprefix(DIFFUSION_PREFIX) for key in keys]
    if any(name.startswith(FLUX2_MARKERS) for name in names):
        raise CheckpointError("Flux.2 checkpoints are not supported: only Flux.1 (dev, schnell and their fine-tunes)")
    if any(name.startswith(CHROMA_MARKERS) for name in names):
        raise CheckpointError("Chroma checkpoints are not supported: only Flux.1 (dev, schnell and their fine-tunes)")


# --------------------------------------------------------------------------- SD3 / SD3.5


def load_sd3_file(path: str | Path, base_folder: Path | None, dtype: torch.dtype = torch.float32,
                  configs: Path = SD3_CONFIGS):
    """An SD3 / SD3.5 single file as a StableDiffusion3Pipeline on the CPU. What the file lacks comes
    from the base SD3 pipeline folder `base_folder`; with no base, `configs` (an SD3 config folder:
    model_index.json, text encoder / VAE / scheduler configs, tokenizers) stands in for its configs and
    the file must carry CLIP-L, CLIP-G and the VAE (T5 too if `configs` has a T5 tokenizer)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    keys = _check_family_keys(path, "sd3")
    if base_folder is not None:
        index = _base_index(base_folder, "sd3", "")
        source = base_folder
    else:
        index, source = read_json(configs / "model_index.json"), configs
        _check_self_contained(_split_components(dict.fromkeys(keys)), configs)  # from the names alone
    parts = _split_components(read_state_dict(path))
    transformer_state = parts.pop("transformer")
    reference = _optional_json(source / "transformer" / "config.json")
    config = sd3_transformer_config(transformer_state, reference)
    _check_fits_base(config, reference, ("in_channels", "joint_attention_dim", "pooled_projection_dim"), "sd3")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    with _conversion_errors("SD3", "transformer"):
        converted = convert_sd3_transformer_checkpoint_to_diffusers(transformer_state)  # consumes what it maps
    components: dict[str, Any] = {
        "transformer": _build_model(SD3Transformer2DModel, config, converted, dtype, "sd3", "transformer",
                                    left_over=transformer_state),
    }
    components.update(_file_components(parts, source, index, dtype, "sd3"))
    if base_folder is not None:
        with _conversion_errors("SD3", "base model"):
            pipeline = StableDiffusion3Pipeline.from_pretrained(base_folder, dtype=dtype, local_files_only=True,
                                                                **components)
    else:
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            components[name] = _tokenizer(configs, index, name)
        components.setdefault("text_encoder_3", None)
        if components["text_encoder_3"] is None:
            components["tokenizer_3"] = None
        components["scheduler"] = _scheduler(configs, index, {})
        pipeline = StableDiffusion3Pipeline(**components)
    _check_pipeline(pipeline)
    return pipeline


def sd3_transformer_config(state: dict[str, torch.Tensor], reference: dict[str, Any]) -> dict[str, Any]:
    """The SD3Transformer2DModel config of an SAI-layout MMDiT state dict (no prefix), from its shapes;
    `reference` (the base model's transformer config, or {}) gives the head width when the shapes
    cannot (no qk norm) and the sample size."""
    proj = _need(state, "x_embedder.proj.weight", "sd3")
    inner, in_channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    layers = _indices(state, "joint_blocks.")
    ln_q = state.get("joint_blocks.0.x_block.attn.ln_q.weight")
    if ln_q is not None:
        head_dim = int(ln_q.shape[0])
    elif reference.get("num_attention_heads", 0) * reference.get("attention_head_dim", 0) == inner:
        head_dim = int(reference["attention_head_dim"])
    else:
        head_dim = MMDIT_HEAD_DIM
    if inner % head_dim:
        raise CheckpointError(f"the SD3 transformer's width {inner} is no multiple of its head width {head_dim}")
    qk_norm = None
    if ln_q is not None:
        qk_norm = "layer_norm" if "joint_blocks.0.x_block.attn.ln_q.bias" in state else "rms_norm"
    positions = int(_need(state, "pos_embed", "sd3").shape[1])
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointError(f"the SD3 transformer's position embedding has {positions} entries, not a square number")
    context = _need(state, "context_embedder.weight", "sd3")
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": int(reference.get("sample_size", SD3_SAMPLE_SIZE)),
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": int(_need(state, "final_layer.linear.weight", "sd3").shape[0]) // (patch * patch),
        "num_layers": len(layers),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": int(context.shape[1]),
        "caption_projection_dim": int(context.shape[0]),
        "pooled_projection_dim": int(_need(state, "y_embedder.mlp.0.weight", "sd3").shape[1]),
        "pos_embed_max_size": side,
        "dual_attention_layers": sorted(i for i in layers if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state),
        "qk_norm": qk_norm,
    }


def _check_self_contained(parts: dict[str, dict[str, torch.Tensor]], configs: Path) -> None:
    """With no base model, the file must carry what a base would give (all but the T5 encoder)."""
    lacking = [what for name, what in (("clip_l", "CLIP-L text encoder (text_encoders.clip_l.*)"),
                                       ("clip_g", "CLIP-G text encoder (text_encoders.clip_g.*)"),
                                       ("vae", "VAE (first_stage_model.*)")) if name not in parts]
    if lacking:
        raise CheckpointError(f"the SD3 file has no {' and no '.join(lacking)}, so it needs a base SD3 model "
                              f"to take them from: {BASE_HINT['sd3']}")
    if "t5xxl" in parts and not (configs / "tokenizer_3").is_dir():
        raise CheckpointError("the SD3 file carries a T5 text encoder, whose tokenizer this server takes from a "
                              f"base SD3 model: {BASE_HINT['sd3']}")


# --------------------------------------------------------------------------- shared


def _check_family_keys(path: str | Path, family: Family) -> list[str]:
    """The file's tensor names, checked (before its tensors are read) to be a model of `family` that
    this module converts."""
    keys = read_keys(path)
    found = detect_family_file(keys)
    if found != family:
        wanted = "a Flux.1 transformer" if family == "flux" else "an SD3 / SD3.5 model"
        raise CheckpointError(f"the file is not {wanted}: "
                              f"it is {describe_file(keys)}")
    quantised = next((key for key in keys if key.endswith(QUANTISED_MARKERS)), None)
    if quantised is not None:
        raise CheckpointError(f"quantised checkpoints (bitsandbytes NF4 / int8, scaled fp8; e.g. {quantised}) are not "
                              "supported: upload the bf16, fp16 or plain fp8 file")
    if family == "flux":
        _refuse_flux_variants(keys)
    return keys


def _split_components(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors by pipeline component (prefixes kept, except the transformer's)."""
    parts: dict[str, dict[str, torch.Tensor]] = {"transformer": {}}
    prefixed = any(key.startswith(DIFFUSION_PREFIX) for key in state)
    vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p + "encoder.") for k in state)), None)
    for key, tensor in state.items():
        encoder = next((prefix for prefix in TEXT_ENCODER_PREFIXES if key.startswith(prefix)), None)
        if key.startswith(DIFFUSION_PREFIX):
            parts["transformer"][key.removeprefix(DIFFUSION_PREFIX)] = tensor
        elif vae_prefix is not None and key.startswith(vae_prefix):
            parts.setdefault("vae", {})[key] = tensor  # convert_ldm_vae_checkpoint strips the prefix itself
        elif encoder is not None:
            parts.setdefault(TEXT_ENCODER_PREFIXES[encoder], {})[key.removeprefix(encoder)] = tensor
        elif not prefixed and not key.startswith(COMPONENT_PREFIXES):
            parts["transformer"][key] = tensor  # a bare BFL / SAI transformer file
    return parts


def _file_components(parts: dict[str, dict[str, torch.Tensor]], source: Path, index: dict[str, Any],
                     dtype: torch.dtype, family: Family) -> dict[str, Any]:
    """The VAE and text encoders that the file carries, built on the configs of `source` (the base
    model's folder, or the stand-in config folder)."""
    import transformers
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    components: dict[str, Any] = {}
    if "vae" in parts:
        config = read_json(source / "vae" / "config.json")
        with _conversion_errors(TITLES[family], "vae"):
            converted = convert_ldm_vae_checkpoint(parts["vae"], config)
        components["vae"] = _build_model(AutoencoderKL, config, converted, dtype, family, "vae")
    for encoder in TEXT_ENCODER_PREFIXES.values():
        if encoder not in parts:
            continue
        name = TEXT_ENCODER_COMPONENTS[family].get(encoder)
        if name is None or index.get(name, [None, None])[1] is None:
            raise CheckpointError(f"the file carries a {encoder} text encoder, which a {TITLES[family]} pipeline "
                                  "has no place for")
        model_class = getattr(transformers, index[name][1])
        identity_projection = family == "sd3" and encoder == "clip_l"
        components[name] = _text_encoder(parts[encoder], model_class, source / name, dtype, name, identity_projection)
    return components


def _text_encoder(state: dict[str, torch.Tensor], model_class, config_dir: Path, dtype: torch.dtype, name: str,
                  identity_projection: bool):
    """A transformers CLIP / T5 encoder from its weights in the transformers layout (prefix removed)."""
    from accelerate import init_empty_weights

    with _conversion_errors(config_dir.parent.name, name):
        config = model_class.config_class.from_pretrained(config_dir)
    with init_empty_weights():
        model = model_class(config)
    wrapped = hasattr(model, "text_model")  # CLIPTextModel is flat since transformers 5.6, ...WithProjection not
    weights = {}
    for key, tensor in state.items():
        key = key if wrapped else key.removeprefix("text_model.")
        if key.endswith("embeddings.position_ids"):
            continue  # a buffer older transformers saved
        weights[key] = tensor.to(dtype)
    if identity_projection:  # diffusers' converter gives an SD3 file's CLIP-L an identity text projection
        width = model.text_projection.weight.shape[1]
        weights["text_projection.weight"] = torch.eye(width, dtype=dtype)
    if not hasattr(model, "text_projection"):
        weights.pop("text_projection.weight", None)  # Flux's CLIP-L has none
    _assign(model, weights, name)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # T5: encoder.embed_tokens is the shared embedding
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    if dtype == torch.float16 and keep_fp32:  # T5's feed-forward output overflows in fp16
        for param_name, param in model.named_parameters():
            if any(module in param_name.split(".") for module in keep_fp32):
                param.data = param.data.float()
    _check_no_meta_tensors(model, name)
    return model.eval()


def _build_model(model_class, config: dict[str, Any], weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 family: Family, name: str, left_over: dict[str, torch.Tensor] | None = None):
    """A diffusers model of `config` holding exactly `weights`, cast to dtype (in place: `weights` is consumed)."""
    from accelerate import init_empty_weights

    if left_over:
        _refuse_keys(name, unexpected=sorted(left_over))
    # buffers too: SD3's position table would be computed (0.9 GB for 3.5 medium) only to be replaced
    with _conversion_errors(TITLES[family], name), init_empty_weights(include_buffers=True):
        model = model_class.from_config(config)
    for key in list(weights):  # one tensor at a time: the uncast one is freed as its cast replaces it
        weights[key] = weights[key].to(dtype)
    _assign(model, weights, name)
    _check_no_meta_tensors(model, name)
    return model.eval()


def _assign(model: torch.nn.Module, weights: dict[str, torch.Tensor], name: str) -> None:
    expected = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = sorted(set(expected) - set(weights) - tied)
    unexpected = sorted(set(weights) - set(expected))
    wrong = [key for key in set(expected) & set(weights) if expected[key].shape != weights[key].shape]
    if missing or unexpected or wrong:
        _refuse_keys(name, missing, unexpected, sorted(wrong), expected, weights)
    model.load_state_dict(weights, strict=False, assign=True)


def _refuse_keys(name: str, missing=(), unexpected=(), wrong=(), expected=None, weights=None) -> None:
    def shown(keys) -> str:
        return ", ".join(list(keys)[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"missing {shown(missing)}")
    if unexpected:
        problems.append(f"weights that fit nothing: {shown(unexpected)}")
    if wrong:
        key = wrong[0]
        problems.append(f"{len(wrong)} of other shapes ({key}: {tuple(weights[key].shape)}, "
                        f"expected {tuple(expected[key].shape)})")
    raise CheckpointError(f"the file's {name} does not fit the architecture derived from it: {'; '.join(problems)}")


def _base_index(base_folder: Path | None, family: Family, need: str) -> dict[str, Any]:
    """The base model's model_index.json, checked to be a pipeline of `family`."""
    if base_folder is None:
        raise CheckpointError(f"{need}: {BASE_HINT[family]}")
    index_file = Path(base_folder) / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"base_model is not a diffusers pipeline (no model_index.json); it must be "
                              f"a {TITLES[family]} model")
    found = read_json(index_file).get("_class_name")
    if found not in PIPELINE_CLASSES[family]:
        raise CheckpointError(f"base_model must be a {TITLES[family]} model ({' / '.join(PIPELINE_CLASSES[family])}); "
                              f"it is a {found}")
    return read_json(index_file)


def _check_fits_base(config: dict[str, Any], reference: dict[str, Any], keys: tuple[str, ...], family: Family) -> None:
    """The file's transformer must take what the base model's VAE and text encoders give."""
    for key in keys:
        if key in reference and reference[key] != config[key]:
            raise CheckpointError(f"the file's transformer has {key} {config[key]} but the base model's has "
                                  f"{reference[key]}: they are not the same {TITLES[family]} architecture")


def _scheduler(folder: Path, index: dict[str, Any], settings: dict[str, Any]):
    import diffusers

    scheduler_class = getattr(diffusers, index["scheduler"][1])
    return scheduler_class.from_pretrained(folder, subfolder="scheduler", **settings)


def _tokenizer(folder: Path, index: dict[str, Any], name: str):
    if not (folder / name).is_dir() or index.get(name, [None, None])[1] is None:
        return None
    if index[name][1].startswith("CLIPTokenizer"):
        return load_tokenizer(folder / name)  # its own vocabulary files, or the shared CLIP one
    import transformers

    return getattr(transformers, index[name][1]).from_pretrained(folder / name)


def _check_pipeline(pipeline) -> None:
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            _check_no_meta_tensors(component, name)


def _need(state: dict[str, torch.Tensor], key: str, family: Family) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the {TITLES[family]} transformer is incomplete: it has no {key}")
    return state[key]


def _indices(state: dict[str, torch.Tensor], prefix: str) -> set[int]:
    return {int(head) for key in state if key.startswith(prefix)
            and (head := key[len(prefix):].split(".", 1)[0]).isdigit()}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}
