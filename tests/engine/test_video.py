"""text2video: the tiny motion adapter, preparing motion adapters for the store (diffusers folders
and original AnimateDiff single files), AnimateDiff on the tiny SD model, and encoding frames
as mp4 / gif."""

from __future__ import annotations

import gc
import io
import re
import shutil
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from PIL import Image, ImageSequence
from safetensors.torch import load_file, save_file

from infra.catalog.weights import WeightsStore
from infra.engine.cache import ModelCache
from infra.engine.files.checkpoints import CheckpointError
from infra.engine.files.motion import load_motion_adapter, prepare_motion_adapter
from infra.engine.files.tiny import build_tiny_motion_adapter
from infra.engine.protocol import DoesNotFit, Unsupported
from infra.engine.cache import build_scheduler
from infra.engine.types import LoadedModel
from infra.engine.video import VideoPipelines, generate_video
from infra.media import encode_video
from tests.model_files import write_controlnet, write_lora

ADAPTER = "test-motion-adapter"
OTHER_ADAPTER = "test-motion-adapter-seed-1"


@pytest.fixture(scope="module")
def store(models_dir, tmp_path_factory) -> WeightsStore:
    """A store with the tiny SD models (text2img, inpaint) and two tiny motion adapters (seeds 0
    and 1), the adapters prepared the way an uploaded diffusers folder is."""
    root = tmp_path_factory.mktemp("video")
    store = WeightsStore(root / "models")
    for model_id, category in (("tiny-sd", "stable_diffusion"), ("tiny-sd-inpaint", "inpaint")):
        source = WeightsStore(models_dir).folder(model_id)
        store.install(model_id, category, lambda folder, src=source: shutil.copytree(src, folder, dirs_exist_ok=True))
    for model_id, seed in ((ADAPTER, 0), (OTHER_ADAPTER, 1)):
        build_tiny_motion_adapter(root / model_id, seed=seed)
        store.install(
            model_id, "motion_adapter", lambda out, src=root / model_id: prepare_motion_adapter(src, out, torch.float32)
        )
    return store


@pytest.fixture(scope="module")
def cache(store) -> ModelCache:
    return ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12)


def video_params(**overrides) -> dict:
    params = dict(
        prompt="a boat on a lake",
        negative_prompt=None,
        width=64,
        height=64,
        num_frames=4,
        steps=2,
        guidance_scale=7.5,
        seed=1,
        clip_skip=None,
    )
    return {**params, **overrides}


def video(cache: ModelCache, adapter_id: str = ADAPTER, pipelines: VideoPipelines | None = None, **overrides):
    model = cache.model("tiny-sd")
    adapter = cache.component(adapter_id, "motion_adapter")
    scheduler = build_scheduler(model.scheduler_config["_class_name"], model.scheduler_config, False, None)
    with model.lock:
        return generate_video(model, adapter, scheduler, **video_params(**overrides), pipelines=pipelines)


def arrays(frames: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(frame) for frame in frames]


