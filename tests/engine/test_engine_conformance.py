"""What every `Engine` (infra.engine.protocol) must do, held against the real `DiffusersEngine` (the
tiny models on the CPU) and the test `StandInEngine` (tests/engine/standin.py) alike, so code
tested against the stand-in behaves the same on the real engine:

- a generation job gives one decodable PNG per seed, of the job's size, different per seed; the
  same params give the same bytes again (determinism by seed); `base64: True` gives the base64
  text of a PNG; an inpaint job keeps the unmasked pixels of its init image exactly; a safety
  checker reports one `nsfw_content_detected` flag per image;
- a video job gives one file, an mp4 (`ftyp` at offset 4) or a GIF of the job's frames;
- an upscale job gives one PNG of the job's (width, height); an object-removal job one PNG of the
  input's size that differs from it under the mask only; a magic_mix job one PNG of its size, the
  same bytes for the same seed and other bytes for another;
- a removebg job gives one PNG of the input's size: RGBA whose alpha is the mask its `only_mask`
  twin answers ("L"), inverted by `inverse_mask`;
- `warm` puts a model in `loaded()`, `evict` and `unload_all` take it out, `move_to` and `rebind` keep it;
- a job the engine cannot run as asked raises an `EngineError` (never anything else): panorama /
  self-attention on an SDXL model and text2video on an SDXL or inpainting model are `Unsupported`;
  a clip_skip beyond the text encoder, too many video frames or a video size that is not a multiple
  of 8 `DoesNotFit`;
- with a `Progress`, a job reports exactly its total steps (`total_steps()`, plus what `adjust`
  announced), every image, stage `denoising` first; a `Cancelled` raised by a step stops it;
- both engines have the protocol's methods, with its parameter names, and the stand-in imports
  no torch.

Sizes are 32-64 pixels and jobs take 1-2 steps; no timing is asserted.
"""

from __future__ import annotations

import base64
import inspect
import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from infra.catalog.weights import WeightsStore
from infra.engine.engine import DiffusersEngine
from infra.engine.files.background import prepare_background_remover
from infra.engine.files.tiny import build_tiny_sdxl
from infra.engine.files.upscalers import prepare_upscaler
from infra.engine.protocol import Cancelled, DoesNotFit, Engine, EngineError, EngineResult, Unsupported
from infra.jobs.params import BackgroundParams, HighresFix, MagicMixParams, RemovalParams, SafetyCheck, UpscaleParams
from infra.net.inputs import encode_input
from infra.settings import Settings
from tests.conftest import ROOT, centre_mask, generation_params, scene, video_params
from tests.engine.standin import StandInEngine, colour
from tests.model_files import write_background_remover
from tests.upscaler_files import write_esrgan, write_lama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SDXL = "tiny-sdxl"
INPAINT = "tiny-sd-inpaint"
UPSCALER = "tiny-esrgan-x2"
REMOVER = "random-lama"
BACKGROUND_REMOVER = "tiny-u2net"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(models_dir, tmp_path_factory) -> WeightsStore:
    """The built-in tiny models, a tiny SDXL, a tiny x2 ESRGAN, a random-weight LaMa and a tiny U²-Net, in a store of
    this module's own."""
    root = tmp_path_factory.mktemp("conformance")
    shutil.copytree(models_dir, root / "models")
    weights = WeightsStore(root / "models")
    weights.install(SDXL, "stable_diffusion_xl", build_tiny_sdxl, family="sdxl")
    facts = prepare_upscaler("upscaler", write_esrgan(root / "x2.pth", scale=2), root / "x2")
    manifest = {key: value for key, value in facts.items() if key != "category"}
    weights.install(UPSCALER, "upscaler", lambda folder: shutil.copytree(root / "x2", folder, dirs_exist_ok=True),
                    **manifest)
    facts = prepare_upscaler("object_remover", write_lama(root / "lama.safetensors"), root / "lama")
    manifest = {key: value for key, value in facts.items() if key != "category"}
    weights.install(REMOVER, "object_remover", lambda folder: shutil.copytree(root / "lama", folder, dirs_exist_ok=True),
                    **manifest)
    facts = prepare_background_remover(write_background_remover(root / "u2net.onnx"), root / "u2net")
    weights.install(BACKGROUND_REMOVER, "background_remover",
                    lambda folder: shutil.copytree(root / "u2net", folder, dirs_exist_ok=True),
                    **{key: value for key, value in facts.items() if key != "category"})
    return weights


