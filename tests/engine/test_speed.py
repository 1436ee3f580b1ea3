"""The GPU fast path and the speed modes (issue 9), checked on the CPU: the settings, the fast path
being a no-op on the CPU, its code (channels_last, fused QKV, compiled UNet / VAE decoder) giving
the plain pipeline's images when it is forced on the CPU, a LoRA taking the UNet off it, and the
batched samples, ToMe and cfg_cutoff settings. Then the transformer families (issue 19): the fast
path on the tiny Flux.1 pipeline (fused QKV, compiled transformer, the LoRA rule), and the memory
settings (bf16 per family, quantization per card, text-encoder offload): the choices as pure
functions, offload and int8 (torchao, where installed) run on the CPU. No timings are asserted
(bench/gpu.py measures)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from infra.catalog.weights import WeightsStore
from infra.engine import speed
from infra.engine.engine import DiffusersEngine
from infra.jobs.params import GenerationParams, Lora
from infra.settings import Settings
from tests.conftest import generation_params
from tests.model_files import write_lora, write_transformer_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64


@pytest.fixture(scope="module")
def store(models_dir, tmp_path_factory) -> WeightsStore:
    from infra.engine import LOAD_LOCK
    from infra.engine.files.tiny import build_tiny_flux

    root = tmp_path_factory.mktemp("speed") / "models"
    shutil.copytree(models_dir, root)
    weights = WeightsStore(root)
    weights.install(
        "style", "lora", lambda folder: write_lora(weights.folder("tiny-sd"), folder / "lora.safetensors"),
        file="lora.safetensors", family="sd",
    )
    with LOAD_LOCK:
        weights.install("tiny-flux", "flux", build_tiny_flux, family="flux")
        weights.install("flux-style", "lora", lambda folder: write_transformer_lora(
            weights.folder("tiny-flux"), folder / "lora.safetensors"), file="lora.safetensors", family="flux")
    return weights


def engine(store: WeightsStore, forced: bool = False, **settings) -> DiffusersEngine:
    """An Engine on the CPU; `forced`: the fast path runs on the CPU too (dynamo's eager backend)."""
    built = DiffusersEngine(Settings(_env_file=None, models_dir=store.root, device="cpu", **settings), store)
    if forced:
        built.cache.fast = replace(built.cache.fast, allow_cpu=True, backend="eager")
    return built


def params(task: str = "text2img", samples: int = 1, **overrides) -> GenerationParams:
    fields = dict(task=task, prompt="a red bicycle", negative_prompt="", steps=4, width=SIZE, height=SIZE,
                  seeds=tuple(7 + i for i in range(samples)), scheduler="DDIMScheduler")
    return generation_params(**{**fields, **overrides})


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.float64) for image in images]


def mean_diff(a, b) -> float:
    return max(float(np.abs(x - y).mean()) for x, y in zip(pixels(a), pixels(b)))


def test_settings_parse_and_refuse_unknown_values(monkeypatch):
    monkeypatch.setenv("SDAPI_FAST_PATH", "true")
    monkeypatch.setenv("SDAPI_COMPILE_MODE", "max-autotune-no-cudagraphs")
    monkeypatch.setenv("SDAPI_COMPILE_CACHE_DIR", "/weights/.compile-cache")
    monkeypatch.setenv("SDAPI_CFG_CUTOFF", "0.6")
    settings = Settings(_env_file=None)
    assert settings.fast_path and settings.compile_mode == "max-autotune-no-cudagraphs"
    assert str(settings.compile_cache_dir) == "/weights/.compile-cache" and settings.cfg_cutoff == 0.6
    fast = speed.FastPath.from_settings(settings)
    assert fast.enabled and fast.cache_dir == settings.compile_cache_dir
    defaults = {name: Settings.model_fields[name].default for name in ("fast_path", "batch_samples", "tomesd_mode",
                                                                        "cfg_cutoff")}
    assert defaults == {"fast_path": False, "batch_samples": False, "tomesd_mode": "request", "cfg_cutoff": 1.0}
    for bad in ({"compile_mode": "fastest"}, {"tomesd_mode": "sometimes"}, {"cfg_cutoff": 0}, {"tomesd_ratio": 0.9}):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **bad)


def test_the_fast_path_is_a_no_op_on_the_cpu(store):
    plain, fast = engine(store), engine(store, fast_path=True, compile_mode="default")
    a = plain.generate(params(), {})
    b = fast.generate(params(), {})
    unet = fast.cache.model("tiny-sd").pipeline.unet
    assert not speed.is_compiled(unet) and not getattr(unet, speed.APPLIED, False)
    assert all((x == y).all() for x, y in zip(pixels(a), pixels(b)))


