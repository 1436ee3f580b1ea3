"""The tiny model config folders and the fixture-file writers of tests/model_files.py: every file
they write loads the way real community files load, and changes (or, for single-file checkpoints,
reproduces) the tiny pipelines' output. Tiny sizes: 64x64, 2 steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file

from infra.engine import quiet_libraries
from infra.engine.files.tiny import (
    CONFIGS_DIR,
    TINY_CONTROLNET_CONFIGS,
    TINY_SD_CONFIGS,
    TINY_SDXL_CONFIGS,
    build_tiny_pipeline,
    build_tiny_sdxl,
    read_json,
    write_clip_tokenizer,
)
from tests.conftest import centre_mask, scene
from tests.model_files import (
    write_controlnet,
    write_embedding,
    write_lora,
    write_single_file_checkpoint,
    write_single_file_sdxl_checkpoint,
    write_vae,
)

quiet_libraries()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def generate(pipe, prompt: str = "a photo of a cat", **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, **kwargs}
    result = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return result.images[0]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def same_weights(*models) -> bool:
    first = models[0].state_dict()
    return all(
        other.state_dict().keys() == first.keys()
        and all(torch.equal(first[key], other.state_dict()[key]) for key in first)
        for other in models[1:]
    )


def same_weights_as_saved(model, component_folder) -> bool:
    """`model` holds exactly the weights saved in a pipeline's component folder."""
    saved = load_file(next(component_folder.glob("*.safetensors")))
    state = model.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[key], saved[key]) for key in saved)


def hint_image() -> Image.Image:
    """A ControlNet hint: left half black, right half white."""
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 32, 64))
    return image




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The four tiny pipeline folders: SD 1.x and SDXL, 4- and 9-channel."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline(root / "sd")
    build_tiny_pipeline(root / "sd-inpaint", inpaint=True)
    build_tiny_sdxl(root / "sdxl")
    build_tiny_sdxl(root / "sdxl-inpaint", inpaint=True)
    return {name: root / name for name in ("sd", "sd-inpaint", "sdxl", "sdxl-inpaint")}


@pytest.fixture(scope="module")
def sd(tiny):
    return StableDiffusionPipeline.from_pretrained(tiny["sd"])


@pytest.fixture(scope="module")
def sd_base(sd) -> np.ndarray:
    return generate(sd)


@pytest.fixture(scope="module")
def sdxl(tiny):
    return StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])


@pytest.fixture(scope="module")
def sdxl_base(sdxl) -> np.ndarray:
    return generate(sdxl)


# --- the config folders --------------------------------------------------------------------------


@pytest.mark.parametrize("config_dir, built", [(TINY_SD_CONFIGS, "sd"), (TINY_SDXL_CONFIGS, "sdxl")])
def test_config_folders_are_faithful_and_complete(tiny, config_dir, built):
    """Every component config is exactly what the builder saves; the 9-channel build differs only in
    the UNet's in_channels; the folders hold no weights; every component has its folder."""
    index = read_json(config_dir / "model_index.json")
    assert index == read_json(tiny[built] / "model_index.json")
    for component, entry in index.items():
        if not isinstance(entry, list) or entry == [None, None]:
            continue
        files = [p.name for p in (config_dir / component).iterdir()]
        if component.startswith("tokenizer"):
            assert {"vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"} <= set(files)
            continue
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        assert files == [name], component  # config only, no weights
        assert read_json(config_dir / component / name) == read_json(tiny[built] / component / name), component
    inpaint_unet = read_json(tiny[f"{built}-inpaint"] / "unet" / "config.json")
    assert inpaint_unet == {**read_json(config_dir / "unet" / "config.json"), "in_channels": 9}


@pytest.mark.parametrize("folder, pad_token", [("tiny-sd/tokenizer", "<|endoftext|>"), ("tiny-sdxl/tokenizer_2", "!")])
def test_tokenizer_files_are_what_write_clip_tokenizer_writes(tmp_path, folder, pad_token):
    write_clip_tokenizer(tmp_path, pad_token=pad_token)
    stored = CONFIGS_DIR / folder
    assert sorted(p.name for p in stored.iterdir()) == sorted(p.name for p in tmp_path.iterdir())
    for path in stored.iterdir():
        assert path.read_bytes() == (tmp_path / path.name).read_bytes(), path.name


