"""Single-file checkpoints of the transformer families (infra/engine/files/family_files.py): Flux.1
transformer files in Black Forest Labs' layout (bare or all-in-one) and SD3 / SD3.5 files in Stability
AI's, converted offline into diffusers pipelines whose missing components come from a base model.

The fixtures are the tiny models' transformers (and VAEs / text encoders) written back into the
original layouts by the inverse key mappings below; loading them must give back every tensor exactly.
The configs are derived from the shapes, which is also checked at the released models' sizes on meta
tensors (nothing allocated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from PIL import Image
from safetensors.torch import save_file

from infra.engine import LOAD_LOCK, read_json
from infra.engine.files.checkpoints import CheckpointError, load_tokenizer
from infra.engine.files.family_files import (
    SD3_CONFIGS,
    convert_flux_transformer,
    describe_file,
    detect_family_file,
    flux_transformer_config,
    load_family_file,
    load_flux_file,
    load_sd3_file,
    read_keys,
    sd3_transformer_config,
)
from infra.engine.files.tiny import (
    TINY_FLUX_CONFIGS,
    TINY_SD3_CONFIGS,
    build_tiny_flux,
    build_tiny_sd3,
    diffusers_model_from_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFIX = "model.diffusion_model."


# --------------------------------------------------------------------------- inverse key mappings (fixtures only)
#
# These invert diffusers' converters (convert_flux_transformer_checkpoint_to_diffusers, which
# family_files ports, convert_sd3_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint),
# to write a diffusers model's weights in the original single-file layout. Each checks that it used
# every tensor of the model.


class Inverse:
    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.out, self.used = state, {}, set()

    def get(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.state[key]

    def put(self, old: str, new: str) -> None:  # weight and bias
        for suffix in ("weight", "bias"):
            self.out[f"{old}.{suffix}"] = self.get(f"{new}.{suffix}")

    def fuse(self, old: str, news: list[str]) -> None:  # q, k, v (, mlp) -> one projection
        for suffix in ("weight", "bias"):
            self.out[f"{old}.{suffix}"] = torch.cat([self.get(f"{new}.{suffix}") for new in news])

    def swap(self, old: str, new: str) -> None:  # diffusers' (scale, shift) <-> the original (shift, scale)
        for suffix in ("weight", "bias"):
            first, second = self.get(f"{new}.{suffix}").chunk(2)
            self.out[f"{old}.{suffix}"] = torch.cat([second, first])

    def done(self) -> dict[str, torch.Tensor]:
        assert self.used == set(self.state), sorted(set(self.state) - self.used)[:5]
        return self.out


def blocks(state: dict, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})


def flux_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inv = Inverse(state)
    inv.put("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    inv.put("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    inv.put("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    inv.put("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if "time_text_embed.guidance_embedder.linear_1.weight" in state:
        inv.put("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        inv.put("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    inv.put("txt_in", "context_embedder")
    inv.put("img_in", "x_embedder")
    for i in blocks(state, "transformer_blocks."):
        o, n = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        inv.put(o + "img_mod.lin", n + "norm1.linear")
        inv.put(o + "txt_mod.lin", n + "norm1_context.linear")
        inv.fuse(o + "img_attn.qkv", [n + "attn.to_q", n + "attn.to_k", n + "attn.to_v"])
        inv.fuse(o + "txt_attn.qkv", [n + "attn.add_q_proj", n + "attn.add_k_proj", n + "attn.add_v_proj"])
        for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            inv.out[f"{o}{side}_attn.norm.query_norm.scale"] = inv.get(f"{n}attn.{q}.weight")
            inv.out[f"{o}{side}_attn.norm.key_norm.scale"] = inv.get(f"{n}attn.{k}.weight")
        inv.put(o + "img_mlp.0", n + "ff.net.0.proj")
        inv.put(o + "img_mlp.2", n + "ff.net.2")
        inv.put(o + "txt_mlp.0", n + "ff_context.net.0.proj")
        inv.put(o + "txt_mlp.2", n + "ff_context.net.2")
        inv.put(o + "img_attn.proj", n + "attn.to_out.0")
        inv.put(o + "txt_attn.proj", n + "attn.to_add_out")
    for i in blocks(state, "single_transformer_blocks."):
        o, n = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        inv.put(o + "modulation.lin", n + "norm.linear")
        inv.fuse(o + "linear1", [n + "attn.to_q", n + "attn.to_k", n + "attn.to_v", n + "proj_mlp"])
        inv.out[o + "norm.query_norm.scale"] = inv.get(n + "attn.norm_q.weight")
        inv.out[o + "norm.key_norm.scale"] = inv.get(n + "attn.norm_k.weight")
        inv.put(o + "linear2", n + "proj_out")
    inv.put("final_layer.linear", "proj_out")
    inv.swap("final_layer.adaLN_modulation.1", "norm_out.linear")
    return inv.done()


def sd3_to_sai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inv = Inverse(state)
    inv.out["pos_embed"] = inv.get("pos_embed.pos_embed")
    inv.put("x_embedder.proj", "pos_embed.proj")
    inv.put("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    inv.put("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    inv.put("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    inv.put("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    inv.put("context_embedder", "context_embedder")
    layers = blocks(state, "transformer_blocks.")
    for i in layers:
        o, n, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == layers[-1]
        inv.fuse(o + "x_block.attn.qkv", [n + "attn.to_q", n + "attn.to_k", n + "attn.to_v"])
        inv.fuse(o + "context_block.attn.qkv", [n + "attn.add_q_proj", n + "attn.add_k_proj", n + "attn.add_v_proj"])
        if n + "attn.norm_q.weight" in state:
            for block, q, k in (("x_block", "norm_q", "norm_k"), ("context_block", "norm_added_q", "norm_added_k")):
                inv.out[f"{o}{block}.attn.ln_q.weight"] = inv.get(f"{n}attn.{q}.weight")
                inv.out[f"{o}{block}.attn.ln_k.weight"] = inv.get(f"{n}attn.{k}.weight")
        inv.put(o + "x_block.attn.proj", n + "attn.to_out.0")
        if n + "attn2.to_q.weight" in state:
            inv.fuse(o + "x_block.attn2.qkv", [n + "attn2.to_q", n + "attn2.to_k", n + "attn2.to_v"])
            if n + "attn2.norm_q.weight" in state:
                inv.out[o + "x_block.attn2.ln_q.weight"] = inv.get(n + "attn2.norm_q.weight")
                inv.out[o + "x_block.attn2.ln_k.weight"] = inv.get(n + "attn2.norm_k.weight")
            inv.put(o + "x_block.attn2.proj", n + "attn2.to_out.0")
        inv.put(o + "x_block.adaLN_modulation.1", n + "norm1.linear")
        inv.put(o + "x_block.mlp.fc1", n + "ff.net.0.proj")
        inv.put(o + "x_block.mlp.fc2", n + "ff.net.2")
        if last:  # context_pre_only: the last context block only modulates (shift, scale)
            inv.swap(o + "context_block.adaLN_modulation.1", n + "norm1_context.linear")
        else:
            inv.put(o + "context_block.attn.proj", n + "attn.to_add_out")
            inv.put(o + "context_block.adaLN_modulation.1", n + "norm1_context.linear")
            inv.put(o + "context_block.mlp.fc1", n + "ff_context.net.0.proj")
            inv.put(o + "context_block.mlp.fc2", n + "ff_context.net.2")
    inv.put("final_layer.linear", "proj_out")
    inv.swap("final_layer.adaLN_modulation.1", "norm_out.linear")
    return inv.done()


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys -> LDM keys (`first_stage_model.` added by the caller)."""
    levels = len(blocks(state, "decoder.up_blocks."))
    out = {}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace(".mid_block.resnets.0.", ".mid.block_1.").replace(".mid_block.resnets.1.", ".mid.block_2.")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            new = ".".join([parts[0], "down", parts[2], *parts[3:]])
        elif parts[1] == "up_blocks":  # the decoder's levels are numbered the other way round
            new = ".".join([parts[0], "up", str(levels - 1 - int(parts[2])), *parts[3:]])
        new = new.replace(".resnets.", ".block.").replace(".downsamplers.0.", ".downsample.")
        new = new.replace(".upsamplers.0.", ".upsample.")
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            renames = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
            for old, ldm in renames:
                new = new.replace(f".{old}.", f".{ldm}.")
            if tensor.ndim == 2:  # 1x1 convolutions in the original
                tensor = tensor[:, :, None, None]
        out[new] = tensor
    return out


