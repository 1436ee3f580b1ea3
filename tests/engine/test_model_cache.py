"""The engine's model cache: bounded in bytes (least recently used first), reloaded when a model
id is replaced, and free of leaks when models come and go."""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

from infra.catalog.weights import WeightsStore
from infra.engine.cache import ModelCache


@pytest.fixture
def store(models_dir, tmp_path) -> WeightsStore:
    shutil.copytree(models_dir, tmp_path / "models")
    return WeightsStore(tmp_path / "models")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used(store):
    one = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12).model("tiny-sd").size_bytes
    cache = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=int(one * 1.5))
    cache.model("tiny-sd")
    cache.model("tiny-sd-inpaint")
    assert cache.loaded == ["tiny-sd-inpaint"]  # two do not fit: the older one went
    assert cache.used_bytes <= int(one * 1.5)
    roomy = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=one * 3)
    roomy.model("tiny-sd")
    roomy.model("tiny-sd-inpaint")
    roomy.model("tiny-sd")  # touched: now the most recent
    assert roomy.loaded == ["tiny-sd-inpaint", "tiny-sd"]


def test_a_replaced_model_id_is_reloaded(store, tmp_path):
    cache = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12)
    first = cache.model("tiny-sd")
    assert cache.model("tiny-sd") is first
    source = tmp_path / "copy"
    shutil.copytree(store.folder("tiny-sd"), source)
    store.delete("tiny-sd")
    store.install("tiny-sd", "stable_diffusion", lambda folder: shutil.copytree(source, folder, dirs_exist_ok=True))
    assert cache.model("tiny-sd") is not first


@pytest.mark.slow
def test_loading_and_evicting_many_times_does_not_leak(store):
    cache = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12)
    size_mb = cache.model("tiny-sd").size_bytes / 2**20
    cache.evict("tiny-sd")
    gc.collect()
    before = rss_mb()
    for _ in range(20):
        cache.model("tiny-sd")
        cache.evict("tiny-sd")
    gc.collect()
    growth = rss_mb() - before
    # 20 leaked copies would be 20 x size; allow a few for allocator noise
    assert growth < 5 * size_mb + 30, f"RSS grew {growth:.1f} MB over 20 load/evict cycles ({size_mb:.1f} MB each)"


def test_pipeline_variants_share_the_models_modules_and_are_built_once(store):
    cache = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12)
    model = cache.model("tiny-sd")
    first = cache.pipeline(model, "img2img", "EulerDiscreteScheduler", False, None)
    second = cache.pipeline(model, "img2img", "DDIMScheduler", False, None)
    text = cache.pipeline(model, "text2img", "PNDMScheduler", False, None)
    for pipeline in (first, second, text):  # no reload, no copy of any weights
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            assert getattr(pipeline, name) is getattr(model.pipeline, name)
    assert type(first).__name__ == "StableDiffusionImg2ImgPipeline"
    # each job has its own scheduler, and its config says which; the others' are untouched
    assert type(first.scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(second.scheduler).__name__ == "DDIMScheduler"
    assert first.scheduler is not second.scheduler and first is not second
    assert first.config["scheduler"][1] == "EulerDiscreteScheduler"
    assert second.config["scheduler"][1] == "DDIMScheduler"
    assert type(model.pipeline.scheduler).__name__ == "PNDMScheduler"
    assert list(model.variants) == ["img2img", "text2img"]  # built once each


def test_a_reused_variant_renders_what_a_fresh_one_renders(store):
    cache = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12)
    model = cache.model("tiny-sd")

    def render(pipeline):
        with torch.inference_mode():
            return pipeline(prompt="a cat", num_inference_steps=2, width=64, height=64, output_type="np",
                            generator=torch.Generator().manual_seed(3)).images

    reused = [render(cache.pipeline(model, "text2img", "EulerDiscreteScheduler", False, None)) for _ in range(2)]
    fresh = type(model.pipeline).from_pipe(model.pipeline, scheduler=cache.pipeline(
        model, "text2img", "EulerDiscreteScheduler", False, None).scheduler)
    fresh.set_progress_bar_config(disable=True)
    assert (reused[0] == reused[1]).all() and (reused[0] == render(fresh)).all()


def test_a_swapped_component_rebuilds_the_variant(store):
    cache = ModelCache(store, torch.device("cpu"), torch.float32, max_bytes=10**12)
    model = cache.model("tiny-sd")
    cache.pipeline(model, "img2img", "PNDMScheduler", False, None)
    model.pipeline.vae = type(model.pipeline.vae).from_config(model.pipeline.vae.config)
    assert cache.pipeline(model, "img2img", "PNDMScheduler", False, None).vae is model.pipeline.vae
