"""The engine's model cache: bounded in bytes (least recently used first), reloaded when a model
id is replaced, and free of leaks when models come and go."""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

from infra.engine.pipelines import ModelCache
from infra.weights import WeightsStore


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