def test_the_fast_path_forced_on_the_cpu_keeps_the_images(store):
    plain = engine(store)
    fast = engine(store, forced=True, fast_path=True, compile_mode="default")
    model = fast.cache.model("tiny-sd")
    unet, vae = model.pipeline.unet, model.pipeline.vae
    assert speed.is_compiled(unet) and speed.is_compiled(vae.decoder)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(type(p).__name__ == "FusedAttnProcessor2_0" for p in unet.attn_processors.values())
    for task, extra in (("text2img", {}), ("img2img", {"strength": 0.7})):
        inputs = {}
        if task == "img2img":
            from tests.conftest import png_bytes, scene

            inputs = {"init_image": png_bytes(scene(SIZE, SIZE))}
        a = plain.generate(params(task, **extra), inputs)
        b = fast.generate(params(task, **extra), inputs)
        assert mean_diff(a, b) < 1.0, task  # the same images up to float rounding (fused GEMMs)
    # a variant pipeline (from_pipe) shares the compiled modules and keeps them so
    assert speed.is_compiled(fast.cache.model("tiny-sd").pipeline.unet)


def test_a_lora_takes_the_unet_off_the_fused_compiled_path(store):
    plain = engine(store)
    fast = engine(store, forced=True, fast_path=True, compile_mode="default")
    with_lora = params(loras=(Lora(model_id="style", strength=1.0),))
    a = plain.generate(with_lora, {})
    b = fast.generate(with_lora, {})
    unet = fast.cache.model("tiny-sd").pipeline.unet
    assert not speed.is_compiled(unet) and getattr(unet, speed.EAGER_FOR_GOOD)
    assert not any(type(p).__name__ == "FusedAttnProcessor2_0" for p in unet.attn_processors.values())
    assert mean_diff(a, b) < 1.0  # the LoRA acts as without the fast path (a fused QKV would bypass it)
    assert mean_diff(a, plain.generate(params(), {})) > 1.0  # and it does act
    # later jobs without LoRAs stay uncompiled for this model, and still give the base model's images
    assert mean_diff(fast.generate(params(), {}), plain.generate(params(), {})) < 1.0
    assert not speed.is_compiled(unet)


def test_tome_runs_the_compiled_unet_uncompiled_for_the_job_only(store):
    fast = engine(store, forced=True, fast_path=True, compile_mode="default", tomesd_mode="always")
    unet = fast.cache.model("tiny-sd").pipeline.unet
    seen = []
    original = speed.eager

    def spy(module):
        seen.append(module)
        return original(module)

    speed_eager = pytest.MonkeyPatch()
    speed_eager.setattr(speed, "eager", spy)
    try:
        fast.generate(params(), {})
    finally:
        speed_eager.undo()
    assert seen == [unet] and speed.is_compiled(unet)  # compiled again after the job
    assert not any("ToMe" in type(module).__name__ for module in unet.modules())  # and ToMe removed


def test_tomesd_mode_and_ratio(store):
    assert engine(store)._tome_ratio(params(tomesd=True)) == 0.5
    assert engine(store)._tome_ratio(params(tomesd=False)) == 0.0
    assert engine(store, tomesd_mode="off")._tome_ratio(params(tomesd=True)) == 0.0
    assert engine(store, tomesd_mode="always", tomesd_ratio=0.3)._tome_ratio(params(tomesd=False)) == 0.3
    plain = engine(store).generate(params(), {})
    merged = engine(store, tomesd_mode="always", tomesd_ratio=0.75).generate(params(), {})
    assert mean_diff(plain, merged) > 0  # ToMe changes outputs: never on unless set


def test_batched_samples_give_the_images_of_one_by_one(store):
    one_by_one = engine(store).generate(params(samples=3), {})
    batched = engine(store, batch_samples=True).generate(params(samples=3), {})
    assert len(batched) == 3 and mean_diff(one_by_one, batched) < 1.0
    alone = engine(store).generate(params(seeds=(8,)), {})  # image 2 of the job, by its seed
    assert mean_diff(alone, batched[1:2]) < 1.0