def same_frames(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def to_original_layout(adapter: MotionAdapter) -> dict[str, torch.Tensor]:
    """The adapter's weights with the keys of guoyww's AnimateDiff checkpoints: a temporal_transformer
    level, attention_blocks / norms / ff_norm names, and a pos_encoder.pe in each attention."""
    state = {}
    for key, tensor in adapter.state_dict().items():
        key = re.sub(r"(motion_modules\.\d+\.)", r"\1temporal_transformer.", key)
        if key.endswith("pos_embed.pe"):
            for attention in (0, 1):
                state[key.replace("pos_embed.pe", f"attention_blocks.{attention}.pos_encoder.pe")] = tensor.clone()
            continue
        for diffusers_name, original in (
            (".norm1", ".norms.0"),
            (".norm2", ".norms.1"),
            (".norm3", ".ff_norm"),
            (".attn1", ".attention_blocks.0"),
            (".attn2", ".attention_blocks.1"),
        ):
            key = key.replace(diffusers_name, original)
        state[key] = tensor.contiguous()
    return state


# --------------------------------------------------------------------------- the store


def test_tiny_adapter_is_seeded_and_prepares_as_a_diffusers_motion_adapter(tmp_path):
    build_tiny_motion_adapter(tmp_path / "a")
    build_tiny_motion_adapter(tmp_path / "again")
    build_tiny_motion_adapter(tmp_path / "other", seed=1)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    weights = {
        name: load_file(tmp_path / name / "diffusion_pytorch_model.safetensors") for name in ("a", "again", "other")
    }
    assert all(torch.equal(weights["a"][k], weights["again"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["other"][k]) for k in weights["a"])

    facts = prepare_motion_adapter(tmp_path / "a", tmp_path / "out", torch.float32)
    assert facts == {"category": "motion_adapter", "format": "diffusers", "family": "sd"}
    original = MotionAdapter.from_pretrained(tmp_path / "a")
    loaded = load_motion_adapter(tmp_path / "out", torch.device("cpu"), torch.float32)
    assert isinstance(loaded, MotionAdapter) and not loaded.training
    assert list(loaded.config.block_out_channels) == [32, 64]
    assert state_equal(original, loaded)

    prepare_motion_adapter(tmp_path / "a", tmp_path / "half", torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "half" / "diffusion_pytorch_model.safetensors").values()} == {
        torch.float16
    }


@pytest.mark.parametrize(
    ("fmt", "layout"), [("safetensors", "original"), ("ckpt", "original"), ("safetensors", "diffusers")]
)
def test_a_single_file_motion_module_loads_exactly(tmp_path, fmt, layout):
    """guoyww's AnimateDiff layout (.ckpt or .safetensors), or a diffusers MotionAdapter's weights
    file on its own."""
    build_tiny_motion_adapter(tmp_path / "a")
    original = MotionAdapter.from_pretrained(tmp_path / "a")
    if layout == "original":
        state = to_original_layout(original)
        assert (
            "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q.weight"
            in state
        )
    else:
        state = {k: v.contiguous() for k, v in original.state_dict().items()}
    path = tmp_path / f"mm_tiny.{fmt}"
    if fmt == "safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)

    facts = prepare_motion_adapter(path, tmp_path / "out", torch.float32)
    assert facts == {"category": "motion_adapter", "format": fmt, "family": "sd"}
    loaded = load_motion_adapter(tmp_path / "out", torch.device("cpu"), torch.float32)
    assert loaded.config.motion_max_seq_length == 32 and loaded.config.use_motion_mid_block
    assert state_equal(original, loaded)  # every weight, and the computed positional encodings


def test_an_original_file_without_mid_block_and_24_frames_keeps_that_shape(tmp_path):
    """AnimateDiff v1 (mm_sd_v15.ckpt): no mid-block motion module, 24 frames."""
    torch.manual_seed(3)
    v1_like = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_num_attention_heads=8,
        motion_max_seq_length=24,
        use_motion_mid_block=False,
    )
    save_file(to_original_layout(v1_like), tmp_path / "mm_v1.safetensors")
    prepare_motion_adapter(tmp_path / "mm_v1.safetensors", tmp_path / "out", torch.float32)
    loaded = load_motion_adapter(tmp_path / "out", torch.device("cpu"), torch.float32)
    assert loaded.config.motion_max_seq_length == 24 and not loaded.config.use_motion_mid_block
    assert state_equal(v1_like, loaded)


