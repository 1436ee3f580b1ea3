"""Tiny fixture files for tests of the model catalog, written from the tiny pipelines that
`infra.engine.files.tiny` builds: single-file checkpoints in the original LDM / A1111 layout (SD 1.x and
SDXL), LoRAs (diffusers and kohya), textual-inversion embeddings, VAEs and ControlNets.

Every writer is deterministic for a given seed and returns the path it wrote. Random tensors come
from a private `torch.Generator`; where a model's own initialiser draws weights, it runs inside
`torch.random.fork_rng()`, so the global torch RNG is left as it was.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from infra.engine.files.tiny import TINY_CONTROLNET_CONFIGS, diffusers_model_from_config, read_json

LORA_RANK = 4
LORA_SCALE = 0.1  # std of lora_B / lora_up: small enough for fuse/unfuse to stay close, large enough to see
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _is_sdxl(pipeline_dir: Path) -> bool:
    return "text_encoder_2" in read_json(pipeline_dir / "model_index.json")


def _weights(pipeline_dir: Path, component: str) -> dict[str, torch.Tensor]:
    """The saved state dict of one component of a diffusers pipeline folder."""
    folder = pipeline_dir / component
    name = "model.safetensors" if (folder / "model.safetensors").exists() else "diffusion_pytorch_model.safetensors"
    return load_file(folder / name)


def _save_state_dict(state_dict: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    """safetensors, or an A1111 .ckpt (a pickled {"state_dict": ...})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.contiguous() for key, value in state_dict.items()}
    if fmt == "safetensors":
        save_file(state_dict, path)
    elif fmt == "ckpt":
        torch.save({"state_dict": state_dict}, path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}: use 'safetensors' or 'ckpt'")
    return path


# --- diffusers -> LDM key conversion (the reverse of diffusers' single-file converters) -------------

UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_key_to_ldm(key: str, config: dict) -> str:
    """The LDM name (without "model.diffusion_model.") of one diffusers UNet state-dict key.

    LDM numbers the blocks flat: input_blocks.0 is conv_in, then each down block has
    layers_per_block resnet(+attention) entries and one downsampler entry; each up block has
    layers_per_block + 1 entries, its upsampler sitting in the last one after the resnet (and the
    attention, if the block has one)."""
    per_block = config["layers_per_block"] + 1
    for name, ldm_name in UNET_TOP_LEVEL.items():
        if key.startswith(name + "."):
            return ldm_name + key[len(name) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"input_blocks.{1 + int(m[1]) * per_block + int(m[2])}.0.{UNET_RESNET_PARTS[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"middle_block.{2 * int(m[1])}.{UNET_RESNET_PARTS[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"output_blocks.{int(m[1]) * per_block + int(m[2])}.0.{UNET_RESNET_PARTS[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        block = int(m[1])
        has_attention = config["up_block_types"][block].startswith("CrossAttn")
        return f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise ValueError(f"no LDM name for UNet key {key!r}")


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    return {"model.diffusion_model." + unet_key_to_ldm(key, config): value for key, value in state_dict.items()}


VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_ldm(key: str, config: dict) -> str:
    """The LDM name (without "first_stage_model.") of one diffusers AutoencoderKL key. LDM numbers
    the decoder's up blocks in reverse."""
    num_blocks = len(config["block_out_channels"])
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        part = m[3].replace("conv_shortcut", "nin_shortcut")
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{part}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION_PARTS[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict, prefix: str = "first_stage_model.") -> dict:
    out = {}
    for key, value in state_dict.items():
        if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[prefix + vae_key_to_ldm(key, config)] = value
    return out


def clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel in the LDM layout: `<prefix>text_model.*`. transformers >= 5.6 saves the keys
    without "text_model."; LDM files always have it."""
    return {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in state_dict.items()}


OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in the OpenCLIP layout SDXL checkpoints use for their second
    text encoder (`<prefix>transformer.resblocks.N.*`): q/k/v concatenated into in_proj, and
    text_projection stored transposed (x @ text_projection). The reverse of diffusers'
    `convert_open_clip_checkpoint`."""
    weights = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    out = {
        "token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
        "positional_embedding": weights.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": weights.pop("final_layer_norm.weight"),
        "ln_final.bias": weights.pop("final_layer_norm.bias"),
        "text_projection": weights.pop("text_projection.weight").T.contiguous(),
    }
    num_layers = len({key.split(".")[2] for key in weights if key.startswith("encoder.layers.")})
    for i in range(num_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [weights.pop(f"{layer}self_attn.{name}_proj.{param}") for name in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{param}"] = torch.cat(qkv)
            for part, open_clip_part in OPEN_CLIP_LAYER_PARTS.items():
                out[f"{block}{open_clip_part}.{param}"] = weights.pop(f"{layer}{part}.{param}")
    if weights:
        raise ValueError(f"text encoder keys with no OpenCLIP name: {sorted(weights)}")
    return {prefix + key: value for key, value in out.items()}


# --- single-file checkpoints ---------------------------------------------------------------------


def write_single_file_checkpoint(pipeline_dir: Path, path: Path, fmt: str = "safetensors") -> Path:
    """An A1111 / LDM single-file SD 1.x checkpoint of the tiny SD pipeline in `pipeline_dir`
    (4- or 9-channel UNet): `model.diffusion_model.*`, `first_stage_model.*` and
    `cond_stage_model.transformer.text_model.*` keys. fmt: "safetensors" or "ckpt"."""
    unet_config = read_json(pipeline_dir / "unet" / "config.json")
    vae_config = read_json(pipeline_dir / "vae" / "config.json")
    state_dict = {
        **unet_to_ldm(_weights(pipeline_dir, "unet"), unet_config),
        **vae_to_ldm(_weights(pipeline_dir, "vae"), vae_config),
        **clip_to_ldm(_weights(pipeline_dir, "text_encoder"), "cond_stage_model.transformer."),
    }
    return _save_state_dict(state_dict, path, fmt)


def write_single_file_sdxl_checkpoint(pipeline_dir: Path, path: Path, fmt: str = "safetensors") -> Path:
    """A single-file SDXL checkpoint (as Stability / A1111 ship them) of the tiny SDXL pipeline in
    `pipeline_dir`: `model.diffusion_model.*`, `first_stage_model.*`, CLIP-L at
    `conditioner.embedders.0.transformer.text_model.*` and the OpenCLIP-layout second encoder at
    `conditioner.embedders.1.model.*`."""
    unet_config = read_json(pipeline_dir / "unet" / "config.json")
    vae_config = read_json(pipeline_dir / "vae" / "config.json")
    state_dict = {
        **unet_to_ldm(_weights(pipeline_dir, "unet"), unet_config),
        **vae_to_ldm(_weights(pipeline_dir, "vae"), vae_config),
        **clip_to_ldm(_weights(pipeline_dir, "text_encoder"), "conditioner.embedders.0.transformer."),
        **open_clip_to_ldm(_weights(pipeline_dir, "text_encoder_2"), "conditioner.embedders.1.model."),
    }
    return _save_state_dict(state_dict, path, fmt)


# --- LoRA ----------------------------------------------------------------------------------------


def _randomise_lora(model: torch.nn.Module, generator: torch.Generator) -> None:
    """peft starts lora_B at zero (a no-op LoRA): draw A ~ N(0, 1/r) and B ~ N(0, 0.1) instead."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / LORA_RANK)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_SCALE)


def _peft_lora_layers(model: torch.nn.Module, targets: list[str], generator: torch.Generator) -> dict:
    """Add a random rank-4 LoRA to `model` (in place) and return its layers, diffusers-named."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets))
    _randomise_lora(model, generator)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def _write_diffusers_lora(pipeline_dir: Path, path: Path, generator: torch.Generator) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    layers = {"unet_lora_layers": _peft_lora_layers(unet, UNET_LORA_TARGETS, generator)}
    pipeline_class = StableDiffusionXLPipeline if _is_sdxl(pipeline_dir) else StableDiffusionPipeline
    pipeline_class.save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


def _kohya_pair(prefix: str, module: torch.nn.Linear, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.lora_down.weight": torch.randn(LORA_RANK, module.in_features, generator=generator) * LORA_SCALE,
        f"{prefix}.lora_up.weight": torch.randn(module.out_features, LORA_RANK, generator=generator) * LORA_SCALE,
        f"{prefix}.alpha": torch.tensor(float(LORA_RANK)),
    }


def _write_kohya_lora(pipeline_dir: Path, path: Path, generator: torch.Generator) -> Path:
    """A kohya / A1111 LoRA for SD 1.x: UNet attention projections (`lora_unet_<diffusers module
    name with _>`) and text-encoder attention projections (`lora_te_text_model_...`)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    state_dict = {}
    for name, module in unet.named_modules():
        if re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            state_dict |= _kohya_pair("lora_unet_" + name.replace(".", "_"), module, generator)
    for name, module in text_encoder.named_modules():
        if re.search(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$", name):
            full_name = "text_model." + name.removeprefix("text_model.")  # as community files name them
            state_dict |= _kohya_pair("lora_te_" + full_name.replace(".", "_"), module, generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, path)
    return path


def write_lora(pipeline_dir: Path, path: Path, fmt: str = "diffusers", seed: int = 0) -> Path:
    """A random LoRA file (`path`, .safetensors) for the tiny pipeline in `pipeline_dir`.

    fmt "diffusers": UNet attention LoRA written by peft + `save_lora_weights` (SD 1.x or SDXL,
    whichever `pipeline_dir` is); "kohya": `lora_unet_*` / `lora_te_*` keys with
    lora_down / lora_up / alpha (SD 1.x only)."""
    generator = _generator(seed)
    if fmt == "diffusers":
        return _write_diffusers_lora(pipeline_dir, path, generator)
    if fmt == "kohya":
        if _is_sdxl(pipeline_dir):
            raise ValueError("kohya LoRAs are written for SD 1.x pipelines only")
        return _write_kohya_lora(pipeline_dir, path, generator)
    raise ValueError(f"unknown LoRA format {fmt!r}: use 'diffusers' or 'kohya'")


def write_transformer_lora(pipeline_dir: Path, path: Path, fmt: str = "diffusers", seed: int = 0) -> Path:
    """A random LoRA file for the tiny Flux or SD3 pipeline in `pipeline_dir` (its transformer's
    attention projections).

    fmt "diffusers": peft + the pipeline's `save_lora_weights` (`transformer.*.lora_A/B` keys);
    "kohya": Flux only, as sd-scripts writes it: `lora_unet_double_blocks_<i>_{img,txt}_attn_{qkv,proj}`
    with lora_down / lora_up / alpha, the q, k and v projections as one fused `qkv` matrix."""
    import diffusers

    generator = _generator(seed)
    index = read_json(pipeline_dir / "model_index.json")
    transformer = getattr(diffusers, index["transformer"][1]).from_pretrained(pipeline_dir, subfolder="transformer")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        layers = _peft_lora_layers(transformer, UNET_LORA_TARGETS, generator)
        getattr(diffusers, index["_class_name"]).save_lora_weights(
            path.parent, weight_name=path.name, transformer_lora_layers=layers)
        return path
    if fmt != "kohya" or index["_class_name"] != "FluxPipeline":
        raise ValueError("transformer LoRAs are written as 'diffusers' (Flux or SD3) or 'kohya' (Flux)")
    state_dict = {}
    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        for stream, (q, out) in {"img": (attn.to_q, attn.to_out[0]), "txt": (attn.add_q_proj, attn.to_add_out)}.items():
            fused = torch.nn.Linear(q.in_features, 3 * q.out_features)  # (shapes only: the weights are drawn below)
            state_dict |= _kohya_pair(f"lora_unet_double_blocks_{i}_{stream}_attn_qkv", fused, generator)
            state_dict |= _kohya_pair(f"lora_unet_double_blocks_{i}_{stream}_attn_proj", out, generator)
    save_file(state_dict, path)
    return path


# --- textual inversion ---------------------------------------------------------------------------


def write_embedding(
    path: Path, fmt: str = "safetensors", dim: int = 32, vectors: int = 1, seed: int = 0, token: str = "<emb>"
) -> Path:
    """A textual-inversion embedding of `vectors` random vectors of width `dim` (32 = the tiny SD
    text encoder).

    fmt "safetensors": `{"emb_params": t}`; "a1111_pt": an A1111 .pt `{"string_to_param": {"*": t},
    "name": ..., "step": ...}`; "diffusers": `{token: t}` (safetensors, or torch.save for a .bin/.pt
    path)."""
    vectors_tensor = torch.randn(vectors, dim, generator=_generator(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file({"emb_params": vectors_tensor}, path)
    elif fmt == "a1111_pt":
        # "name" is required: a dict with only string_to_param is taken for another format and fails
        torch.save({"string_to_param": {"*": vectors_tensor}, "name": path.stem, "step": 1000}, path)
    elif fmt == "diffusers":
        if path.suffix == ".safetensors":
            save_file({token: vectors_tensor}, path)
        else:
            torch.save({token: vectors_tensor}, path)
    else:
        raise ValueError(f"unknown embedding format {fmt!r}: use 'safetensors', 'a1111_pt' or 'diffusers'")
    return path


# --- VAE -----------------------------------------------------------------------------------------


def write_vae(pipeline_dir: Path, path: Path, layout: str = "diffusers_folder", seed: int = 1) -> Path:
    """A VAE of the same tiny architecture as `pipeline_dir`'s, with other random weights.

    layout "diffusers_folder": `save_pretrained` into the folder `path`; "single_file": the diffusers
    state dict in one safetensors file; "ldm_single_file": the same with LDM `first_stage_model.*` keys."""
    config_path = pipeline_dir / "vae" / "config.json"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = diffusers_model_from_config(config_path)
    if layout == "diffusers_folder":
        vae.save_pretrained(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "single_file":
        save_file(vae.state_dict(), path)
    elif layout == "ldm_single_file":
        save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), read_json(config_path)).items()}, path)
    else:
        raise ValueError(f"unknown VAE layout {layout!r}: use 'diffusers_folder', 'single_file' or 'ldm_single_file'")
    return path


# --- ControlNet ----------------------------------------------------------------------------------

CONTROLNET_OUTPUT_CONVS = ("controlnet_down_blocks.", "controlnet_mid_block.")  # zero-initialised: a no-op


def write_controlnet(pipeline_dir: Path, path: Path, layout: str = "diffusers_folder", seed: int = 0) -> Path:
    """A tiny ControlNet for the (4-channel) tiny SD or SDXL pipeline in `pipeline_dir`:
    `ControlNetModel.from_unet(unet)` with the conditioning embedding of
    `configs/controlnet-tiny-sd` (4 stages: /8, like the VAE). Its zero-initialised output
    convolutions are redrawn from N(0, 0.1) so it changes the output, and its hint embedding is
    redrawn (He-normal) so the hint image changes the output too.

    layout "diffusers_folder": `save_pretrained` into the folder `path`; "single_file": the
    diffusers state dict in one safetensors file."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    if unet.config.in_channels != 4:
        raise ValueError("a ControlNet is built from a 4-channel UNet; pass the base (non-inpainting) pipeline")
    conditioning_channels = read_json(TINY_CONTROLNET_CONFIGS / "config.json")["conditioning_embedding_out_channels"]
    with torch.random.fork_rng():  # the conditioning embedding is not copied from the UNet: seed its weights
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_channels))
    generator = _generator(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith("controlnet_cond_embedding.") and name.endswith(".weight"):
                # He-normal, conv_out (zero-initialised) included: with the default init the hint's
                # signal shrinks ~1000x through these 8 small convolutions and the hint barely matters
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * math.sqrt(2 / fan_in))
            elif name.startswith(CONTROLNET_OUTPUT_CONVS):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    if layout == "diffusers_folder":
        controlnet.save_pretrained(path)
    elif layout == "single_file":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(controlnet.state_dict(), path)
    else:
        raise ValueError(f"unknown ControlNet layout {layout!r}: use 'diffusers_folder' or 'single_file'")
    return path


def write_transformer_controlnet(pipeline_dir: Path, path: Path, seed: int = 0, inpainting: bool = False,
                                 **config) -> Path:
    """A tiny ControlNet for the tiny transformer pipeline in `pipeline_dir` (Flux.1, SD3, Qwen-Image
    or Z-Image: the class its family's ControlNet pipelines take), saved as a diffusers folder at
    `path`. One block, built from the transformer as diffusers does (`from_transformer`; Z-Image's
    from its config: the pipeline shares the transformer's embedders with it), then every
    zero-initialised tensor (output projections, the hint embedder) redrawn from N(0, 0.1) so the
    ControlNet and its hint change the output. `inpainting`: a ControlNet that reads the masked image
    and mask (SD3: one extra conditioning channel, as Alimama's; Qwen-Image: the mask's packed
    channels, as InstantX's; Z-Image: control_in_dim 2 x latent + 1, as Union 2.0, where Union 1.0
    reads the latent channels of a hint only). `config`: extra ControlNet config (a Flux union's `num_mode`)."""
    import diffusers

    transformer_config = read_json(pipeline_dir / "transformer" / "config.json")
    transformer_class = transformer_config["_class_name"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if transformer_class == "ZImageTransformer2DModel":
            latent = transformer_config["in_channels"]
            controlnet = diffusers.ZImageControlNetModel(**{
                "control_layers_places": [0], "control_refiner_layers_places": [0],
                "control_in_dim": 2 * latent + 1 if inpainting else latent,
                "dim": transformer_config["dim"],
                "n_refiner_layers": 1, "n_heads": transformer_config["n_heads"], "n_kv_heads": transformer_config["n_kv_heads"],
                "all_patch_size": transformer_config["all_patch_size"],
                "all_f_patch_size": transformer_config["all_f_patch_size"], "qk_norm": transformer_config["qk_norm"], **config})
        else:
            transformer = getattr(diffusers, transformer_class).from_pretrained(pipeline_dir, subfolder="transformer")
            if transformer_class == "FluxTransformer2DModel":
                controlnet = diffusers.FluxControlNetModel.from_transformer(
                    transformer, num_layers=1, num_single_layers=1, num_attention_heads=transformer_config["num_attention_heads"],
                    attention_head_dim=transformer_config["attention_head_dim"])
                if config:  # (from_transformer takes no config of its own; the weights are redrawn as its own)
                    accepted = inspect.signature(diffusers.FluxControlNetModel.__init__).parameters
                    own = {key: value for key, value in controlnet.config.items() if key in accepted}
                    controlnet = diffusers.FluxControlNetModel(**{**own, **config})
            elif transformer_class == "SD3Transformer2DModel":
                # (not the tiny transformer's weights: its one block is the last, context-only one)
                controlnet = diffusers.SD3ControlNetModel.from_transformer(
                    transformer, num_layers=1, num_extra_conditioning_channels=int(inpainting),
                    load_weights_from_transformer=False)
            elif transformer_class == "QwenImageTransformer2DModel":
                controlnet = diffusers.QwenImageControlNetModel.from_transformer(
                    transformer, num_layers=1, num_attention_heads=transformer_config["num_attention_heads"],
                    attention_head_dim=transformer_config["attention_head_dim"],
                    extra_condition_channels=transformer_config["patch_size"] ** 2 if inpainting else 0)
            else:
                raise ValueError(f"no tiny ControlNet for a {transformer_class}")
    generator = _generator(seed)
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    controlnet.save_pretrained(path)
    return path


# --- ControlNet preprocessors --------------------------------------------------------------------


def write_depth_estimator(path: Path, seed: int = 0) -> Path:
    """A tiny DPT depth-estimation model with its image processor (a transformers folder), the
    shape of the networks `auto_hint` runs for depth ControlNets."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=4, backbone_out_indices=[0, 1, 2, 3],
        num_attention_heads=4, intermediate_size=37, neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(config).eval()
    model.save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# --- multi_lingual's translator ------------------------------------------------------------------


def write_translator(path: Path, seed: int = 0) -> Path:
    """A tiny translator (a 1+1-layer T5ForConditionalGeneration, 32 wide, on tiny-flux's unigram T5
    tokenizer) saved as a transformers folder with its tokenizer: random weights, so its "English"
    is gibberish, but the same text always gives the same words and other texts others."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from infra.engine import LOAD_LOCK
    from infra.engine.files.tiny import TINY_FLUX_CONFIGS

    tokenizer = AutoTokenizer.from_pretrained(TINY_FLUX_CONFIGS / "tokenizer_2")
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1,
                      num_decoder_layers=1, decoder_start_token_id=tokenizer.pad_token_id,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with LOAD_LOCK, torch.random.fork_rng():  # (no model built while a running app loads one: infra.engine)
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # (larger weights: with the default init every text decodes to the same few tokens)
        for param in model.parameters():
            param.mul_(5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- IP-Adapter ----------------------------------------------------------------------------------


def write_ip_adapter(pipeline_dir: Path, path: Path, seed: int = 0, layout: str = "safetensors") -> Path:
    """A tiny IP-Adapter for the tiny SD (or SDXL) pipeline in `pipeline_dir`, as tencent-ailab / h94
    publish them: a folder with the weights file (`image_proj.*`: the image projection to 4 tokens of
    the UNet's cross-attention width; `ip_adapter.{1,3,...}.to_k_ip / to_v_ip`: one pair per
    cross-attention layer, in the UNet's processor order) and a 32-wide CLIPVisionModelWithProjection
    in image_encoder/ (32 px images, projection 32). layout "bin": the nested {"image_proj": ...,
    "ip_adapter": ...} torch file. Random weights of a scale that changes the image."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from infra.engine import LOAD_LOCK

    unet_config = read_json(pipeline_dir / "unet" / "config.json")
    cross = unet_config["cross_attention_dim"]
    channels = unet_config["block_out_channels"]
    with LOAD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=32)).eval()
    generator = _generator(seed)
    tokens, embed = 4, encoder.config.projection_dim
    image_proj = {"proj.weight": torch.randn(tokens * cross, embed, generator=generator) * 0.5,
                  "proj.bias": torch.zeros(tokens * cross), "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key}.{kind}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.5
        key += 2
    path.mkdir(parents=True, exist_ok=True)
    if layout == "bin":
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path / "ip-adapter_tiny.bin")
    else:
        flat = {f"image_proj.{k}": v for k, v in image_proj.items()} | {f"ip_adapter.{k}": v for k, v in ip_adapter.items()}
        save_file(flat, path / "ip-adapter_tiny.safetensors")
    encoder.save_pretrained(path / "image_encoder")
    return path


# --- mask_creator's segmenter --------------------------------------------------------------------


def write_segmenter(path: Path, seed: int = 0) -> Path:
    """A tiny CLIPSeg (CLIPSegForImageSegmentation: 32-wide text and vision towers, 32 px images in
    8 px patches, a 16-wide decoder) with its CLIPSegProcessor (configs/clip-tokenizer and a ViT
    image processor), saved as a transformers folder: random weights, so its masks are noise, but the
    same image and words give the same mask and other words another."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    from infra.engine import CONFIGS_DIR, LOAD_LOCK

    vocab = CONFIGS_DIR / "clip-tokenizer"
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    processor = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = CLIPSegConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32, extract_layers=(0, 1, 2), reduce_dim=16, decoder_intermediate_size=37)
    with LOAD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --- removebg_mask's background remover -----------------------------------------------------------

U2NET_SIZE = 320  # the square rembg's U²-Net sessions resize every image to


def write_background_remover(path: Path, seed: int = 0, side_outputs: int = 2) -> Path:
    """A tiny U²-Net-shaped ONNX graph, written with onnx's helper API (nothing downloaded): one input
    `input.1` of 1 x 3 x 320 x 320 floats (U²-Net's own name and shape, what rembg feeds it), two 3x3
    convolutions (3 -> 4 -> 1 channels, a ReLU between) and a sigmoid, as the first output `d0` of
    1 x 1 x 320 x 320 (rembg's `U2netCustomSession.predict` reads map 0 of the first output and
    min-max scales it), plus `side_outputs` more of the same shape, as U²-Net has its side maps.
    Random weights from `seed`: the mask is noise, but it follows the image (a brighter region gives
    another value) and the same image gives the same mask."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    size = [1, 3, U2NET_SIZE, U2NET_SIZE]
    map_shape = [1, 1, U2NET_SIZE, U2NET_SIZE]
    # positive weights around a mean (no trained saliency, so brightness stands in for it): a bright subject
    # on a dark ground gives a mask with a sure inside, a sure outside and a soft edge, as alpha matting needs
    weights = [
        numpy_helper.from_array(rng.normal(0.1, 0.04, (4, 3, 3, 3)).astype(np.float32), "conv1.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "conv1.bias"),
        numpy_helper.from_array(rng.normal(0.1, 0.04, (1, 4, 3, 3)).astype(np.float32), "conv2.weight"),
        numpy_helper.from_array(np.array([-1.0], dtype=np.float32), "conv2.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv1.weight", "conv1.bias"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["h1r"]),
        helper.make_node("Conv", ["h1r", "conv2.weight", "conv2.bias"], ["logits"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["logits"], ["d0"]),
    ]
    outputs = [helper.make_tensor_value_info("d0", TensorProto.FLOAT, map_shape)]
    for index in range(1, side_outputs + 1):  # U²-Net's side maps: here the same map again
        nodes.append(helper.make_node("Identity", ["d0"], [f"d{index}"]))
        outputs.append(helper.make_tensor_value_info(f"d{index}", TensorProto.FLOAT, map_shape))
    graph = helper.make_graph(nodes, "tiny-u2net", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, size)],
                              outputs, initializer=weights)
    # opset 17 / IR 8: what the onnxruntime build here (and rembg's published u2net.onnx, opset 11) runs
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