def test_controlnet_config_matches_the_tiny_unet(tiny):
    unet = UNet2DConditionModel.from_pretrained(tiny["sd"], subfolder="unet")
    config = read_json(TINY_CONTROLNET_CONFIGS / "config.json")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    public = {key: value for key, value in config.items() if not key.startswith("_")}
    assert json.loads(json.dumps({key: controlnet.config[key] for key in public})) == public  # tuples -> lists


# --- the tiny SDXL pipeline ----------------------------------------------------------------------


def test_tiny_sdxl_pipelines(tiny, sdxl, sdxl_base):
    assert sdxl.vae_scale_factor == 8 and sdxl_base.shape == (64, 64, 3)
    assert max_diff(generate(sdxl, clip_skip=8), sdxl_base) > 0  # 12-layer encoders: clip_skip up to 8 works

    # force_zeros_for_empty_prompt: no negative prompt -> zero embeddings, unlike an empty one
    assert sdxl.config.force_zeros_for_empty_prompt
    empty_negative = generate(sdxl, negative_prompt="")
    assert max_diff(empty_negative, sdxl_base) > 0
    sdxl.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        assert generate(sdxl).tobytes() == empty_negative.tobytes()
    finally:
        sdxl.register_to_config(force_zeros_for_empty_prompt=True)

    init = scene(64, 64)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    assert generate(img2img, image=init, strength=0.75).shape == (64, 64, 3)
    inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(tiny["sdxl-inpaint"])
    assert inpaint.unet.config.in_channels == 9
    assert generate(inpaint, image=init, mask_image=centre_mask(64, 64)).shape == (64, 64, 3)


# --- single-file checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_checkpoint_reproduces_the_folder(tiny, sd, sd_base, tmp_path, fmt):
    path = write_single_file_checkpoint(tiny["sd"], tmp_path / f"model.{fmt}", fmt)
    if fmt == "safetensors":
        keys = load_file(path).keys()
        assert "model.diffusion_model.input_blocks.0.0.weight" in keys
        assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in keys
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    loaded = StableDiffusionPipeline.from_single_file(path, config=str(tiny["sd"]), local_files_only=True)
    assert same_weights(loaded.unet, sd.unet) and same_weights(loaded.vae, sd.vae)
    assert same_weights(loaded.text_encoder, sd.text_encoder)
    assert generate(loaded).tobytes() == sd_base.tobytes()


