"""Single-file checkpoints: the shipped architecture configs, detection from tensor shapes, loading
through diffusers' `from_single_file` offline, and the errors a user sees for bad files.

Full-size models are only ever built on the meta device (no memory, no time); loading end to end
uses the tiny config folders with random weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.initialization import no_init_weights

from infra.engine.files import checkpoints
from infra.engine.files.checkpoints import (
    CONFIGS_DIR,
    CheckpointError,
    component_config_dirs,
    detect_component,
    detect_pipeline,
    load_component_file,
    load_pipeline_file,
    load_tokenizer,
    pipeline_config_dirs,
    read_state_dict,
)

FAMILIES = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
TEXT_PREFIXES = {
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.")},
    "sd2": {"text_encoder": ("open_clip", "cond_stage_model.model.")},
    "sdxl": {
        "text_encoder": ("clip", "conditioner.embedders.0.transformer."),
        "text_encoder_2": ("open_clip", "conditioner.embedders.1.model."),
    },
}


# --------------------------------------------------------------------------- diffusers -> LDM key converters


def unet_to_ldm(state_dict: dict, layers_per_block: int, prefix: str = "model.diffusion_model.") -> dict:
    """A diffusers UNet2DConditionModel state dict in the original LDM layout (any block count)."""
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    resnet = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
    }
    step = layers_per_block + 1
    up_with_attention = {int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state_dict.items():
        if m := re.match(
            r"(time_embedding\.linear_\d|add_embedding\.linear_\d|conv_in|conv_norm_out|conv_out)\.(.*)", key
        ):
            new = f"{top[m[1]]}.{m[2]}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * step + int(m[3])}.{0 if m[2] == 'resnets' else 1}.{m[4]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * step + int(m[3])}.{0 if m[2] == 'resnets' else 1}.{m[4]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            block = int(m[1])
            new = f"output_blocks.{block * step + layers_per_block}.{2 if block in up_with_attention else 1}.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{m[2]}"
        else:
            new = key.replace("mid_block.attentions.0.", "middle_block.1.")
        if "resnets" in key:
            parts = new.split(".")
            parts[-2] = resnet.get(parts[-2], parts[-2])
            new = ".".join(parts)
        out[prefix + new] = value
    return out


def vae_to_ldm(state_dict: dict, levels: int, prefix: str = "first_stage_model.") -> dict:
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state_dict.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.",
            new,
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old_name, ldm_name in attention.items():
                new = new.replace(f"attn_1.{old_name}.", f"attn_1.{ldm_name}.")
            if new.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]  # linear -> 1x1 conv, as in LDM
        out[prefix + new] = value
    return out


def clip_to_ldm(state_dict: dict, prefix: str) -> dict:
    """OpenAI CLIP text model (transformers layout, as in SD 1.x and SDXL's first encoder)."""
    return {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in state_dict.items()}


def open_clip_to_ldm(state_dict: dict, prefix: str) -> dict:
    """OpenCLIP text model layout (SD 2.x, SDXL's second encoder): fused qkv, transposed projection."""
    names = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    state_dict = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    out = {}
    for key, value in state_dict.items():
        if key in names:
            out[prefix + names[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key):
            layer, module, kind = m[1], m[2], m[3]
            base = f"{prefix}transformer.resblocks.{layer}."
            if module == "self_attn.q_proj":
                parts = [state_dict[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{base}attn.in_proj_{kind}"] = torch.cat(parts)
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
                out[f"{base}{layer_names[module]}.{kind}"] = value
    return out


def controlnet_to_ldm(state_dict: dict, layers_per_block: int, prefix: str = "control_model.") -> dict:
    """A diffusers ControlNetModel state dict in the original ControlNet layout."""
    special = {}
    rest = {}
    for key, value in state_dict.items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            special[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif m := re.match(r"controlnet_mid_block\.(.*)", key):
            special[f"middle_block_out.0.{m[1]}"] = value
        elif m := re.match(r"controlnet_cond_embedding\.conv_in\.(.*)", key):
            special[f"input_hint_block.0.{m[1]}"] = value
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
            special[f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"] = value
        elif m := re.match(r"controlnet_cond_embedding\.conv_out\.(.*)", key):
            special[f"input_hint_block.14.{m[1]}"] = value
        else:
            rest[key] = value
    return {prefix + key: value for key, value in {**unet_to_ldm(rest, layers_per_block, ""), **special}.items()}


# --------------------------------------------------------------------------- models from the shipped configs


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def build_models(folder: Path, meta: bool) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder(s) of a pipeline config folder: on the meta device, or random on the CPU."""
    if meta:
        with init_empty_weights(), no_init_weights():
            return models_from_configs(folder)
    torch.manual_seed(0)
    return models_from_configs(folder)


def models_from_configs(folder: Path) -> dict[str, torch.nn.Module]:
    index = read_json(folder / "model_index.json")
    text_classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    models = {
        "unet": UNet2DConditionModel.from_config(read_json(folder / "unet" / "config.json")),
        "vae": AutoencoderKL.from_config(read_json(folder / "vae" / "config.json")),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in index:
            config = CLIPTextConfig.from_json_file(folder / name / "config.json")
            models[name] = text_classes[index[name][1]](config)
    return models


def ldm_state_dict(folder: Path, models: dict[str, torch.nn.Module], family: str) -> dict[str, torch.Tensor]:
    """The models as one single-file checkpoint in the original layout."""
    unet_config = read_json(folder / "unet" / "config.json")
    vae_config = read_json(folder / "vae" / "config.json")
    state = {
        **unet_to_ldm(models["unet"].state_dict(), unet_config["layers_per_block"]),
        **vae_to_ldm(models["vae"].state_dict(), len(vae_config["block_out_channels"])),
    }
    for name, (layout, prefix) in TEXT_PREFIXES[family].items():
        converter = clip_to_ldm if layout == "clip" else open_clip_to_ldm
        state.update(converter(models[name].state_dict(), prefix))
    return state


def as_inpaint(state: dict[str, torch.Tensor], conv_in: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same checkpoint with a 9-channel UNet input (latents + mask + masked-image latents)."""
    return {**state, "model.diffusion_model.input_blocks.0.0.weight": conv_in}


def param_count(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.fixture(scope="module")
def meta_models() -> dict[str, dict[str, torch.nn.Module]]:
    return {name: build_models(CONFIGS_DIR / name, meta=True) for name in FAMILIES}


@pytest.fixture(scope="module")
def meta_checkpoints(meta_models) -> dict[str, dict[str, torch.Tensor]]:
    return {name: ldm_state_dict(CONFIGS_DIR / name, meta_models[name], FAMILIES[name]) for name in FAMILIES}


# --------------------------------------------------------------------------- shipped configs


def test_shipped_configs_have_the_real_model_sizes(meta_models):
    expected = {  # millions of parameters of the released models
        ("sd15", "unet"): 859.52,
        ("sd2", "unet"): 865.91,
        ("sdxl", "unet"): 2567.46,
        ("sd15", "vae"): 83.65,
        ("sd2", "vae"): 83.65,
        ("sdxl", "vae"): 83.65,
        ("sd15", "text_encoder"): 123.06,  # CLIP ViT-L/14
        ("sdxl", "text_encoder"): 123.06,
        ("sd2", "text_encoder"): 340.39,  # OpenCLIP ViT-H/14, 23 of its 24 layers
        ("sdxl", "text_encoder_2"): 694.66,  # OpenCLIP ViT-bigG/14 with projection
    }
    for (folder, component), millions in expected.items():
        count = param_count(meta_models[folder][component])
        assert count == pytest.approx(millions, rel=0.005), (folder, component, count)


def test_shipped_scheduler_and_pipeline_classes():
    def config(folder: str, name: str) -> dict:
        return read_json(CONFIGS_DIR / folder / name)

    assert config("sd15", "scheduler/scheduler_config.json")["_class_name"] == "PNDMScheduler"
    sd2 = config("sd2", "scheduler/scheduler_config.json")
    assert (sd2["_class_name"], sd2["prediction_type"]) == ("DDIMScheduler", "v_prediction")
    assert config("sdxl", "scheduler/scheduler_config.json")["_class_name"] == "EulerDiscreteScheduler"
    assert config("sdxl", "vae/config.json")["scaling_factor"] == 0.13025
    assert config("sdxl", "model_index.json")["_class_name"] == "StableDiffusionXLPipeline"
    for folder in FAMILIES:
        index = config(folder, "model_index.json")
        assert index.get("safety_checker", [None])[0] is None and index.get("feature_extractor", [None])[0] is None


def test_config_folders_are_discovered():
    pipelines = {folder.name for folder in pipeline_config_dirs()}
    # every UNet pipeline folder (the transformer families' tiny folders are no single-file architectures)
    assert pipelines == {folder.parent.parent.name for folder in CONFIGS_DIR.glob("*/unet/config.json")}
    assert {"sd15", "sd2", "sdxl"} <= pipelines and not {"tiny-flux", "tiny-sd3"} & pipelines
    controlnets = {folder.name for folder in component_config_dirs("controlnet")}
    assert {"controlnet-sd15", "controlnet-sdxl"} <= controlnets
    vaes = {str(folder.relative_to(CONFIGS_DIR)) for folder in component_config_dirs("vae")}
    assert {"sd15/vae", "sd2/vae", "sdxl/vae"} <= vaes and "tiny-flux/vae" not in vaes


# --------------------------------------------------------------------------- tokenizers


def test_shared_clip_tokenizer():
    tokenizer = load_tokenizer(CONFIGS_DIR / "sd15" / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tokenizer.model_max_length, tokenizer.pad_token) == (77, "<|endoftext|>")
    for folder in ("sd2/tokenizer", "sdxl/tokenizer_2"):  # the OpenCLIP encoders pad with "!"
        open_clip = load_tokenizer(CONFIGS_DIR / folder)
        assert (open_clip.pad_token, open_clip.pad_token_id, len(open_clip)) == ("!", 0, 49408)
    # the vocabulary is stored once
    vocab = read_json(CONFIGS_DIR / "clip-tokenizer" / "vocab.json")
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    assert not list(CONFIGS_DIR.glob("sd*/tokenizer*/vocab.json"))


# --------------------------------------------------------------------------- detection from shapes


@pytest.mark.parametrize("inpaint", [False, True], ids=["txt2img", "inpaint"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_detects_architecture_from_meta_tensors(meta_checkpoints, name, inpaint):
    state = meta_checkpoints[name]
    if inpaint:
        channels = state["model.diffusion_model.input_blocks.0.0.weight"].shape[0]
        state = as_inpaint(state, torch.empty(channels, 9, 3, 3, device="meta"))
    arch = detect_pipeline(state)
    assert (arch.name, arch.family, arch.inpaint) == (name, FAMILIES[name], inpaint)
    assert arch.config_dir == CONFIGS_DIR / name


def test_detection_names_what_it_found(meta_checkpoints):
    state = dict(meta_checkpoints["sd15"])
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(384, 4, 3, 3, device="meta")
    with pytest.raises(CheckpointError, match="Stable Diffusion 1.x checkpoint.*model channels 384"):
        detect_pipeline(state)
    state = as_inpaint(meta_checkpoints["sd15"], torch.empty(320, 8, 3, 3, device="meta"))
    with pytest.raises(CheckpointError, match="8 input channels"):
        detect_pipeline(state)
    unet_only = {k: v for k, v in meta_checkpoints["sd15"].items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(CheckpointError, match="no text encoder"):
        detect_pipeline(unet_only)


def test_detects_components_from_meta_tensors(meta_models, meta_checkpoints):
    vae_diffusers = meta_models["sd15"]["vae"].state_dict()
    vae_ldm = vae_to_ldm(vae_diffusers, 4, prefix="")
    for state in (vae_diffusers, vae_ldm, vae_to_ldm(vae_diffusers, 4), meta_checkpoints["sdxl"]):
        assert detect_component("vae", state) == CONFIGS_DIR / "sd15" / "vae"  # all SD VAEs share their shapes
    assert detect_component("vae", vae_ldm, config_name="sdxl") == CONFIGS_DIR / "sdxl" / "vae"
    with pytest.raises(CheckpointError, match="no supported vae architecture in configs/controlnet-sd15"):
        detect_component("vae", vae_ldm, config_name="controlnet-sd15")

    for name in ("controlnet-sd15", "controlnet-sdxl"):
        config = read_json(CONFIGS_DIR / name / "config.json")
        with init_empty_weights():
            state = ControlNetModel.from_config(config).state_dict()
        assert detect_component("controlnet", state) == CONFIGS_DIR / name
        for prefix in ("control_model.", ""):
            ldm = controlnet_to_ldm(state, config["layers_per_block"], prefix)
            assert detect_component("controlnet", ldm) == CONFIGS_DIR / name
    with pytest.raises(CheckpointError, match="not a ControlNet.*looks like a VAE"):
        detect_component("controlnet", vae_ldm)


# --------------------------------------------------------------------------- bad files


class TrainingCallback:
    """Stands for the PyTorch Lightning objects that some .ckpt files pickle next to the weights."""


def test_bad_files_give_helpful_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(64, 64)}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt .safetensors file"):
        read_state_dict(truncated)

    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint")
    zipped = tmp_path / "zipped.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, zipped)
    truncated_zip = tmp_path / "truncated.ckpt"
    truncated_zip.write_bytes(zipped.read_bytes()[:2000])
    for path in (text, truncated_zip):
        with pytest.raises(CheckpointError, match="truncated or corrupt .ckpt file, or not a PyTorch checkpoint"):
            read_state_dict(path)
    with pytest.raises(CheckpointError, match="unsupported weights file type '.txt'"):
        read_state_dict(tmp_path / "model.txt")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.safetensors")

    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callbacks": TrainingCallback()}, pickled)
    with pytest.raises(CheckpointError, match="pickled Python objects.*re-save the weights as .safetensors"):
        read_state_dict(pickled)

    random_weights = tmp_path / "random.pt"
    torch.save({"state_dict": {"layer.weight": torch.randn(8, 8), "layer.bias": torch.randn(8)}}, random_weights)
    assert set(read_state_dict(random_weights)) == {"layer.weight", "layer.bias"}  # unwrapped "state_dict"
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint: no UNet weights found"):
        load_pipeline_file(random_weights)
    with pytest.raises(CheckpointError, match="not a VAE"):
        load_component_file("vae", random_weights)

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(CheckpointError, match="no UNet weights found.*looks like a LoRA"):
        load_pipeline_file(lora)


# --------------------------------------------------------------------------- loading end to end (tiny configs)


def save_checkpoint(state: dict[str, torch.Tensor], path: Path) -> Path:
    state = {key: value.contiguous() for key, value in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def random_checkpoint(folder: Path, family: str) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
    models = build_models(folder, meta=False)
    return models, ldm_state_dict(folder, models, family)


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    """Every tensor equal, after rounding the original to the loaded dtype."""
    expected = original.state_dict()
    actual = loaded.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value.to(actual[key].dtype)), key


def tiny_config(name: str) -> Path:
    """A tiny architecture shipped in configs/ (tiny-sd, tiny-sdxl)."""
    return CONFIGS_DIR / name


@pytest.fixture(scope="module")
def tiny_sd() -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
    """Random tiny SD 1.x models and their single-file state dict (copy it before changing it)."""
    return random_checkpoint(tiny_config("tiny-sd"), "sd1")


def test_loads_tiny_sd_checkpoint_and_inpaint_variant(tmp_path, tiny_sd):
    models, state = tiny_sd
    pipeline = load_pipeline_file(save_checkpoint(state, tmp_path / "model.safetensors"))
    assert type(pipeline) is StableDiffusionPipeline and pipeline.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipeline, name), models[name])

    channels = models["unet"].config.block_out_channels[0]
    conv_in = torch.randn(channels, 9, 3, 3)
    inpaint = load_pipeline_file(save_checkpoint(as_inpaint(state, conv_in), tmp_path / "inpaint.ckpt"))
    assert type(inpaint) is StableDiffusionInpaintPipeline
    assert inpaint.unet.config.in_channels == 9
    assert torch.equal(inpaint.unet.conv_in.weight, conv_in)


def test_loads_tiny_sdxl_checkpoint_and_inpaint_variant(tmp_path):
    folder = tiny_config("tiny-sdxl")
    models, state = random_checkpoint(folder, "sdxl")
    pipeline = load_pipeline_file(save_checkpoint(state, tmp_path / "xl.safetensors"), dtype=torch.float16)
    assert type(pipeline) is StableDiffusionXLPipeline
    assert pipeline.unet.dtype == torch.float16
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(pipeline, name), models[name])

    channels = models["unet"].config.block_out_channels[0]
    inpaint_state = as_inpaint(state, torch.randn(channels, 9, 3, 3))
    inpaint = load_pipeline_file(save_checkpoint(inpaint_state, tmp_path / "xl-inpaint.safetensors"))
    assert type(inpaint) is StableDiffusionXLInpaintPipeline and inpaint.unet.config.in_channels == 9


def test_loads_sd2_layout_with_open_clip_and_derives_inpaint_config(tmp_path, monkeypatch):
    """A tiny SD 2.x-shaped folder named "sd2" (OpenCLIP text encoder over the shared vocabulary)."""
    configs = tmp_path / "configs"
    folder = configs / "sd2"
    shutil.copytree(tiny_config("tiny-sd"), folder, ignore=shutil.ignore_patterns("tokenizer"))
    shutil.copytree(CONFIGS_DIR / "sd2" / "tokenizer", folder / "tokenizer")
    shutil.copy(CONFIGS_DIR / "sd2" / "scheduler" / "scheduler_config.json", folder / "scheduler")
    shutil.copy(CONFIGS_DIR / "sd2" / "model_index.json", folder)
    patch_json(folder / "unet" / "config.json", use_linear_projection=True)
    patch_json(
        folder / "text_encoder" / "config.json",
        hidden_act="gelu",
        vocab_size=49408,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    monkeypatch.setattr(checkpoints, "CONFIGS_DIR", configs)

    models, state = random_checkpoint(folder, "sd2")
    pipeline = load_pipeline_file(save_checkpoint(state, tmp_path / "sd2.safetensors"))
    assert type(pipeline) is StableDiffusionPipeline
    assert pipeline.scheduler.config.prediction_type == "v_prediction" and pipeline.tokenizer.pad_token == "!"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipeline, name), models[name])

    channels = models["unet"].config.block_out_channels[0]
    inpaint = load_pipeline_file(save_checkpoint(as_inpaint(state, torch.randn(channels, 9, 3, 3)), tmp_path / "i.pt"))
    assert type(inpaint) is StableDiffusionInpaintPipeline
    assert inpaint.scheduler.config.prediction_type == "epsilon"  # SD 2 inpainting is an epsilon model
    assert (inpaint.unet.config.in_channels, inpaint.unet.config.sample_size) == (9, 64)
    assert read_json(folder / "unet" / "config.json")["in_channels"] == 4  # the shipped folder is untouched


def patch_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**read_json(path), **changes}))


def test_missing_weights_are_refused(tmp_path, tiny_sd):
    _, state = tiny_sd
    without_vae_weight = {k: v for k, v in state.items() if k != "first_stage_model.decoder.conv_out.weight"}
    with pytest.raises(CheckpointError, match="missing weights for vae"):
        load_pipeline_file(save_checkpoint(without_vae_weight, tmp_path / "holey-vae.safetensors"))
    text_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    without_text_weight = {k: v for k, v in state.items() if k != text_key}
    with pytest.raises(
        CheckpointError, match=r"missing weights for text_encoder: final_layer_norm.weight \(1 tensors\)"
    ):
        load_pipeline_file(save_checkpoint(without_text_weight, tmp_path / "holey-text.safetensors"))


def test_loads_tiny_vae_and_controlnet_files(tmp_path, tiny_sd):
    vae = tiny_sd[0]["vae"]
    vae_file = save_checkpoint(vae_to_ldm(vae.state_dict(), 4, prefix=""), tmp_path / "vae.safetensors")
    loaded = load_component_file("vae", vae_file)
    assert type(loaded) is AutoencoderKL
    assert_same_weights(loaded, vae)
    if (CONFIGS_DIR / "tiny-sdxl").is_dir():  # same shapes: config_name picks SDXL's scaling factor
        assert load_component_file("vae", vae_file, config_name="tiny-sdxl").config.scaling_factor == 0.13025

    if not (CONFIGS_DIR / "controlnet-tiny-sd" / "config.json").is_file():
        return
    config = read_json(CONFIGS_DIR / "controlnet-tiny-sd" / "config.json")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_config(config)
    diffusers_file = save_checkpoint(controlnet.state_dict(), tmp_path / "cn.safetensors")
    ldm_file = save_checkpoint(
        controlnet_to_ldm(controlnet.state_dict(), config["layers_per_block"]), tmp_path / "c.pth"
    )
    for path in (diffusers_file, ldm_file):
        loaded = load_component_file("controlnet", path, dtype=torch.float16)
        assert type(loaded) is ControlNetModel and loaded.dtype == torch.float16
        assert_same_weights(loaded, controlnet)