@pytest.fixture(scope="module", params=["diffusers", "standin"])
def engine(request) -> Engine:
    """Each engine once per module (the real one keeps its loaded models between tests)."""
    if request.param == "diffusers":
        weights = request.getfixturevalue("store")
        return DiffusersEngine(Settings(_env_file=None, models_dir=weights.root, device="cpu"), weights)
    return StandInEngine(sdxl_models={SDXL}, inpaint_models={INPAINT})


def decode_png(data: bytes) -> Image.Image:
    assert data[:8] == PNG
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------- images


def test_text2img_gives_one_png_per_seed_of_the_size_each_its_own(engine):
    result = engine.run(generation_params(width=64, height=32, seeds=(7, 8), steps=1), {})
    assert isinstance(result, EngineResult) and isinstance(result.facts, dict)
    assert len(result.files) == 2
    images = [decode_png(data) for data in result.files]
    assert [image.size for image in images] == [(64, 32), (64, 32)]
    assert result.files[0] != result.files[1]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_the_same_params_give_the_same_bytes(engine):
    params = generation_params(width=32, height=32, seeds=(11, 12), steps=2)
    first = engine.run(params, {}).files
    assert engine.run(params, {}).files == first
    alone = engine.run(params.model_copy(update={"seeds": (12,)}), {}).files
    assert alone == first[1:]  # an image depends on its own seed only


def test_base64_gives_the_base64_text_of_a_png(engine):
    result = engine.run(generation_params(width=32, height=32, steps=1, base64=True), {})
    (text,) = result.files
    assert text.isascii() and not text.startswith(b"data:")
    image = decode_png(base64.b64decode(text, validate=True))
    assert image.size == (32, 32)


def test_inpaint_gives_images_of_the_size_and_keeps_the_unmasked_pixels(engine):
    init, mask = scene(64, 64), centre_mask(64, 64)
    inputs = {"init_image": encode_input(init), "mask_image": encode_input(mask)}
    params = generation_params(task="inpaint", model_id=INPAINT, strength=1.0, seeds=(3, 4), steps=2)
    result = engine.run(params, inputs)
    assert len(result.files) == 2
    keep = np.asarray(mask) == 0
    for data in result.files:
        image = decode_png(data)
        assert image.size == (64, 64)
        assert np.array_equal(pixels(image)[keep], pixels(init)[keep])
        assert not np.array_equal(pixels(image)[~keep], pixels(init)[~keep])  # the masked square was redone


def test_a_safety_checker_reports_one_flag_per_image(engine):
    params = generation_params(width=32, height=32, seeds=(1, 2), steps=1,
                               safety_checker=SafetyCheck(type="black", threshold=0.5))
    result = engine.run(params, {})
    assert len(result.files) == 2
    flags = result.facts["nsfw_content_detected"]
    assert len(flags) == 2 and all(isinstance(flag, bool) for flag in flags)


def test_upscale_gives_one_png_of_the_jobs_size(engine):
    source = scene(16, 16)
    params = UpscaleParams(model_id=UPSCALER, scale=1.5, width=24, height=24)  # the network's x2, then resized
    (data,) = engine.run(params, {"image": encode_input(source)}).files
    assert decode_png(data).size == (24, 24)
    (text,) = engine.run(params.model_copy(update={"base64": True}), {"image": encode_input(source)}).files
    assert decode_png(base64.b64decode(text, validate=True)).size == (24, 24)


def test_magic_mix_gives_one_png_of_its_size_fixed_by_its_seed(engine):
    params = MagicMixParams(model_id="tiny-sd", prompt="a bed", negative_prompt=None, width=48, height=32, steps=10,
                            guidance_scale=7.5, kmin=0.3, kmax=0.6, mix_factor=0.5, seed=5)
    inputs = {"image": encode_input(scene(48, 32))}
    (first,) = engine.run(params, inputs).files
    assert decode_png(first).size == (48, 32)
    assert engine.run(params, inputs).files[0] == first
    assert engine.run(params.model_copy(update={"seed": 6}), inputs).files[0] != first


def test_object_removal_gives_the_input_changed_under_the_mask_only(engine):
    init, mask = scene(40, 24), Image.new("L", (40, 24), 0)
    mask.paste(255, (8, 4, 24, 16))
    params = RemovalParams(model_id=REMOVER, width=40, height=24)
    (data,) = engine.run(params, {"image": encode_input(init), "mask": encode_input(mask)}).files
    image, keep = decode_png(data), np.asarray(mask) == 0
    assert image.size == (40, 24)
    assert np.array_equal(pixels(image)[keep], pixels(init)[keep])
    assert not np.array_equal(pixels(image)[~keep], pixels(init)[~keep])