def test_single_file_inpaint_checkpoint_reproduces_the_folder(tiny, tmp_path):
    folder = tiny["sd-inpaint"]
    path = write_single_file_checkpoint(folder, tmp_path / "inpaint.safetensors")
    assert load_file(path)["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    expected = StableDiffusionInpaintPipeline.from_pretrained(folder)
    loaded = StableDiffusionInpaintPipeline.from_single_file(path, config=str(folder), local_files_only=True)
    inputs = {"image": scene(64, 64), "mask_image": centre_mask(64, 64)}
    assert generate(loaded, **inputs).tobytes() == generate(expected, **inputs).tobytes()


def test_single_file_sdxl_checkpoint_reproduces_the_folder(tiny, sdxl, sdxl_base, tmp_path):
    path = write_single_file_sdxl_checkpoint(tiny["sdxl"], tmp_path / "sdxl.safetensors")
    keys = load_file(path).keys()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.9.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    loaded = StableDiffusionXLPipeline.from_single_file(path, config=str(tiny["sdxl"]), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_weights(getattr(loaded, name), getattr(sdxl, name)), name
    # Identical weights, yet not always identical bits: the text projection from_pretrained maps
    # from the file sits at an unaligned address, and the CPU matmul rounds it differently (~1e-7).
    np.testing.assert_allclose(generate(loaded), sdxl_base, atol=1e-4)


def test_single_file_sdxl_inpaint_checkpoint(tiny, tmp_path):
    folder = tiny["sdxl-inpaint"]
    path = write_single_file_sdxl_checkpoint(folder, tmp_path / "sdxl-inpaint.safetensors")
    loaded = StableDiffusionXLInpaintPipeline.from_single_file(path, config=str(folder), local_files_only=True)
    assert loaded.unet.config.in_channels == 9
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_weights_as_saved(getattr(loaded, name), folder / name), name


# --- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_loads_and_changes_the_output(tiny, sd, sd_base, tmp_path, fmt):
    path = write_lora(tiny["sd"], tmp_path / f"{fmt}.safetensors", fmt)
    assert write_lora(tiny["sd"], tmp_path / "again.safetensors", fmt).read_bytes() == path.read_bytes()
    keys = load_file(path).keys()
    if fmt == "kohya":
        assert any(key.startswith("lora_unet_") and key.endswith(".lora_down.weight") for key in keys)
        assert any(key.startswith("lora_te_text_model_encoder_layers_") for key in keys)
    else:
        assert all(key.startswith("unet.") for key in keys)
    sd.load_lora_weights(path, adapter_name="style")
    try:
        assert max_diff(generate(sd), sd_base) > 0.01
    finally:
        sd.unload_lora_weights()
    assert max_diff(generate(sd), sd_base) < 1e-5


def test_sdxl_lora_loads_and_changes_the_output(tiny, sdxl, sdxl_base, tmp_path):
    path = write_lora(tiny["sdxl"], tmp_path / "sdxl.safetensors", "diffusers")
    sdxl.load_lora_weights(path, adapter_name="style")
    try:
        assert max_diff(generate(sdxl), sdxl_base) > 0.01
    finally:
        sdxl.unload_lora_weights()


# --- textual inversion ---------------------------------------------------------------------------


def test_embeddings_load_in_every_format(sd, sd_base, tmp_path):
    files = {
        "safetensors": tmp_path / "style.safetensors",
        "a1111_pt": tmp_path / "style.pt",
        "diffusers": tmp_path / "learned_embeds.safetensors",
    }
    images = {}
    for fmt, path in files.items():
        write_embedding(path, fmt, dim=32, vectors=2)  # the same two vectors (seed 0) in each format
        sd.load_textual_inversion(str(path), token="<x>")
        try:
            assert len(sd.tokenizer) == 514 + 2  # "<x>" and "<x>_1"
            if fmt == "safetensors":
                assert generate(sd).tobytes() == sd_base.tobytes()  # token not in the prompt: no change
            images[fmt] = generate(sd, "a photo of a <x> cat")
        finally:
            sd.unload_textual_inversion()
    assert len(sd.tokenizer) == 514
    assert max_diff(images["safetensors"], generate(sd, "a photo of a <x> cat")) > 0.01
    assert images["safetensors"].tobytes() == images["a1111_pt"].tobytes() == images["diffusers"].tobytes()


# --- VAE -----------------------------------------------------------------------------------------


def test_vae_in_every_layout(tiny, sd, sd_base, tmp_path):
    folder = write_vae(tiny["sd"], tmp_path / "vae", "diffusers_folder")
    single = write_vae(tiny["sd"], tmp_path / "vae.safetensors", "single_file")
    ldm = write_vae(tiny["sd"], tmp_path / "vae-ldm.safetensors", "ldm_single_file")
    assert all(key.startswith("first_stage_model.") for key in load_file(ldm))
    config = {"config": str(tiny["sd"]), "subfolder": "vae", "local_files_only": True}
    vaes = [
        AutoencoderKL.from_pretrained(folder),
        AutoencoderKL.from_single_file(single, **config),
        AutoencoderKL.from_single_file(ldm, **config),
    ]
    assert same_weights(*vaes)
    assert not same_weights(vaes[0], sd.vae)
    original = sd.vae
    sd.vae = vaes[2]
    try:
        assert max_diff(generate(sd), sd_base) > 0.01
    finally:
        sd.vae = original


# --- ControlNet ----------------------------------------------------------------------------------


def test_controlnet_in_both_layouts(tiny, sd, sd_base, tmp_path):
    folder = write_controlnet(tiny["sd"], tmp_path / "controlnet", "diffusers_folder")
    single = write_controlnet(tiny["sd"], tmp_path / "controlnet.safetensors", "single_file")
    from_folder = ControlNetModel.from_pretrained(folder)
    from_single = ControlNetModel.from_single_file(single, config=str(TINY_CONTROLNET_CONFIGS), local_files_only=True)
    assert same_weights(from_folder, from_single)
    pipe = StableDiffusionControlNetPipeline.from_pipe(sd, controlnet=from_single)
    with_hint = generate(pipe, image=hint_image())
    assert max_diff(with_hint, sd_base) > 0.01
    flipped = generate(pipe, image=hint_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert max_diff(with_hint, flipped) > 0.01  # the hint itself matters


def test_sdxl_controlnet(tiny, sdxl, sdxl_base, tmp_path):
    controlnet = ControlNetModel.from_pretrained(write_controlnet(tiny["sdxl"], tmp_path / "controlnet-xl"))
    assert controlnet.config.addition_embed_type == "text_time"
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(sdxl, controlnet=controlnet)
    assert max_diff(generate(pipe, image=hint_image()), sdxl_base) > 0.01
