"""Cold load: from an empty process to the first finished image, for a model with the real SD 1.5
architecture (random weights, ~1.07 B parameters, built from `infra/engine/configs/sd15`).

Variants, each run in a fresh `python -m bench.coldload child ...` process:

* `store`       — stored the way the weights store stores a load_model request that names no
                  precision (run_load -> convert.py), loaded by the engine's model cache, first
                  image through `Engine.run`;
* `store_fp32`  — the same through a load with `revision: fp32` (how the store held every model
                  before this change);
* `from_pretrained_fp32` — plain diffusers: `StableDiffusionPipeline.from_pretrained` of an fp32
                  diffusers folder (what `save_pretrained` writes), then the pipeline call;
* `from_single_file` — plain diffusers: `StableDiffusionPipeline.from_single_file` of the same
                  weights as one fp32 LDM checkpoint (configs and tokenizer from the shipped configs);
* `floor` / `floor_fp32` — no torch at all: read every byte of the `store` (fp16) / `store_fp32`
                  files (the disk-read floor for the same bytes).

Every model variant imports the same modules first (`infra.engine.engine`: torch, diffusers,
transformers, the engine); that is reported as `import_s`. `load_s` is from after the imports to
a pipeline ready on the device, `first_image_s` the first generation (64x64, 1 step, PNDM,
guidance 7.5), `second_image_s` the same generation again (warm), `cold_s` = load + first image -
second image (the cost of the cold start itself: weights mapped lazily from the file are paged in by
the first image, so `load_s` alone flatters them), `total_s` = import + load + first image,
`process_s` the child's whole life as the parent sees it (interpreter start and exit included).
The ratios to the floor are `load_vs_floor` and `cold_vs_floor`. Page cache: `--cache warm` (default) reads
each variant's files once before its run, so every variant and the floor read from memory;
`--cache cold` evicts them (posix_fadvise DONTNEED) before each run, so they read from disk.

    python -m bench.coldload [--quick] [--repeats N] [--cache warm|cold] [--keep DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench.common import (
    ROOT,
    cleanup,
    drop_from_page_cache,
    emit,
    folder_bytes,
    job_params,
    peak_rss_mb,
    read_all,
    run_child,
    scratch,
)

MODEL_ID, MODEL_ID_FP32 = "sd15-random", "sd15-random-fp32"
VARIANTS = ("store", "store_fp32", "from_pretrained_fp32", "from_single_file", "floor", "floor_fp32")
# each variant is compared with the time to read the same number of bytes: the fp16 store's files, or
# the fp32 store's (the fp32 folder and the single file hold the same 4.3 GB)
FLOOR_OF = {"store": "floor", "store_fp32": "floor_fp32", "from_pretrained_fp32": "floor_fp32",
            "from_single_file": "floor_fp32"}
PROMPT = "a photograph of an astronaut riding a horse"
SIZE, STEPS = 64, 1


# --------------------------------------------------------------------------- building the test models


def build(root: Path) -> dict:
    """Into `root`: fp32/ (diffusers folder), single.safetensors (LDM single file), store/ (weights
    store with the model loaded twice: revision fp16 (what a GPU machine stores by default) and fp32
    (what a CPU-only machine stores by default))."""
    import torch

    from infra.catalog.loader import LoadRequest, run_load
    from infra.catalog.weights import WeightsStore
    from infra.engine import CONFIGS_DIR, read_json  # first: the torchvision shim before diffusers
    from infra.engine.files.checkpoints import load_tokenizer
    from infra.engine.files.convert import prepare_model
    from infra.engine.files.tiny import (
        diffusers_model_from_config,
        scheduler_from_config,
        transformers_model_from_config,
    )
    from infra.settings import Settings
    from tests.model_files import write_single_file_checkpoint

    configs = CONFIGS_DIR / "sd15"
    from diffusers import StableDiffusionPipeline
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        pipeline = StableDiffusionPipeline(
            vae=diffusers_model_from_config(configs / "vae"),
            text_encoder=transformers_model_from_config(configs / "text_encoder"),
            tokenizer=load_tokenizer(configs / "tokenizer"),
            unet=diffusers_model_from_config(configs / "unet"),
            scheduler=scheduler_from_config(configs / "scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    params = sum(p.numel() for c in (pipeline.unet, pipeline.vae, pipeline.text_encoder) for p in c.parameters())
    pipeline.save_pretrained(root / "fp32", safe_serialization=True)
    del pipeline
    write_single_file_checkpoint(root / "fp32", root / "single.safetensors")
    assert read_json(root / "fp32" / "model_index.json")["_class_name"] == "StableDiffusionPipeline"

    settings = Settings(data_dir=root / "data", models_dir=root / "store", allow_local_model_paths=True)
    weights = WeightsStore(root / "store")
    for model_id, precision in ((MODEL_ID, "fp16"), (MODEL_ID_FP32, "fp32")):
        request = LoadRequest(model_id, str(root / "fp32"), None, precision)
        entry = run_load(request, weights, settings, lambda *a: None, prepare_model)
        if entry.status != "ready":
            raise RuntimeError(f"store load failed: {entry.message}")
    return {
        "parameters": params,
        "build_s": round(time.perf_counter() - started, 1),
        "store_precision": weights.get(MODEL_ID).precision,
        "bytes": {
            "store": folder_bytes(root / "store" / MODEL_ID),
            "store_fp32": folder_bytes(root / "store" / MODEL_ID_FP32),
            "floor_fp32": folder_bytes(root / "store" / MODEL_ID_FP32),
            "from_pretrained_fp32": folder_bytes(root / "fp32"),
            "from_single_file": folder_bytes(root / "single.safetensors"),
        },
    }


def variant_files(root: Path, variant: str) -> Path:
    return {
        "store": root / "store" / MODEL_ID,
        "floor": root / "store" / MODEL_ID,
        "floor_fp32": root / "store" / MODEL_ID_FP32,
        "store_fp32": root / "store" / MODEL_ID_FP32,
        "from_pretrained_fp32": root / "fp32",
        "from_single_file": root / "single.safetensors",
    }[variant]


# --------------------------------------------------------------------------- one cold process


def child(variant: str, root: Path) -> dict:
    """Runs in a fresh process: imports, load, first image; times and peak RSS."""
    t0 = time.perf_counter()
    if variant.startswith("floor"):
        size = read_all(variant_files(root, variant))
        seconds = time.perf_counter() - t0
        return {"variant": variant, "load_s": round(seconds, 3), "bytes": size, "peak_rss_mb": peak_rss_mb()}

    import torch

    import infra.engine.engine  # noqa: F401  (the same imports for every variant; the torchvision shim first)

    threads = int(os.environ.get("BENCH_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    device = os.environ.get("BENCH_DEVICE", "cpu")  # cuda: the GPU case (fp16 weights read onto the GPU)
    dtype = torch.float16 if device == "cuda" else torch.float32
    t1 = time.perf_counter()
    image_call = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "num_inference_steps": STEPS,
                  "guidance_scale": 7.5}
    if variant in ("store", "store_fp32"):
        from infra.catalog.weights import WeightsStore
        from infra.engine.engine import DiffusersEngine
        from infra.settings import Settings

        settings = Settings(data_dir=root / "data", models_dir=root / "store", torch_threads=threads, device=device)
        engine = DiffusersEngine(settings, WeightsStore(root / "store"))
        model_id = MODEL_ID if variant == "store" else MODEL_ID_FP32
        engine.cache.model(model_id)
        t2 = time.perf_counter()
        params = job_params(model_id, prompt=PROMPT, size=SIZE, steps=STEPS)
        files, _ = engine.run(params, {})
        assert files and files[0][:4] == b"\x89PNG"
        t3 = time.perf_counter()
        engine.run(params, {})
        run_dtype = str(engine.cache.model(model_id).pipeline.unet.dtype)
    else:
        from diffusers import StableDiffusionPipeline

        if variant == "from_pretrained_fp32":
            pipeline = StableDiffusionPipeline.from_pretrained(root / "fp32", dtype=dtype, local_files_only=True)
        else:
            from infra.engine import CONFIGS_DIR
            from infra.engine.files.checkpoints import load_tokenizer

            pipeline = StableDiffusionPipeline.from_single_file(
                str(root / "single.safetensors"), config=str(CONFIGS_DIR / "sd15"), local_files_only=True,
                tokenizer=load_tokenizer(CONFIGS_DIR / "sd15" / "tokenizer"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=dtype,
            )
        pipeline = pipeline.to(device)  # plain diffusers: load into CPU memory, then move
        pipeline.set_progress_bar_config(disable=True)
        t2 = time.perf_counter()

        def generate() -> None:
            with torch.inference_mode():
                image = pipeline(generator=torch.Generator("cpu").manual_seed(0), **image_call).images[0]
            assert image.size == (SIZE, SIZE)

        generate()
        t3 = time.perf_counter()
        generate()
        run_dtype = str(pipeline.unet.dtype)
    t4 = time.perf_counter()
    return {
        "variant": variant, "import_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3),
        "first_image_s": round(t3 - t2, 3), "second_image_s": round(t4 - t3, 3), "total_s": round(t3 - t0, 3),
        # what the cold start costs beyond a warm generation: load + first image - a later image (weights
        # mapped lazily from the file are paged in by the first image, so load_s alone would flatter them)
        "cold_s": round(t3 - t1 - (t4 - t3), 3), "run_dtype": run_dtype, "peak_rss_mb": peak_rss_mb(),
        **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if device == "cuda" else {}),
    }


# --------------------------------------------------------------------------- the benchmark


def run(quick: bool = False, repeats: int | None = None, cache: str = "warm", keep: Path | None = None,
        variants: tuple[str, ...] = VARIANTS, device: str = "cpu") -> dict:
    repeats = repeats or (1 if quick else 3)
    root = keep or scratch("coldload")
    try:
        facts_file = root / "facts.json"
        if not facts_file.exists():
            facts = run_child("bench.coldload", "build", str(root), timeout=7200)
            facts_file.write_text(json.dumps(facts))
        facts = json.loads(facts_file.read_text())
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(repeats):
            for variant in variants:  # interleaved, so drift on a shared machine spreads over all
                files = variant_files(root, variant)
                if cache == "cold":
                    drop_from_page_cache(files)
                else:
                    read_all(files)
                row = run_child("bench.coldload", "child", variant, str(root), env={"BENCH_DEVICE": device})
                row["process_s"] = row.pop("wall_s")
                runs[variant].append(row)
        result = {"benchmark": "coldload", "device": device, "cache": cache, "repeats": repeats, "image": f"{SIZE}x{SIZE}, {STEPS} step",
                  "model": {k: v for k, v in facts.items() if k != "bytes"}, "variants": {}}
        for variant, rows in runs.items():
            summary = {key: round(statistics.median(r[key] for r in rows), 3)
                       for key in rows[0] if isinstance(rows[0][key], (int, float))}
            summary["bytes"] = facts["bytes"].get(variant, facts["bytes"]["store"])
            if "run_dtype" in rows[0]:
                summary["run_dtype"] = rows[0]["run_dtype"]
            result["variants"][variant] = summary
        for variant, summary in result["variants"].items():
            floor = result["variants"].get(FLOOR_OF.get(variant, ""), {}).get("load_s")
            if floor:
                summary["load_vs_floor"] = round(summary["load_s"] / floor, 2)
                summary["cold_vs_floor"] = round(summary["cold_s"] / floor, 2)
        return result
    finally:
        if keep is None:
            cleanup(root)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        emit(build(Path(sys.argv[2])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        emit(child(sys.argv[2], Path(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.coldload")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm")
    parser.add_argument("--keep", type=Path, help="build the models here once and keep them (reused by later runs)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the models run fp16 on the GPU (the store read straight onto it)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    emit(run(args.quick, args.repeats, args.cache, args.keep, tuple(args.variants.split(",")), args.device))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