def test_removebg_gives_rgba_whose_alpha_is_the_mask(engine):
    source = scene(48, 32)
    params = BackgroundParams(model_id=BACKGROUND_REMOVER, width=48, height=32)
    inputs = {"image": encode_input(source)}
    (data,) = engine.run(params, inputs).files
    cutout = decode_png(data)
    assert cutout.mode == "RGBA" and cutout.size == (48, 32)
    (mask_data,) = engine.run(params.model_copy(update={"only_mask": True}), inputs).files
    mask = decode_png(mask_data)
    assert mask.mode == "L" and np.array_equal(np.asarray(cutout)[..., 3], np.asarray(mask))
    (inverse,) = engine.run(params.model_copy(update={"only_mask": True, "inverse_mask": True}), inputs).files
    assert np.array_equal(np.asarray(decode_png(inverse)), 255 - np.asarray(mask))


# --------------------------------------------------------------------------- video


@pytest.mark.parametrize("output_type", ["mp4", "gif"])
def test_a_video_job_gives_one_file_of_its_format(engine, output_type):
    result = engine.run(video_params(width=32, height=32, num_frames=2, steps=1, output_type=output_type), {})
    (data,) = result.files
    if output_type == "mp4":
        assert data[4:8] == b"ftyp"
    else:
        assert data[:4] == b"GIF8"
        gif = Image.open(io.BytesIO(data))
        assert gif.size == (32, 32) and gif.n_frames == 2


# --------------------------------------------------------------------------- bookkeeping


def test_warm_loads_and_evict_and_unload_all_forget(engine):
    engine.warm(INPAINT)
    assert INPAINT in engine.loaded()
    engine.evict(INPAINT)
    assert INPAINT not in engine.loaded()
    engine.warm("tiny-sd")
    engine.warm(INPAINT)
    assert engine.loaded()[-2:] == ["tiny-sd", INPAINT]  # least recently used first
    engine.move_to("cpu")
    assert engine.loaded()[-2:] == ["tiny-sd", INPAINT]
    engine.rebind(engine.settings, engine.weights)  # a restored Modal container's own settings and store
    assert engine.loaded()[-2:] == ["tiny-sd", INPAINT]
    assert isinstance(engine.device_name, str) and engine.device_name
    unloaded = engine.unload_all()
    assert {"tiny-sd", INPAINT} <= set(unloaded)
    assert engine.loaded() == []
    (data,) = engine.run(generation_params(width=32, height=32, steps=1), {}).files  # runs again after it
    assert decode_png(data).size == (32, 32)
    assert "tiny-sd" in engine.loaded()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("variant", ["panorama", "self_attention"])
def test_panorama_and_self_attention_on_an_sdxl_model_are_unsupported(engine, variant):
    with pytest.raises(Unsupported, match="SDXL"):
        engine.run(generation_params(model_id=SDXL, width=32, height=32, steps=1, **{variant: True}), {})
    plain = generation_params(model_id=SDXL, width=32, height=32, steps=1, scheduler="EulerDiscreteScheduler")
    (data,) = engine.run(plain, {}).files
    assert decode_png(data).size == (32, 32)  # plain text2img on the same model runs


BAD_JOBS = {
    "panorama on SDXL": (generation_params(model_id=SDXL, panorama=True), Unsupported),
    "self_attention on SDXL": (generation_params(model_id=SDXL, self_attention=True), Unsupported),
    "clip_skip beyond the text encoder": (generation_params(clip_skip=13), DoesNotFit),
    "video clip_skip beyond the text encoder": (video_params(clip_skip=13), DoesNotFit),
    "video on SDXL": (video_params(model_id=SDXL), Unsupported),
    "video on an inpainting model": (video_params(model_id=INPAINT), Unsupported),
    "too many video frames": (video_params(num_frames=33), DoesNotFit),
    "no video frames": (video_params(num_frames=0), DoesNotFit),
    "video size not a multiple of 8": (video_params(width=60), DoesNotFit),
}