def test_what_is_not_a_motion_adapter_is_refused(store, tmp_path):
    pipeline_folder = store.folder("tiny-sd")
    with pytest.raises(CheckpointError, match="no config.json"):
        prepare_motion_adapter(pipeline_folder, tmp_path / "out1", torch.float32)
    controlnet = write_controlnet(pipeline_folder, tmp_path / "controlnet")
    with pytest.raises(CheckpointError, match="ControlNetModel, not a MotionAdapter"):
        prepare_motion_adapter(controlnet, tmp_path / "out2", torch.float32)
    lora = write_lora(pipeline_folder, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="not an AnimateDiff motion module"):
        prepare_motion_adapter(lora, tmp_path / "out3", torch.float32)
    save_file(
        load_file(pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors"), tmp_path / "unet.safetensors"
    )
    with pytest.raises(CheckpointError, match="not an AnimateDiff motion module"):
        prepare_motion_adapter(tmp_path / "unet.safetensors", tmp_path / "out4", torch.float32)
    # a MotionAdapter config whose weights are of another shape
    broken = tmp_path / "broken"
    build_tiny_motion_adapter(broken)
    config = (
        (broken / "config.json").read_text().replace('"motion_layers_per_block": 1', '"motion_layers_per_block": 2')
    )
    (broken / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="does not load"):
        prepare_motion_adapter(broken, tmp_path / "out5", torch.float32)
    # an original file with a layer missing
    build_tiny_motion_adapter(tmp_path / "a")
    state = to_original_layout(MotionAdapter.from_pretrained(tmp_path / "a"))
    save_file({k: v for k, v in state.items() if "ff.net.2" not in k}, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="not a complete AnimateDiff motion module"):
        prepare_motion_adapter(tmp_path / "partial.safetensors", tmp_path / "out6", torch.float32)
    assert not any((tmp_path / f"out{i}").exists() for i in range(1, 7))


# --------------------------------------------------------------------------- generation


def test_a_video_has_the_requested_frames_and_size(cache):
    frames = video(cache, num_frames=5, width=64, height=48)
    assert len(frames) == 5
    assert all(isinstance(f, Image.Image) and f.size == (64, 48) and f.mode == "RGB" for f in frames)
    single = video(cache, num_frames=1)
    assert len(single) == 1 and single[0].size == (64, 64)


def test_the_seed_fixes_the_video(cache):
    first = video(cache, seed=7)
    assert same_frames(first, video(cache, seed=7))
    assert not same_frames(first, video(cache, seed=8))


def test_frames_differ_from_each_other_and_the_adapter_shapes_them(cache):
    frames = arrays(video(cache))
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            assert np.abs(frames[i].astype(int) - frames[j].astype(int)).mean() > 1, (i, j)
    # another adapter (other random weights), same model and seed: another video
    assert not same_frames(video(cache), video(cache, adapter_id=OTHER_ADAPTER))


def test_improved_sampling_runs_free_init_and_leaves_the_pipeline_as_it_was(cache):
    pipelines = VideoPipelines()
    plain = video(cache, pipelines=pipelines)
    improved = video(cache, pipelines=pipelines, free_init_iterations=3)
    assert not same_frames(plain, improved)  # FreeInit re-denoised the video
    assert same_frames(improved, video(cache, pipelines=pipelines, free_init_iterations=3))  # seeded all the same
    pipeline = pipelines.get(cache.model("tiny-sd"), cache.component(ADAPTER, "motion_adapter"))
    assert not pipeline.free_init_enabled  # switched off after the job: the next one is plain
    assert same_frames(plain, video(cache, pipelines=pipelines))


def test_the_upscaling_pass_enlarges_and_repaints_the_frames(cache):
    pipelines = VideoPipelines()
    plain = video(cache, pipelines=pipelines, width=32, height=32)
    pass_ = {"width": 64, "height": 48, "strength": 0.5, "guidance_scale": 7.5, "steps": 4}
    upscaled = video(cache, pipelines=pipelines, width=32, height=32, upscale=pass_)
    assert len(upscaled) == len(plain) and {frame.size for frame in upscaled} == {(64, 48)}
    enlarged = [frame.resize((64, 48), Image.Resampling.LANCZOS) for frame in plain]
    assert not same_frames(upscaled, enlarged)  # denoised again, not only resampled
    assert same_frames(upscaled, video(cache, pipelines=pipelines, width=32, height=32, upscale=pass_))
    barely = video(cache, pipelines=pipelines, width=32, height=32, upscale={**pass_, "strength": 0.1})
    assert same_frames(barely, enlarged)  # 4 steps x 0.1: not one step, the frames only enlarged
    assert same_frames(plain, video(cache, pipelines=pipelines, width=32, height=32))  # the pipeline as it was


def test_prompt_negative_prompt_and_clip_skip_reach_the_pipeline(cache):
    base = video(cache)
    assert not same_frames(base, video(cache, prompt="a red car in the desert"))
    assert not same_frames(base, video(cache, negative_prompt="blurry"))
    assert not same_frames(base, video(cache, clip_skip=1))
    assert "text_model" not in vars(cache.model("tiny-sd").pipeline.text_encoder)  # the clip_skip alias is gone


def text2img(cache: ModelCache) -> np.ndarray:
    model = cache.model("tiny-sd")
    pipeline = cache.pipeline(model, "text2img", model.scheduler_config["_class_name"], False, None)
    with model.lock, torch.inference_mode():
        image = pipeline(
            "a boat on a lake",
            num_inference_steps=2,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(3),
        ).images[0]
    return np.asarray(image)


def test_text2img_on_the_model_is_unchanged_by_a_video(cache):
    model = cache.model("tiny-sd")
    unet = model.pipeline.unet
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    before = text2img(cache)
    video(cache, adapter_id=OTHER_ADAPTER)
    assert model.pipeline.unet is unet and type(unet) is UNet2DConditionModel
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())
    assert np.array_equal(before, text2img(cache))


def test_video_pipelines_are_cached_share_the_weights_and_go_with_the_model(store):
    cache = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12)
    pipelines = VideoPipelines(max_entries=1)
    model = cache.model("tiny-sd")
    adapter = cache.component(ADAPTER, "motion_adapter")
    first = pipelines.get(model, adapter)
    assert pipelines.get(model, adapter) is first and len(pipelines) == 1
    # no copy: the motion UNet's tensors are the model's UNet's and the adapter's
    assert first.unet.conv_in.weight.data_ptr() == model.pipeline.unet.conv_in.weight.data_ptr()
    motion = first.unet.down_blocks[0].motion_modules[0].proj_in.weight
    assert motion.data_ptr() == adapter.down_blocks[0].motion_modules[0].proj_in.weight.data_ptr()
    assert first.vae is model.pipeline.vae and first.text_encoder is model.pipeline.text_encoder
    # bounded: another adapter replaces the entry
    other = cache.component(OTHER_ADAPTER, "motion_adapter")
    assert pipelines.get(model, other) is not first and len(pipelines) == 1
    # the model leaves the model cache: its video pipeline goes too
    del first, adapter, other
    cache.clear()
    del model
    gc.collect()
    assert len(pipelines) == 0