def text_encoder_keys(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers text encoder as an all-in-one file stores it: its HF keys (CLIP under text_model.)."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # T5's tied copy of shared.weight: files store it once
        if "clip" in prefix and not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key  # CLIPTextModel is flat in transformers >= 5.6, its checkpoints are not
        out[prefix + key] = tensor
    return out


# --------------------------------------------------------------------------- helpers


def save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, path)
    return path


def assert_same(model: torch.nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        if key not in skip:
            assert torch.equal(got[key], tensor), key


def run(pipeline) -> None:
    with torch.no_grad():
        # guidance 1: no classifier-free batch (SD3's tiny VAE keeps 64x64 latents: 4096 tokens to attend over)
        image = pipeline(prompt="a red cube", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


def transformer(configs: Path, seed: int, **overrides):
    with LOAD_LOCK:
        torch.manual_seed(seed)
        return diffusers_model_from_config(configs / "transformer", **overrides)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny base pipelines: Flux and SD3 (seed 0), and another Flux (seed 1) whose VAE and text
    encoders an all-in-one file carries."""
    root = tmp_path_factory.mktemp("family-bases")
    with LOAD_LOCK:
        build_tiny_flux(root / "flux")
        build_tiny_flux(root / "flux-other", seed=1)
        build_tiny_sd3(root / "sd3")
    return root


def load_component(folder: Path, name: str):
    import diffusers
    import transformers

    library, class_name = read_json(folder / "model_index.json")[name]
    with LOAD_LOCK:
        return getattr(diffusers if library == "diffusers" else transformers, class_name).from_pretrained(folder / name)


# --------------------------------------------------------------------------- Flux.1


def test_a_flux_schnell_transformer_file_loads_back_exactly_on_the_base_models_components(bases, tmp_path):
    original = load_component(bases / "flux", "transformer")
    weights = original.state_dict()
    path = save(tmp_path / "flux1-schnell.safetensors", flux_to_bfl(weights))  # bare BFL keys, as BFL publish it
    assert detect_family_file(read_keys(path)) == "flux"
    with LOAD_LOCK:
        pipeline = load_flux_file(path, bases / "flux")
    assert type(pipeline).__name__ == "FluxPipeline"
    assert_same(pipeline.transformer, weights)
    assert {k: v for k, v in pipeline.transformer.config.items() if not k.startswith("_")} == \
        {k: v for k, v in original.config.items() if not k.startswith("_")}
    base_vae = load_component(bases / "flux", "vae")
    assert_same(pipeline.vae, base_vae.state_dict())
    assert pipeline.scheduler.config.use_dynamic_shifting is False  # the base's (schnell-like) scheduler
    run(pipeline)


def test_a_flux_dev_file_gets_its_guidance_embedder_block_counts_and_dev_scheduler(bases, tmp_path):
    dev = transformer(TINY_FLUX_CONFIGS, seed=5, guidance_embeds=True, num_layers=2, num_single_layers=3)
    weights = dev.state_dict()
    path = save(tmp_path / "flux1-dev.safetensors", {PREFIX + k: v for k, v in flux_to_bfl(weights).items()})
    with LOAD_LOCK:
        pipeline = load_flux_file(path, bases / "flux", dtype=torch.float32)
    config = pipeline.transformer.config
    assert (config.guidance_embeds, config.num_layers, config.num_single_layers) == (True, 2, 3)
    assert_same(pipeline.transformer, weights)
    assert pipeline.scheduler.config.use_dynamic_shifting is True and pipeline.scheduler.config.shift == 3.0
    run(pipeline)


def test_an_all_in_one_flux_file_brings_its_own_vae_and_text_encoders(bases, tmp_path):
    other = bases / "flux-other"
    parts = {name: load_component(other, name) for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    state = {PREFIX + k: v for k, v in flux_to_bfl(parts["transformer"].state_dict()).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(parts["vae"].state_dict()).items()})
    state.update(text_encoder_keys(parts["text_encoder"], "text_encoders.clip_l.transformer."))
    state.update(text_encoder_keys(parts["text_encoder_2"], "text_encoders.t5xxl.transformer."))
    path = save(tmp_path / "flux1-dev-aio.safetensors", state)
    with LOAD_LOCK:
        pipeline = load_family_file(path, bases / "flux")
    for name, model in parts.items():  # the file's, not the base's (seed 0)
        assert_same(getattr(pipeline, name), model.state_dict())
    assert pipeline.text_encoder_2.encoder.embed_tokens.weight is pipeline.text_encoder_2.shared.weight
    run(pipeline)

    with LOAD_LOCK:  # fp16 (the store precision on a GPU machine): T5's feed-forward outputs stay fp32
        half = load_family_file(path, bases / "flux", dtype=torch.float16)
    assert half.transformer.dtype == half.vae.dtype == half.text_encoder.dtype == torch.float16
    t5 = half.text_encoder_2.encoder.block[0].layer[1].DenseReluDense
    assert (t5.wi.weight.dtype, t5.wo.weight.dtype) == (torch.float16, torch.float32)


def test_fill_and_kontext_files_make_their_pipelines(bases, tmp_path):
    # Fill on tiny-flux's latents: 4 packed latent + 4 packed masked-image + 4 packed mask channels in, 4 out
    fill = transformer(TINY_FLUX_CONFIGS, seed=3, in_channels=12, out_channels=4, guidance_embeds=True)
    path = save(tmp_path / "flux1-fill-dev.safetensors", flux_to_bfl(fill.state_dict()))
    with LOAD_LOCK:
        pipeline = load_flux_file(path, bases / "flux")
    assert type(pipeline).__name__ == "FluxFillPipeline"
    assert_same(pipeline.transformer, fill.state_dict())
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    with torch.no_grad():
        out = pipeline(prompt="a cat", image=image, mask_image=mask, height=64, width=64, num_inference_steps=2,
                       generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(CheckpointError, match="flux_kontext was claimed but the transformer is a Flux.1 Fill one"):
        load_flux_file(path, bases / "flux", category="flux_kontext")

    # Kontext has dev's shapes: the claim makes the pipeline (on any Flux.1 base, a Fill one too)
    dev = save(tmp_path / "flux1-kontext-dev.safetensors", flux_to_bfl(load_component(bases / "flux", "transformer")
                                                                        .state_dict()))
    with LOAD_LOCK:
        assert type(load_flux_file(dev, bases / "flux", category="flux_kontext")).__name__ == "FluxKontextPipeline"
        assert type(load_family_file(dev, bases / "flux", category="sd3")).__name__ == "FluxPipeline"  # claim: caller's
    with pytest.raises(CheckpointError, match="flux_fill was claimed but the transformer is not a Fill one"):
        load_flux_file(dev, bases / "flux", category="flux_fill")


def test_the_flux_converter_is_diffusers_own_mapping_at_flux1_width():
    """diffusers' converter only converts Flux.1's 3072 width: at that width ours gives the same
    tensors (thin ones: the converters only split and move the first dimension)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with init_empty_weights(include_buffers=True):
        real = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)  # FLUX.1-dev widths
    thin, start = {}, 0
    for key, meta in real.state_dict().items():
        count = meta.shape[0]
        thin[key] = torch.arange(start, start + count, dtype=torch.float32).reshape(count, *([1] * (meta.ndim - 1)))
        start += count
    bfl = flux_to_bfl(thin)
    theirs = convert_flux_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in bfl.items()})
    left = dict(bfl)
    ours = convert_flux_transformer(left, 3072, 4 * 3072)
    assert not left and set(ours) == set(theirs) == set(thin)
    for key, tensor in thin.items():
        assert torch.equal(ours[key], theirs[key]) and torch.equal(ours[key], tensor), key