@pytest.mark.parametrize("name", list(BAD_JOBS))
def test_a_bad_job_raises_an_engine_error(engine, name):
    params, kind = BAD_JOBS[name]
    with pytest.raises(EngineError) as raised:
        engine.run(params, {})
    assert isinstance(raised.value, kind), f"{name}: {type(raised.value).__name__}: {raised.value}"
    assert raised.value.message and raised.value.message == str(raised.value)


# --------------------------------------------------------------------------- the protocol itself


class Recorder:
    """A `Progress` that records what the engine reports and cancels after `cancel_after` steps."""

    def __init__(self, cancel_after: int | None = None, preview: bool = False):
        self.steps = self.adjusted = 0
        self.stages, self.images, self.previews = [], set(), []
        self.cancel_after, self.preview_wanted = cancel_after, preview

    def stage(self, stage):
        self.stages.append(stage)

    def image(self, index):
        self.images.add(index)

    def adjust(self, extra_steps):
        self.adjusted += extra_steps

    def step(self, count=1):
        if self.cancel_after is not None and self.steps >= self.cancel_after:
            raise Cancelled("Cancelled by the client")
        self.steps += count

    def wants_preview(self):
        return self.preview_wanted

    def preview(self, jpeg):
        self.previews.append(jpeg)


@pytest.mark.parametrize("fields", [
    {"seeds": (1, 2), "steps": 3},
    {"task": "img2img", "strength": 0.5, "steps": 4},
    {"seeds": (3,), "steps": 2, "highres_fix": HighresFix(width=64, height=64, strength=0.5)},
], ids=["two-samples", "img2img-strength", "highres-fix"])
def test_progress_counts_every_step_that_runs_and_every_image(engine, fields):
    params = generation_params(width=32, height=32, **fields)
    inputs = {"init_image": encode_input(scene(32, 32))} if params.task == "img2img" else {}
    recorder = Recorder()
    engine.run(params, inputs, recorder)
    assert recorder.steps == params.total_steps() + recorder.adjusted > 0
    assert recorder.images == set(range(params.samples))
    assert "denoising" in recorder.stages and recorder.stages.index("denoising") < len(recorder.stages) - 1


def test_a_cancelled_step_stops_the_job(engine):
    recorder = Recorder(cancel_after=2)
    with pytest.raises(Cancelled, match="Cancelled by the client"):
        engine.run(generation_params(width=32, height=32, steps=6), {}, recorder)
    assert recorder.steps == 2


def test_the_real_engine_draws_jpeg_previews_of_the_latents(store):
    engine = DiffusersEngine(Settings(_env_file=None, models_dir=store.root, device="cpu"), store)
    recorder = Recorder(preview=True)
    engine.run(generation_params(width=64, height=64, steps=2), {}, recorder)
    assert len(recorder.previews) == recorder.steps
    preview = Image.open(io.BytesIO(recorder.previews[-1]))
    assert preview.format == "JPEG" and max(preview.size) <= 256 and preview.size[0] >= 8


PROTOCOL_METHODS = {
    name: list(inspect.signature(member).parameters)
    for name, member in inspect.getmembers(Engine, inspect.isfunction) if not name.startswith("_")
}


def test_the_protocol_methods_are_known():
    assert set(PROTOCOL_METHODS) == {"run", "warm", "move_to", "rebind", "evict", "unload_all", "loaded"}
    assert "device_name" in Engine.__annotations__


@pytest.mark.parametrize("engine_class", [DiffusersEngine, StandInEngine])
def test_an_engine_class_has_the_protocols_methods_and_parameter_names(engine_class):
    for name, parameters in PROTOCOL_METHODS.items():
        method = getattr(engine_class, name, None)
        assert callable(method), f"{engine_class.__name__} has no {name}()"
        assert list(inspect.signature(method).parameters)[:len(parameters)] == parameters, name
        extra = list(inspect.signature(method).parameters.values())[len(parameters):]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{name}: extra required parameters"
    assert hasattr(engine_class, "device_name")


def test_the_stand_in_imports_no_torch():
    code = ("import sys; import tests.engine.standin; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_stand_in_records_its_runs_and_draws_each_seeds_colour():
    standin = StandInEngine()
    params = generation_params(width=32, height=32, seeds=(5, 6))
    files = standin.run(params, {}).files
    assert standin.runs == [params]
    for seed, data in zip(params.seeds, files):
        assert decode_png(data).getpixel((0, 0)) == colour(seed)
    with pytest.raises(DoesNotFit):
        standin.run(video_params(num_frames=99), {})
    assert len(standin.runs) == 2  # a failed job was asked for too