def test_cfg_cutoff_changes_outputs_only_when_set(store):
    pipeline = engine(store).cache.pipeline(engine(store).cache.model("tiny-sd"), "text2img", "DDIMScheduler",
                                            False, None)
    assert speed.cfg_cutoff_call(pipeline, 30, 1.0, 7.5) == {}
    assert speed.cfg_cutoff_call(pipeline, 30, 0.5, 1.0) == {}  # no guidance to cut
    call = speed.cfg_cutoff_call(pipeline, 30, 0.5, 7.5)
    assert call["callback_on_step_end_tensor_inputs"] == ["prompt_embeds"]
    full = engine(store).generate(params(), {})
    cut = engine(store, cfg_cutoff=0.5).generate(params(), {})
    assert cut[0].size == full[0].size and mean_diff(full, cut) > 0
    inpaint_inputs = _inpaint_inputs()
    cut_inpaint = engine(store, cfg_cutoff=0.5).generate(
        params("inpaint", model_id="tiny-sd-inpaint", strength=1.0), inpaint_inputs
    )
    assert cut_inpaint[0].size == (SIZE, SIZE)


def _inpaint_inputs() -> dict:
    from tests.conftest import centre_mask, png_bytes, scene

    return {"init_image": png_bytes(scene(SIZE, SIZE)), "mask_image": png_bytes(centre_mask(SIZE, SIZE))}