@pytest.mark.parametrize(("name", "config"), [
    ("FLUX.1-dev", {"guidance_embeds": True}),
    ("FLUX.1-schnell", {"guidance_embeds": False}),
])
def test_the_released_flux_configs_are_derived_from_their_shapes(name, config):
    expected = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
                "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56], **config}
    with init_empty_weights(include_buffers=True):
        real = FluxTransformer2DModel(**expected)
    bfl = flux_to_bfl(real.state_dict())
    derived = flux_transformer_config(bfl, {"axes_dims_rope": [16, 56, 56]})
    assert {k: v for k, v in derived.items() if not k.startswith("_")} == expected, name
    converted = convert_flux_transformer(bfl, 3072, 4 * 3072)  # and every tensor lands in its place
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in real.state_dict().items()}


# --------------------------------------------------------------------------- SD3 / SD3.5


def test_an_sd35_file_with_its_vae_loads_back_exactly_and_takes_the_text_encoders_from_the_base(bases, tmp_path):
    # SD3.5-shaped: qk norm (ln_q) and, as in 3.5 medium, a dual-attention (attn2) block; two layers
    sd35 = transformer(TINY_SD3_CONFIGS, seed=7, num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm")
    with LOAD_LOCK:
        torch.manual_seed(8)
        vae = diffusers_model_from_config(TINY_SD3_CONFIGS / "vae")
    state = {PREFIX + k: v for k, v in sd3_to_sai(sd35.state_dict()).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict()).items()})
    path = save(tmp_path / "sd3.5_medium.safetensors", state)
    assert detect_family_file(state) == "sd3"
    with LOAD_LOCK:
        pipeline = load_sd3_file(path, bases / "sd3")
    assert type(pipeline).__name__ == "StableDiffusion3Pipeline"
    config = pipeline.transformer.config
    assert (config.qk_norm, list(config.dual_attention_layers)) == ("rms_norm", [0])
    assert_same(pipeline.transformer, sd35.state_dict())
    assert_same(pipeline.vae, vae.state_dict())
    assert_same(pipeline.text_encoder_3, load_component(bases / "sd3", "text_encoder_3").state_dict())
    run(pipeline)