def test_a_lora_loaded_in_the_model_does_not_reach_the_video(store, cache, tmp_path):
    lora_cache = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12)
    model = lora_cache.model("tiny-sd")
    model.pipeline.load_lora_weights(
        str(write_lora(store.folder("tiny-sd"), tmp_path / "lora.safetensors")), adapter_name="x"
    )
    assert any(".base_layer." in key for key in model.pipeline.unet.state_dict())  # peft wrapped the layers
    assert same_frames(video(lora_cache, pipelines=VideoPipelines()), video(cache))


def test_unsupported_requests_are_engine_errors(cache):
    with pytest.raises(DoesNotFit, match="between 1 and 32"):
        video(cache, num_frames=33)
    with pytest.raises(DoesNotFit, match="multiples of 8"):
        video(cache, width=60)
    model = cache.model("tiny-sd")
    sdxl = LoadedModel("tiny-sdxl", ("tiny-sdxl", 0.0), model.pipeline, model.scheduler_config, "sdxl", 0)
    adapter = cache.component(ADAPTER, "motion_adapter")
    scheduler = build_scheduler("DDIMScheduler", model.scheduler_config, False, None)
    with pytest.raises(Unsupported, match="Stable Diffusion 1.x"):
        generate_video(sdxl, adapter, scheduler, **video_params())
    inpaint = cache.model("tiny-sd-inpaint")
    with pytest.raises(Unsupported, match="inpainting model"):
        generate_video(inpaint, adapter, scheduler, **video_params())


# --------------------------------------------------------------------------- encoding


def gradient_frames(count: int, width: int, height: int) -> list[Image.Image]:
    """Smooth, distinct frames (a moving gradient) that survive lossy encoding recognisably."""
    x = np.arange(width)[None, :, None]
    y = np.arange(height)[:, None, None]
    return [
        Image.fromarray(((x * 3 + y * 2 + i * 20 + np.array([0, 60, 120])) % 256).astype(np.uint8))
        for i in range(count)
    ]


def decode_mp4(data: bytes, tmp_path: Path) -> tuple[dict, list[np.ndarray]]:
    path = tmp_path / "decoded.mp4"
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    size = meta["size"]
    frames = [np.frombuffer(raw, np.uint8).reshape(size[1], size[0], 3) for raw in reader]
    return meta, frames


@pytest.mark.parametrize(("width", "height", "stored"), [(64, 48, (64, 48)), (65, 63, (66, 64))])
def test_mp4_is_h264_and_decodes_to_the_frames(tmp_path, width, height, stored):
    frames = gradient_frames(6, width, height)
    data = encode_video(frames, 8, "mp4")
    assert data[4:8] == b"ftyp"
    assert 0 < data.find(b"moov") < data.find(b"mdat")  # faststart: the index comes first
    meta, decoded = decode_mp4(data, tmp_path)
    assert meta["codec"] == "h264" and meta["fps"] == 8
    assert meta["size"] == stored  # odd sizes get one more column / row (yuv420p needs even sizes)
    assert len(decoded) == 6
    for original, back in zip(arrays(frames), decoded):
        assert np.abs(back[:height, :width].astype(int) - original.astype(int)).mean() < 8


def test_mp4_of_a_generated_video(cache, tmp_path):
    frames = video(cache, num_frames=3)
    meta, decoded = decode_mp4(encode_video(frames, 8, "mp4"), tmp_path)
    assert len(decoded) == 3 and meta["size"] == (64, 64)


@pytest.mark.parametrize(("fps", "duration"), [(10, 100), (8, 120)])  # GIF delays are in 1/100 s
def test_gif_decodes_to_the_frames_with_their_duration(fps, duration):
    frames = gradient_frames(5, 40, 30)
    gif = Image.open(io.BytesIO(encode_video(frames, fps, "gif")))
    assert gif.format == "GIF" and gif.size == (40, 30) and gif.info["loop"] == 0
    decoded = list(ImageSequence.Iterator(gif))
    assert len(decoded) == 5
    assert [frame.info["duration"] for frame in decoded] == [duration] * 5


def test_encoding_refuses_what_it_cannot_write():
    frames = gradient_frames(2, 16, 16)
    with pytest.raises(ValueError, match="unknown video format 'webm'"):
        encode_video(frames, 8, "webm")
    with pytest.raises(ValueError, match="at least one frame"):
        encode_video([], 8, "gif")
    with pytest.raises(ValueError, match="same size"):
        encode_video([*frames, Image.new("RGB", (8, 8))], 8, "mp4")