def test_the_modal_worker_turns_the_fast_path_on_and_keeps_the_compile_cache(tmp_path):
    """The GPU image's environment turns the fast path on, with the compile cache on a Volume of its
    own; a job that adds to that cache makes the worker ask for a Volume commit, once."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = "import json, modal_app; print(json.dumps({**modal_app.GPU_SETTINGS, 'mount': modal_app.COMPILE_CACHE_PATH}))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SDAPI_"))}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env={**env, "HOME": "/nonexistent"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    gpu = json.loads(done.stdout.strip().splitlines()[-1])
    assert gpu["SDAPI_FAST_PATH"] == "true" and gpu["SDAPI_BATCH_SAMPLES"] == "true"
    assert gpu.pop("SDAPI_COMPILE_CACHE_DIR") == gpu.pop("mount")  # the compile cache's own Volume
    settings = Settings(_env_file=None, **{k[len("SDAPI_"):].lower(): v for k, v in gpu.items()})
    assert settings.fast_path and settings.compile_mode == "reduce-overhead"

    from infra.modal_worker import ModalWorker

    class Runtime:  # what ModalWorker reads of a runtime
        def __init__(self):
            self.settings = Settings(_env_file=None, models_dir=tmp_path / "models", compile_cache_dir=tmp_path / "cc",
                                     device="cpu")
            self.weights = WeightsStore(tmp_path / "models")
            self.config = type("C", (), {"generation": staticmethod(lambda: 0)})()

    worker = ModalWorker(Runtime())
    assert not worker.compile_cache_grew()
    (tmp_path / "cc").mkdir()
    (tmp_path / "cc" / "kernel.bin").write_bytes(b"x" * 10)
    assert worker.compile_cache_grew() and not worker.compile_cache_grew()


# --------------------------------------------------------------------------- the transformer families (issue 19)


def flux_params(**overrides) -> GenerationParams:
    fields = dict(model_id="tiny-flux", prompt="a red bicycle", steps=3, width=SIZE, height=SIZE, seeds=(7,),
                  guidance_scale=3.5, scheduler="FlowMatchEulerDiscreteScheduler")
    return generation_params(**{**fields, **overrides})


def test_the_fast_path_on_a_flux_transformer_keeps_the_images_and_a_lora_takes_it_off(store):
    """Fused QKV projections in the transformer (diffusers' Flux processor computes through them),
    the transformer and the VAE decoder compiled; a Flux LoRA unfuses and uncompiles it for good."""
    plain = engine(store)
    fast = engine(store, forced=True, fast_path=True, compile_mode="default")
    transformer = fast.cache.model("tiny-flux").pipeline.transformer
    assert speed.is_compiled(transformer) and speed.is_compiled(fast.cache.model("tiny-flux").pipeline.vae.decoder)
    assert all(block.attn.fused_projections for block in transformer.transformer_blocks)
    assert mean_diff(plain.generate(flux_params(), {}), fast.generate(flux_params(), {})) < 1.0
    with_lora = flux_params(loras=(Lora(model_id="flux-style", strength=1.0),))
    a, b = plain.generate(with_lora, {}), fast.generate(with_lora, {})
    assert not speed.is_compiled(transformer) and getattr(transformer, speed.EAGER_FOR_GOOD)
    assert not any(getattr(m, "fused_projections", False) for m in transformer.modules())
    assert mean_diff(a, b) < 1.0  # the LoRA acts as without the fast path


def test_memory_settings_parse_and_choose_per_family_and_card(monkeypatch):
    monkeypatch.setenv("SDAPI_TEXT_ENCODER_OFFLOAD", "offload")
    monkeypatch.setenv("SDAPI_QUANTIZATION", "auto")
    memory = speed.MemorySettings.from_settings(Settings(_env_file=None))
    assert memory == speed.MemorySettings("offload", "auto", False)
    defaults = Settings(_env_file=None, **{"text_encoder_offload": "auto", "quantization": "none"})
    assert speed.MemorySettings.from_settings(defaults) == speed.MemorySettings("auto", "none", False)
    for bad in ({"quantization": "int4"}, {"text_encoder_offload": "sometimes"}):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **bad)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # bf16 for the transformer families wherever the UNets run fp16 (not on a card without bf16)
    assert speed.family_dtype("sd", "cuda", capability=(9, 0)) == fp16
    assert speed.family_dtype("sdxl", "cuda", capability=(9, 0)) == fp16
    assert speed.family_dtype("flux", "cuda", capability=(8, 0)) == bf16
    assert speed.family_dtype("qwen", "cuda", capability=(9, 0)) == bf16
    assert speed.family_dtype("flux", "cuda", capability=(7, 5)) == fp16  # T4
    assert speed.family_dtype("flux", "cpu") == fp32 and speed.family_dtype("sd", "cpu") == fp32
    assert speed.family_dtype("sd3", "cpu", fp16) == bf16  # a Modal worker's CPU load before its snapshot
    assert speed.family_dtype("sd", "cpu", fp16) == fp16
    # quantization: auto = fp8 from compute capability 8.9, int8 below, nothing on the CPU
    choose = speed.resolve_quantization
    assert choose("auto", "cuda", (9, 0))[0] == choose("auto", "cuda", (8, 9))[0] == "fp8"
    assert choose("auto", "cuda", (8, 0))[0] == choose("auto", "cuda", (8, 6))[0] == "int8"
    assert choose("auto", "cpu") == ("none", "auto: no quantization on the CPU")
    kind, note = choose("fp8", "cuda", (8, 0))
    assert kind == "int8" and "8.9" in note  # an A100 has no fp8: int8 instead, and the report says why
    assert choose("int8", "cpu", None, fp32) == ("int8", "")
    assert choose("int8", "cpu", None, fp16)[0] == "none"  # held on the CPU for a snapshot: on the GPU later
    assert choose("none", "cuda", (9, 0)) == ("none", "")
    # offload: auto when the model does not fit the card
    gb = 10**9
    assert speed.needs_offload("auto", 39 * gb, 80 * gb) is False  # Flux.1-dev bf16 + T5-XXL on an A100 80 GB
    assert speed.needs_offload("auto", 39 * gb, 24 * gb) is True  # ... on an L4
    assert speed.needs_offload("auto", 39 * gb, None) is False  # the CPU
    assert speed.needs_offload("keep", 39 * gb, 24 * gb) is False and speed.needs_offload("offload", 1, 80 * gb)


def _tiny_flux(store):
    from diffusers import DiffusionPipeline

    from infra.engine import LOAD_LOCK

    with LOAD_LOCK:
        pipeline = DiffusionPipeline.from_pretrained(store.folder("tiny-flux"), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _flux_images(pipeline):
    generator = torch.Generator("cpu").manual_seed(1)
    return pipeline(prompt="a cat", num_inference_steps=2, width=SIZE, height=SIZE, generator=generator,
                    output_type="np").images


def test_text_encoder_offload_keeps_the_t5_on_the_cpu_across_variants(store):
    """The T5 (not the CLIP) goes to diffusers' group offloading; the images stay the same, a from_pipe
    variant shares the hooks, `pipeline.to()` leaves the encoder alone, and a second landing changes nothing."""
    from diffusers import FluxImg2ImgPipeline

    reference = _flux_images(_tiny_flux(store))
    pipeline = _tiny_flux(store)
    assert speed.big_text_encoders(pipeline) == ["text_encoder_2"]
    report = speed.prepare(pipeline, "cpu", torch.float32, None, speed.MemorySettings(text_encoder_offload="offload"))
    assert report["text_encoders_offloaded"] == ["text_encoder_2"] and report["quantization"] == "none"
    assert speed._is_offloaded(pipeline.text_encoder_2) and not speed._is_offloaded(pipeline.text_encoder)
    assert (_flux_images(pipeline) == reference).all()
    variant = FluxImg2ImgPipeline.from_pipe(pipeline, dtype=pipeline.dtype)
    assert variant.text_encoder_2 is pipeline.text_encoder_2 and speed.memory_report(variant) == report
    pipeline.to("cpu", torch.float32)
    assert speed.prepare(pipeline, "cpu", torch.float32, None, speed.MemorySettings("offload")) == report
    assert (_flux_images(pipeline) == reference).all()
    kept = speed.prepare(_tiny_flux(store), "cpu", torch.float32, None, speed.MemorySettings("keep"))
    assert kept["text_encoders_offloaded"] == [] and kept["text_encoders_on_device"] == ["text_encoder_2"]
    # what a load plans from the stored files' headers alone: the bytes the loaded modules hold
    folder = store.folder("tiny-flux")
    for name in ("transformer", "text_encoder_2", "vae"):
        stored = speed.bytes_on_disk(folder / name, torch.float32)
        assert stored == speed.module_bytes(getattr(pipeline, name)), name
        assert speed.bytes_on_disk(folder / name, torch.bfloat16) == stored // 2
    bf16 = speed.bytes_on_disk(folder / "transformer", torch.bfloat16)
    assert bf16 * 0.5 < speed.bytes_on_disk(folder / "transformer", torch.bfloat16, "int8") < bf16 * 0.7
    assert speed.load_offloaded(folder, "flux", "cpu", torch.float32, speed.MemorySettings("offload")) == {}  # a GPU's


def test_quantization_asks_for_torchao_where_it_is_missing(store, monkeypatch):
    import sys

    from infra.engine.protocol import Unsupported

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(Unsupported, match=r"needs torchao.*quant.*SDAPI_QUANTIZATION=none"):
        speed.prepare(_tiny_flux(store), "cpu", torch.float32, None, speed.MemorySettings(quantization="int8"))
    # (a UNet is never quantized: nothing to import)
    from diffusers import DiffusionPipeline

    sd = DiffusionPipeline.from_pretrained(store.folder("tiny-sd"), local_files_only=True)
    assert speed.prepare(sd, "cpu", torch.float32, None, speed.MemorySettings(quantization="int8"))["quantization"] == "none"


def test_int8_quantization_of_the_flux_transformer_on_the_cpu(store):
    """torchao's int8 weight-only quantization (the `quant` extra): the transformer's linear weights
    in one byte, the image close to the unquantized one, a LoRA still applies through peft."""
    pytest.importorskip("torchao")
    reference = _flux_images(_tiny_flux(store))
    pipeline = _tiny_flux(store)
    plain_bytes = speed.module_bytes(pipeline.transformer)
    report = speed.prepare(pipeline, "cpu", torch.float32, None, speed.MemorySettings(quantization="int8"))
    assert report["quantization"] == "int8" and getattr(pipeline.transformer, speed.QUANTIZED) == "int8"
    weight = pipeline.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ != "Parameter" and speed.tensor_bytes(weight) < weight.numel() * 2
    assert speed.module_bytes(pipeline.transformer) < 0.5 * plain_bytes
    images = _flux_images(pipeline)
    assert np.abs(images - reference).mean() < 0.01 and np.abs(images - reference).max() < 0.05  # (0..1 floats)
    assert speed.prepare(pipeline, "cpu", torch.float32, None, speed.MemorySettings(quantization="int8")) == report


def test_an_80_gb_card_keeps_flux1_dev_with_its_t5_and_a_24_gb_card_offloads_the_t5():
    """The README's memory claims, planned as `prepare` plans them on the full-size architectures
    (built on the meta device: no memory, no weights): Flux.1 dev's transformer (guidance embedding)
    with T5-XXL and CLIP-L is about 34 GB in bf16, which an A100 / H100 80 GB holds with headroom and
    a 24 GB card (L4, A10G) does not (auto offloads the T5); fp8 / int8 weights bring the transformer
    down to about 12 GB."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    bf16, gb = torch.bfloat16, 10**9
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # (the defaults are Flux.1's sizes)
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                                     feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2)
    parts = {"transformer": speed.planned_bytes(transformer, bf16), "t5": speed.planned_bytes(t5, bf16),
             "others": speed.planned_bytes(clip, bf16) + speed.planned_bytes(vae, bf16)}
    assert 23 * gb < parts["transformer"] < 24.5 * gb and 9 * gb < parts["t5"] < 10 * gb, parts
    need = sum(parts.values())
    need += max(speed.HEADROOM_MIN, int(speed.HEADROOM_SHARE * need))
    assert 38 * gb < need < 41 * gb
    assert speed.needs_offload("auto", need, 80 * gb) is False and speed.needs_offload("auto", need, 24 * gb) is True
    assert speed.planned_bytes(transformer, bf16, "fp8") < 12.5 * gb