def test_an_sd3_file_with_all_its_text_encoders_needs_no_base_model(bases, tmp_path):
    folder = bases / "sd3"
    parts = {name: load_component(folder, name) for name in
             ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    state = {PREFIX + k: v for k, v in sd3_to_sai(parts["transformer"].state_dict()).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(parts["vae"].state_dict()).items()})
    for name, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        state.update(text_encoder_keys(parts[name], f"text_encoders.{prefix}.transformer."))
    path = save(tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors", state)
    with LOAD_LOCK:  # configs/tiny-sd3 stands in for a base model's configs (it has a T5 tokenizer)
        pipeline = load_sd3_file(path, None, configs=TINY_SD3_CONFIGS)
    for name, model in parts.items():
        assert_same(getattr(pipeline, name), model.state_dict(), skip=("text_projection.weight",))
    # SD3's CLIP-L projection is the identity, as diffusers' converter makes it
    assert torch.equal(pipeline.text_encoder.text_projection.weight, torch.eye(32))
    run(pipeline)

    # the shipped SD3 configs have no T5 tokenizer: a file with T5 needs a base model for it
    with pytest.raises(CheckpointError, match="T5 text encoder, whose tokenizer .* base_model"):
        load_sd3_file(path, None)
    no_vae = save(tmp_path / "no-vae.safetensors", {k: v for k, v in state.items() if not k.startswith("first_stage")})
    with pytest.raises(CheckpointError, match=r"no VAE \(first_stage_model.\*\), so it needs a base SD3 model"):
        load_sd3_file(no_vae, None)


@pytest.mark.parametrize(("name", "config"), [
    ("stable-diffusion-3-medium", {"num_layers": 24, "num_attention_heads": 24, "pos_embed_max_size": 192,
                                   "dual_attention_layers": [], "qk_norm": None}),
    ("stable-diffusion-3.5-large", {"num_layers": 38, "num_attention_heads": 38, "pos_embed_max_size": 192,
                                    "dual_attention_layers": [], "qk_norm": "rms_norm"}),
    ("stable-diffusion-3.5-medium", {"num_layers": 24, "num_attention_heads": 24, "pos_embed_max_size": 384,
                                     "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}),
])
def test_the_released_sd3_configs_are_derived_from_their_shapes(name, config):
    width = 64 * config["num_attention_heads"]
    expected = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
                "joint_attention_dim": 4096, "caption_projection_dim": width, "pooled_projection_dim": 2048, **config}
    with init_empty_weights(include_buffers=True):
        real = SD3Transformer2DModel(**expected)
    sai = sd3_to_sai(real.state_dict())
    derived = sd3_transformer_config(sai, {})
    assert {k: v for k, v in derived.items() if not k.startswith("_")} == expected, name
    converted = convert_sd3_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in sai.items()})
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in real.state_dict().items()}


def test_the_shipped_sd3_configs_build_the_released_text_encoders_and_vae():
    import transformers

    millions = {"text_encoder": 123.65, "text_encoder_2": 694.66, "vae": 83.82}  # CLIP-L / bigG with projection
    for name, expected in millions.items():
        config_file = SD3_CONFIGS / name / "config.json"
        with init_empty_weights(include_buffers=True):
            if name == "vae":
                model = AutoencoderKL.from_config(read_json(config_file))
            else:
                model_class = getattr(transformers, read_json(config_file)["architectures"][0])
                model = model_class(model_class.config_class.from_json_file(config_file))
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(expected, abs=0.01), name
    # SAI's reference pads CLIP-L's tokens with its end token, CLIP-G's with "!" (id 0)
    clip_l, clip_g = (load_tokenizer(SD3_CONFIGS / name) for name in ("tokenizer", "tokenizer_2"))
    assert (len(clip_l), clip_l.pad_token, clip_g.pad_token_id) == (49408, "<|endoftext|>", 0)
    assert not (SD3_CONFIGS / "tokenizer_3").exists()  # no T5 tokenizer can be shipped


# --------------------------------------------------------------------------- detection and refusals


def test_files_are_detected_as_what_they_are_and_refused_as_what_they_are_not(bases, tmp_path):
    flux = save(tmp_path / "flux.safetensors", flux_to_bfl(load_component(bases / "flux", "transformer").state_dict()))
    sai = sd3_to_sai(load_component(bases / "sd3", "transformer").state_dict())
    sd3 = save(tmp_path / "sd3.safetensors", {PREFIX + k: v for k, v in sai.items()})
    unet = save(tmp_path / "sd15.safetensors", {PREFIX + "input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                                                "cond_stage_model.transformer.text_model.x": torch.zeros(1)})
    assert detect_family_file(read_keys(unet)) is None
    assert "Stable Diffusion 1.x/2.x/XL checkpoint" in describe_file(read_keys(unet))

    with pytest.raises(CheckpointError, match=r"not an SD3 / SD3.5 model: it is a Flux.1 transformer \(use model_cat"):
        load_sd3_file(flux, bases / "sd3")
    with pytest.raises(CheckpointError, match=r"not a Flux.1 transformer: it is an SD3 / SD3.5 model \(use model_cat"):
        load_flux_file(sd3, bases / "flux")
    with pytest.raises(CheckpointError, match="not a Flux.1 transformer: it is a Stable Diffusion 1.x/2.x/XL"):
        load_flux_file(unet, bases / "flux")
    with pytest.raises(CheckpointError, match="not a Flux.1 or SD3 model"):
        load_family_file(unet, bases / "flux")
    with pytest.raises(CheckpointError, match=r"needs a base Flux model .*: load one first \(model_category flux"):
        load_flux_file(flux, None)
    with pytest.raises(CheckpointError, match="base_model must be a Flux.1 model .* it is a StableDiffusion3Pipeline"):
        load_flux_file(flux, bases / "sd3")
    with pytest.raises(CheckpointError, match="no CLIP-L text encoder .* needs a base SD3 model"):
        load_sd3_file(sd3, None)

    state = flux_to_bfl(load_component(bases / "flux", "transformer").state_dict())
    depth = dict(state, **{"img_in.weight": torch.zeros(32, 8)})  # latents + control latents
    with pytest.raises(CheckpointError, match=r"Flux.1 Depth / Canny models \(img_in of 8 channels\) are not"):
        load_flux_file(save(tmp_path / "depth.safetensors", depth), bases / "flux")
    odd = dict(state, **{"img_in.weight": torch.zeros(32, 384)})  # a real Fill transformer's, on the tiny VAE
    with pytest.raises(CheckpointError, match="takes 384 input channels, but base_model's VAE gives 4"):
        load_flux_file(save(tmp_path / "odd.safetensors", odd), bases / "flux")
    broken = {k: v for k, v in state.items() if k != "double_blocks.0.txt_mlp.2.bias"}
    with pytest.raises(CheckpointError, match="transformer does not fit"):
        load_flux_file(save(tmp_path / "broken.safetensors", broken), bases / "flux")
    extra = dict(state, **{"double_blocks.0.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"weights that fit nothing: double_blocks.0.extra.weight"):
        load_flux_file(save(tmp_path / "extra.safetensors", extra), bases / "flux")
    flux2 = dict(state, **{"single_stream_modulation.lin.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="Flux.2 checkpoints are not supported"):
        load_flux_file(save(tmp_path / "flux2.safetensors", flux2), bases / "flux")
    nf4 = dict(state, **{"double_blocks.0.img_mlp.0.weight.absmax": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="quantised checkpoints"):
        load_flux_file(save(tmp_path / "nf4.safetensors", nf4), bases / "flux")
