"""GPU speed of the engine against plain diffusers (issues 9 and 19): every variant in one run.

    python -m bench.gpu --out DIR [--only sd15-text2img,sd15-inpaint,sdxl,flux-dev] [--compile-modes reduce-overhead,...]
                        [--quantizations auto,int8]
    python -m bench.gpu --tiny          # the same on the CPU with the tiny configs: checks the script, no timings

Models are built from the architecture configs in infra/engine/configs (sd15, sdxl; tiny-sd,
tiny-sdxl, tiny-flux with --tiny) and bench/configs/flux1-dev (Flux.1-dev's transformer, T5-XXL and
VAE configs; its CLIP-L is sd15's text encoder) with random weights drawn on the device (speed does
not depend on weight values), saved as fp16 (Flux: bf16) diffusers folders in a weights store under
--work-dir, and loaded from there by both sides, so baseline and engine run the same weights.
Nothing is downloaded: the tokenizers come from configs/clip-tokenizer (and tiny-flux's T5 one).

Variants, for each case (SD 1.5: text2img and inpaint, 512x512, 30 steps, CFG 7.5, batch 1, and 4 with
--batches 1,4;
SDXL: text2img 1024x1024, 30 steps, batch 1; Flux.1-dev: text2img 1024x1024, 28 steps, guidance
3.5, batch 1):
- `baseline`: plain diffusers, `StableDiffusion(XL)(Inpaint)Pipeline.from_pretrained(fp16)` (Flux:
  `FluxPipeline.from_pretrained(bf16)`) on the GPU, SDPA attention, default settings, all images of
  the batch in one call;
- `engine`: the project's Engine (`Engine.generate`, the code path jobs take) with default settings;
- `fast[MODE]`: the Engine with SDAPI_FAST_PATH=true, SDAPI_COMPILE_MODE=MODE, SDAPI_BATCH_SAMPLES=true
  and a persistent compile cache (SDAPI_COMPILE_CACHE_DIR);
- with --speed-modes, the speed modes that change outputs, reported separately (SD 1.5 text2img
  only; left out by default: each compiles again, a minute the 7-minute run lacks): `fast+tomesd`
  (SDAPI_TOMESD_MODE=always, ratio 0.5) and `fast+cfg_cutoff` (SDAPI_CFG_CUTOFF=0.5);
- Flux only: `engine+offload` (SDAPI_TEXT_ENCODER_OFFLOAD=offload: T5-XXL streamed from the CPU; its
  peak memory is the point) and, reported separately as they change outputs, `fast[MODE]+quant[Q]`
  for each --quantizations value Q (SDAPI_QUANTIZATION: auto = fp8 on Ada / Hopper, int8 below;
  --tiny: int8 on the CPU, where torchao is installed). Each engine row carries the memory settings
  the engine applied (`memory`: dtype, quantization, offloaded encoders).

For each: seconds per image (median of --reps timed runs after a warm-up run, which for compiled
variants includes the compilation: `first_s`), images per second, UNet calls per second (from the
difference between runs of 30 and 10 steps, so text encoding, VAE and Python overhead cancel),
achieved TFLOP/s (FLOPs of one UNet / transformer call counted with torch.utils.flop_counter.FlopCounterMode, over
the measured time of one call) against the card's measured bf16 matrix rate (an 8192^3 matmul),
peak GPU memory (torch.cuda.max_memory_allocated), and the output difference against the baseline
for the same seeds and latents (mean and max absolute difference in 0-255 pixel values, PSNR;
inpaint images of both sides composited the engine's way). Tolerance: mean abs diff <= TOLERANCE.

Warm start (`warm_start`): after the fast variant compiled, a fresh process with the same compile
cache loads the SD 1.5 model and makes one 512x512 image: seconds from its spawn to that image.

Results are written after every variant to DIR/gpu-<stages>.json (and the table to .md), so a run
stopped by a time limit still leaves what it measured. --budget-s skips what would start too late.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

STARTED = time.time()
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import job_params  # noqa: E402 - the repository root is on the path first

TOLERANCE = 3.0  # mean absolute pixel difference (0-255) a lossless variant may show against the baseline
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5
SEED = 1234

BENCH_CONFIGS = Path(__file__).resolve().parent / "configs"  # architectures not in infra/engine/configs (flux1-dev)
FLUX_GUIDANCE = 3.5  # Flux.1-dev's distilled guidance (no classifier-free guidance batch)
FLUX_TEXT_TOKENS = 512  # the T5 sequence FluxPipeline encodes (max_sequence_length)

# stage -> (config folder, tiny config folder, task, batches, size, tiny size)
STAGES = {
    "sd15-text2img": ("sd15", "tiny-sd", "text2img", (1, 4), 512, 128),
    "sd15-inpaint": ("sd15", "tiny-sd", "inpaint", (1, 4), 512, 128),
    "sdxl": ("sdxl", "tiny-sdxl", "text2img", (1,), 1024, 128),
    "flux-dev": ("flux1-dev", "tiny-flux", "text2img", (1,), 1024, 64),
}
STAGE_STEPS = {"flux-dev": 28}  # the stage's steps when --steps is not given (default 30; 6 with --tiny)
MODES_STAGE = "sd15-text2img"  # the stage whose batch-1 case also runs the output-changing speed modes
WARM_STAGE = "sd15-text2img"  # the stage whose fast variant is followed by the warm-start process

# Packages that importing the engine pulls in but no benchmarked code path uses (S3 storage, video
# encoding). Where one is missing (the GPU box has no internet), a stand-in module is put in its place.
OPTIONAL_PACKAGES = ("boto3", "botocore", "imageio_ffmpeg")


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (Exception,), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in _missing:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


_missing = {name for name in OPTIONAL_PACKAGES if importlib.util.find_spec(name) is None}
if _missing:
    sys.meta_path.append(_StandInFinder())


# --------------------------------------------------------------------------- environment


def environment(torch) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("torch", "triton", "diffusers", "transformers", "accelerate", "tokenizers", "huggingface_hub",
                 "safetensors", "peft", "tomesd", "pydantic", "pydantic-settings", "numpy", "pillow"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    env = {
        "python": platform.python_version(),
        "packages": packages,
        "stand_ins": sorted(_missing),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_gb=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    return env


def matmul_tflops(torch, device) -> dict:
    """The card's measured dense matrix rate: bf16 8192^3 on a GPU (fp32 1024^3 on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(torch, device)
    reps = 10 if device.type == "cuda" else 3
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(torch, device)
    seconds = (time.perf_counter() - started) / reps
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": round(2 * n**3 / seconds / 1e12, 1)}


def quantization_available() -> bool:
    """torchao (the `quant` extra) is importable: the quantized variants can run."""
    return importlib.util.find_spec("torchao") is not None


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- models with random weights


def build_random_pipeline(config_dir: Path, folder: Path, inpaint: bool, device, dtype, seed: int = 0) -> None:
    """Save to `folder` the pipeline the config folder describes, random weights drawn on `device`
    (fast on a GPU), stored in `dtype`. Tokenizers: the folder's own or the shared CLIP vocabulary."""
    import diffusers
    import torch

    from infra.engine import quiet_libraries, read_json
    from infra.engine.files.checkpoints import load_tokenizer
    from infra.engine.files.tiny import (
        INPAINT_IN_CHANNELS,
        INPAINT_PIPELINES,
        diffusers_model_from_config,
        scheduler_from_config,
        transformers_model_from_config,
    )

    import transformers

    quiet_libraries()
    index = read_json(config_dir / "model_index.json")
    sources = read_json(config_dir / "sources.json") if (config_dir / "sources.json").is_file() else {}

    def folder_of(name: str) -> Path:  # a component's config folder: its own, or the shipped one it names
        from infra.engine import CONFIGS_DIR

        return CONFIGS_DIR / sources[name] if name in sources else config_dir / name

    pipeline_class = getattr(diffusers, INPAINT_PIPELINES[index["_class_name"]] if inpaint else index["_class_name"])
    components: dict = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list):
            components[name] = value
        elif value == [None, None]:
            components[name] = None
    for name in ("tokenizer", "tokenizer_2"):
        if name in index:
            if index[name][1] == "CLIPTokenizer":
                components[name] = load_tokenizer(folder_of(name))
            else:  # (Flux's T5 tokenizer)
                components[name] = getattr(transformers, index[name][1]).from_pretrained(folder_of(name))
    torch.manual_seed(seed)
    # a transformer family's models are drawn in their dtype (Flux.1-dev's 12B transformer would take 48 GB in fp32)
    default_dtype = torch.get_default_dtype()
    if "transformer" in index and dtype != torch.float32:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            for name in ("text_encoder", "text_encoder_2", "unet", "transformer", "vae"):
                if name not in index:
                    continue
                if index[name][0] == "transformers":
                    model = transformers_model_from_config(folder_of(name))
                elif name == "unet" and inpaint:
                    model = diffusers_model_from_config(folder_of(name), in_channels=INPAINT_IN_CHANNELS)
                else:
                    model = diffusers_model_from_config(folder_of(name))
                components[name] = model.to(device=device, dtype=dtype)
    finally:
        torch.set_default_dtype(default_dtype)
    components["scheduler"] = scheduler_from_config(config_dir / "scheduler")
    pipeline = pipeline_class(**components)
    pipeline.save_pretrained(folder, safe_serialization=True)
    del pipeline, components
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ensure_model(store, model_id: str, config_dir: Path, inpaint: bool, device, dtype) -> float:
    """Build the model into the weights store once (seconds it took; 0 when it was there)."""
    from infra.catalog.weights import READY

    entry = store.get(model_id)
    if entry is not None and entry.status == READY:
        return 0.0
    if entry is not None:
        store.delete(model_id)
    family = "flux" if "flux" in config_dir.name else "sdxl" if "xl" in config_dir.name else "sd"
    category = "inpaint" if inpaint else {"sdxl": "stable_diffusion_xl", "flux": "flux"}.get(family, "stable_diffusion")
    started = time.perf_counter()
    store.install(
        model_id, category, lambda folder: build_random_pipeline(config_dir, folder, inpaint, device, dtype),
        source="bench (random weights)", family=family, precision=str(dtype).replace("torch.", ""),
    )
    return time.perf_counter() - started


# --------------------------------------------------------------------------- inputs and measurements


def inpaint_inputs(size: int):
    """A scene (gradient + shapes) and a centre mask, as PIL images and PNG bytes."""
    from PIL import Image, ImageDraw

    scene = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(scene)
    for y in range(size):
        draw.line([(0, y), (size, y)], fill=(40 + y * 150 // size, 90, 200 - y * 120 // size))
    draw.ellipse([size // 8, size // 8, size // 2, size // 2], fill=(220, 180, 60))
    draw.rectangle([size // 2, size // 2, size * 7 // 8, size * 7 // 8], fill=(30, 160, 90))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 4, size // 4, size * 3 // 4, size * 3 // 4], fill=255)
    return scene, mask, png(scene), png(mask)


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def unet_calls(scheduler_config: dict, steps: int) -> int:
    """UNet (transformer) calls one image makes at `steps` steps (PNDM makes one more than its steps;
    flow matching one per step)."""
    import diffusers

    if scheduler_config["_class_name"].startswith("FlowMatch"):
        return steps
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def unet_flops(torch, unet, batch: int, size: int, device) -> int:
    """FLOPs of one UNet call with the CFG batch (2 x batch) at `size` pixels."""
    from torch.utils.flop_counter import FlopCounterMode

    config = unet.config
    latent = size // 8
    sample = torch.randn(2 * batch, config.in_channels, latent, latent, device=device, dtype=unet.dtype)
    context = torch.randn(2 * batch, 77, config.cross_attention_dim, device=device, dtype=unet.dtype)
    extra = {}
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2 * batch, text_dim, device=device, dtype=unet.dtype),
            "time_ids": torch.randn(2 * batch, 6, device=device, dtype=unet.dtype),
        }
    timestep = torch.tensor(500, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, context, **extra)
    return int(counter.get_total_flops())


def transformer_flops(torch, transformer, batch: int, size: int, device) -> int:
    """FLOPs of one Flux transformer call at `size` pixels (latents packed 2x2: (size/16)^2 tokens;
    no classifier-free guidance batch) with FluxPipeline's 512 T5 tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    config, dtype = transformer.config, transformer.dtype
    tokens = (size // 16) ** 2
    side = size // 16
    img_ids = torch.zeros(side, side, 3, device=device, dtype=dtype)
    img_ids[..., 1] += torch.arange(side, device=device)[:, None]
    img_ids[..., 2] += torch.arange(side, device=device)[None, :]
    kwargs = dict(
        hidden_states=torch.randn(batch, tokens, config.in_channels, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, FLUX_TEXT_TOKENS, config.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids.reshape(tokens, 3), txt_ids=torch.zeros(FLUX_TEXT_TOKENS, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), FLUX_GUIDANCE, device=device, dtype=dtype) if config.guidance_embeds else None,
        return_dict=False,
    )
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        transformer(**kwargs)
    return int(counter.get_total_flops())


def compare(reference: list, images: list) -> dict:
    import numpy as np

    means, maxes, psnrs = [], [], []
    for a, b in zip(reference, images):
        x = np.asarray(a.convert("RGB"), dtype=np.float64)
        y = np.asarray(b.convert("RGB"), dtype=np.float64)
        if x.shape != y.shape:
            return {"diff_error": f"sizes differ: {x.shape} vs {y.shape}"}
        d = np.abs(x - y)
        means.append(d.mean())
        maxes.append(d.max())
        mse = (d**2).mean()
        psnrs.append(float("inf") if mse == 0 else 10 * np.log10(255**2 / mse))
    mean = statistics.fmean(means)
    return {
        "diff_mean": round(mean, 3),
        "diff_max": round(max(maxes), 1),
        "psnr_db": round(min(psnrs), 1) if all(p != float("inf") for p in psnrs) else "inf",
        "within_tolerance": mean <= TOLERANCE,
    }


def short_steps(steps: int) -> int:
    """The shorter run whose difference to `steps` times the UNet alone (10 for 30)."""
    return max(steps // 3, 1)


def measure(torch, device, run, batch: int, calls30: int, calls10: int, reps: int, steps: int = 30) -> dict:
    """Warm-up (compiles), `reps` timed runs at `steps` steps and some at a third of them; the last images."""
    started = time.perf_counter()
    run(steps)
    sync(torch, device)
    first = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, images = [], None
    for _ in range(reps):
        sync(torch, device)
        started = time.perf_counter()
        images = run(steps)
        sync(torch, device)
        times.append(time.perf_counter() - started)
    short = []
    for _ in range(max(reps - 1, 1)):
        sync(torch, device)
        started = time.perf_counter()
        run(short_steps(steps))
        sync(torch, device)
        short.append(time.perf_counter() - started)
    seconds, seconds10 = statistics.median(times), statistics.median(short)
    per_call = (seconds - seconds10) / max(calls30 - calls10, 1)
    result = {
        "first_s": round(first, 3),
        "s_per_run": round(seconds, 4),
        "s_per_image": round(seconds / batch, 4),
        "images_per_s": round(batch / seconds, 3),
        "unet_ms_per_call": round(per_call * 1000, 2),
        "unet_it_per_s": round(1 / per_call, 2) if per_call > 0 else None,
        "non_unet_s": round(seconds - per_call * calls30, 4),
        "times": [round(t, 4) for t in times],
    }
    if device.type == "cuda":
        result["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result, images


# --------------------------------------------------------------------------- the runs


class Bench:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.float32 if args.tiny else torch.float16
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir)
        self.cache_dir = Path(args.cache_dir) if args.cache_dir else self.work / "compile-cache"
        self.reps = args.reps or (1 if args.tiny else 3)
        self.steps = args.steps or (6 if args.tiny else 30)
        self.flux, self.stage_dtype = False, self.dtype  # (set per stage)
        self.rows: list[dict] = []
        self.report: dict = {"args": vars(args), "tolerance_mean_abs_diff": TOLERANCE, "rows": self.rows}
        self.name = "gpu-" + "_".join(args.only) + ("-tiny" if args.tiny else "")

    # --- bookkeeping

    def over_budget(self) -> bool:
        return time.time() - STARTED > self.args.budget_s

    def save(self) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / f"{self.name}.md").write_text(table(self.report))

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        line = {k: row.get(k) for k in ("stage", "batch", "variant", "s_per_image", "images_per_s", "unet_it_per_s",
                                        "tflops", "peak_gb", "first_s", "diff_mean", "speedup", "error")}
        print("ROW", json.dumps(line), flush=True)
        return row

    def release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    # --- main

    def run(self) -> dict:
        torch = self.torch
        if not self.tiny and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --tiny for the CPU check")
        if self.tiny:
            torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        self.report["environment"] = environment(torch)
        print("ENV", json.dumps(self.report["environment"]), flush=True)
        self.report["matmul"] = matmul_tflops(torch, self.device)
        print("MATMUL", json.dumps(self.report["matmul"]), flush=True)
        self.save()
        from infra.catalog.weights import WeightsStore

        self.store = WeightsStore(self.work / "models")
        for stage in self.args.only:
            try:
                self.stage(stage)
            except Exception as exc:  # a stage that breaks leaves the others
                import traceback

                traceback.print_exc()
                self.add({"stage": stage, "variant": "(stage)", "error": f"{type(exc).__name__}: {exc}"[:500]})
            self.release()
        self.save()
        print(table(self.report))
        return self.report

    def stage(self, stage: str) -> None:
        config, tiny_config, task, batches, size, tiny_size = STAGES[stage]
        batches = tuple(b for b in batches if b in self.args.batches) or batches[:1]  # (--batches)
        from infra.engine import CONFIGS_DIR

        name = tiny_config if self.tiny else config
        config_dir = CONFIGS_DIR / name if (CONFIGS_DIR / name).is_dir() else BENCH_CONFIGS / name
        size = tiny_size if self.tiny else size
        self.steps = self.args.steps or (6 if self.tiny else STAGE_STEPS.get(stage, 30))
        self.flux = "flux" in config_dir.name
        # the transformer families' baseline runs bf16 (diffusers' own advice for Flux; fp16 overflows)
        self.stage_dtype = self.torch.bfloat16 if self.flux and not self.tiny else self.dtype
        inpaint = task == "inpaint"
        model_id = f"bench-{config_dir.name}" + ("-inpaint" if inpaint else "")
        built = ensure_model(self.store, model_id, config_dir, inpaint, self.device, self.stage_dtype)
        self.report.setdefault("build_s", {})[model_id] = round(built, 1)
        folder = self.store.folder(model_id)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        calls30, calls10 = unet_calls(scheduler_config, self.steps), unet_calls(scheduler_config, short_steps(self.steps))
        scene = mask = None
        inputs: dict = {}
        if inpaint:
            scene, mask, scene_png, mask_png = inpaint_inputs(size)
            inputs = {"init_image": scene_png, "mask_image": mask_png}
        case = {"stage": stage, "task": task, "size": size, "steps": self.steps, "unet_calls": calls30,
                "model": config_dir.name, "dtype": str(self.stage_dtype).replace("torch.", "")}

        # baseline: plain diffusers
        baseline_images, baseline_speed, flops = {}, {}, {}
        pipe = self.baseline_pipeline(folder, inpaint)
        for batch in batches:
            if self.flux:
                flops[batch] = transformer_flops(self.torch, pipe.transformer, batch, size, self.device)
            else:
                flops[batch] = unet_flops(self.torch, pipe.unet, batch, size, self.device)
            if self.over_budget():
                self.add({**case, "batch": batch, "variant": "baseline", "error": "skipped: time budget"})
                continue

            def run(steps, batch=batch, pipe=pipe):
                return self.baseline_call(pipe, batch, size, steps, scene, mask)

            try:
                result, images = measure(self.torch, self.device, run, batch, calls30, calls10, self.reps, self.steps)
            except Exception as exc:
                self.add({**case, "batch": batch, "variant": "baseline", "error": f"{type(exc).__name__}: {exc}"[:500]})
                continue
            if inpaint:
                from infra.engine.postprocess import composite_inpaint

                images = [composite_inpaint(image, scene, mask) for image in images]
            baseline_images[batch] = images
            baseline_speed[batch] = result["images_per_s"]
            result.update(self.vae_decode_share(pipe, batch, size))
            self.add(self.finish({**case, "batch": batch, "variant": "baseline", **result}, flops[batch], images))
        del pipe
        self.release()

        variants = [("engine", {})]
        for mode in self.args.compile_modes:
            fast = {"fast_path": True, "compile_mode": mode, "batch_samples": True,
                    "compile_cache_dir": str(self.cache_dir)}
            variants.append((f"fast[{mode}]", fast))
        extra: dict[str, dict] = {}
        if self.flux:  # the text-encoder offload, and the quantized settings (they change outputs: reported apart)
            base, base_overrides = variants[-1]
            variants.insert(1, ("engine+offload", {"text_encoder_offload": "offload"}))
            for quantization in self.args.quantizations:
                quantization = "int8" if self.tiny and quantization == "auto" else quantization
                name = f"{base}+quant[{quantization}]"
                variants.append((name, {**base_overrides, "quantization": quantization}))
                extra[name] = {"changes_outputs": True}
        for index, (variant, overrides) in enumerate(variants):
            if index > 1:
                self.torch._dynamo.reset()  # another compile mode: compile afresh (the disk cache stays)
            if overrides.get("quantization", "none") != "none" and not quantization_available():
                self.add({**case, "batch": batches[0], "variant": variant, "error": "skipped: torchao not installed"})
                continue
            engine = self.engine(overrides)
            for batch in batches:
                self.engine_case(engine, case, variant, task, model_id, batch, size, inputs, calls30, calls10,
                                 flops, baseline_images, baseline_speed, extra.get(variant))
            if stage == MODES_STAGE and variant.startswith("fast") and self.args.speed_modes:
                self.speed_modes(case, task, model_id, size, inputs, calls30, calls10, flops, baseline_images,
                                 baseline_speed, overrides)
            engine.unload_all()
            del engine
            self.release()
            if stage == WARM_STAGE and index == 1 and not self.over_budget():
                self.warm_start(config_dir, model_id, size, overrides)

    def baseline_pipeline(self, folder: Path, inpaint: bool):
        import diffusers

        from infra.engine import quiet_libraries, read_json
        from infra.engine.files.tiny import INPAINT_PIPELINES

        quiet_libraries()
        name = read_json(folder / "model_index.json")["_class_name"]
        if inpaint and "Inpaint" not in name:
            name = INPAINT_PIPELINES[name]
        cls = getattr(diffusers, name)
        pipe = cls.from_pretrained(folder, dtype=self.stage_dtype, local_files_only=True).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def baseline_call(self, pipe, batch: int, size: int, steps: int, scene, mask):
        torch = self.torch
        generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
        kwargs = dict(
            prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
            width=size, height=size, num_images_per_prompt=batch,
            generator=generators if batch > 1 else generators[0],
        )
        if self.flux:  # distilled guidance, no negative prompt
            del kwargs["negative_prompt"]
            kwargs["guidance_scale"] = FLUX_GUIDANCE
        if scene is not None:
            kwargs.update(image=scene, mask_image=mask, strength=1.0)
        with torch.inference_mode():
            return pipe(**kwargs).images

    def vae_decode_share(self, pipe, batch: int, size: int) -> dict:
        """Seconds the baseline's VAE decode of one batch takes (its share of an image's time)."""
        torch = self.torch
        vae = pipe.vae
        latents = torch.randn(batch, vae.config.latent_channels, size // 8, size // 8, device=self.device,
                              dtype=self.stage_dtype)
        upcast = (getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder_2", None) is not None
                  and vae.config.force_upcast and self.stage_dtype == torch.float16)  # SDXL's fp32 VAE

        def decode():
            with torch.inference_mode():
                if upcast:
                    vae.to(torch.float32)
                    vae.decode(latents.float() / vae.config.scaling_factor)
                    vae.to(torch.float16)
                else:
                    vae.decode(latents / vae.config.scaling_factor)

        decode()
        sync(torch, self.device)
        started = time.perf_counter()
        decode()
        sync(torch, self.device)
        return {"vae_decode_s": round(time.perf_counter() - started, 4), "vae_upcast_fp32": bool(upcast)}

    def engine(self, overrides: dict):
        from infra.engine.engine import DiffusersEngine
        from infra.settings import Settings

        settings = Settings(
            _env_file=None, data_dir=self.work / "data", models_dir=self.work / "models", build_tiny_models=False,
            device=self.device.type, model_cache_mb=200_000, **overrides,
        )
        engine = DiffusersEngine(settings, self.store)
        if self.tiny and overrides.get("fast_path"):  # the CPU check: the fast path's code runs on the CPU too
            from dataclasses import replace

            engine.cache.fast = replace(engine.cache.fast, allow_cpu=True, backend=self.args.cpu_compile_backend)
        return engine

    def engine_params(self, model_id: str, task: str, batch: int, size: int, steps: int):
        return job_params(
            model_id, task=task, seeds=[SEED + i for i in range(batch)], size=size, steps=steps,
            scheduler=self.store.default_scheduler(model_id), prompt=PROMPT,
            negative_prompt="" if self.flux else NEGATIVE, guidance_scale=FLUX_GUIDANCE if self.flux else GUIDANCE,
            strength=1.0,
        )

    def engine_case(self, engine, case, variant, task, model_id, batch, size, inputs, calls30, calls10, flops,
                    baseline_images, baseline_speed, extra: dict | None = None) -> None:
        row = {**case, "batch": batch, "variant": variant, **(extra or {})}
        if self.over_budget():
            self.add({**row, "error": "skipped: time budget"})
            return

        def run(steps):
            return engine.generate(self.engine_params(model_id, task, batch, size, steps), inputs)

        try:
            result, images = measure(self.torch, self.device, run, batch, calls30, calls10, self.reps, self.steps)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            self.add({**row, "error": f"{type(exc).__name__}: {exc}"[:500]})
            return
        loaded = engine.cache.models()
        if loaded:
            from infra.engine.speed import denoiser, is_compiled, memory_report

            result["compiled"] = is_compiled(denoiser(loaded[0].pipeline))
            result["memory"] = memory_report(loaded[0].pipeline)  # (None where the engine did not record it)
        if batch in baseline_speed:
            result["speedup"] = round(result["images_per_s"] / baseline_speed[batch], 3)
        self.add(self.finish({**row, **result}, flops.get(batch), images, baseline_images.get(batch)))

    def finish(self, row: dict, flops: int | None, images: list, reference: list | None = None) -> dict:
        import numpy as np

        if flops and row.get("unet_ms_per_call"):
            row["unet_gflop_per_call"] = round(flops / 1e9, 1)
            row["tflops"] = round(flops / (row["unet_ms_per_call"] / 1000) / 1e12, 1)
            peak = self.report["matmul"]["tflops"]
            row["pct_of_matmul_peak"] = round(100 * row["tflops"] / peak, 1) if peak else None
        row["image_std"] = round(float(np.asarray(images[0].convert("RGB"), dtype=np.float64).std()), 1)
        if reference is not None:
            row.update(compare(reference, images))
        return row

    def speed_modes(self, case, task, model_id, size, inputs, calls30, calls10, flops, baseline_images,
                    baseline_speed, fast: dict) -> None:
        for variant, overrides in (("fast+tomesd0.5", {"tomesd_mode": "always", "tomesd_ratio": 0.5}),
                                   ("fast+cfg_cutoff0.5", {"cfg_cutoff": 0.5})):
            engine = self.engine({**fast, **overrides})
            self.engine_case(engine, case, variant, task, model_id, 1, size, inputs, calls30, calls10, {},
                             baseline_images, baseline_speed, {"changes_outputs": True})
            engine.unload_all()
            del engine
            self.release()

    def warm_start(self, config_dir: Path, model_id: str, size: int, fast: dict) -> None:
        """A fresh process with the compile cache the fast variant filled: spawn -> first image."""
        command = [sys.executable, str(Path(__file__).resolve()), "--warm-child", "--work-dir", str(self.work),
                   "--cache-dir", str(self.cache_dir), "--compile-modes", fast["compile_mode"], "--model-id", model_id,
                   "--size", str(size), "--steps", str(self.steps)]
        if self.tiny:
            command += ["--tiny", "--cpu-compile-backend", self.args.cpu_compile_backend]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        spawned = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
        result: dict = {"stage": "warm_start", "variant": f"warm start, fast[{fast['compile_mode']}]", "batch": 1}
        for line in done.stdout.splitlines():
            if line.startswith("WARM "):
                child = json.loads(line[5:])
                result.update({k: round(v - spawned, 3) for k, v in child.items() if k.startswith("t_")})
                result["warm_start_s"] = result.get("t_first_image")
                result["second_image_s"] = child.get("second_image_s")
                result["compiled"] = child.get("compiled")
        if done.returncode != 0 or "warm_start_s" not in result:
            result["error"] = (done.stderr or done.stdout)[-800:]
        self.report["warm_start"] = result
        self.add(result)


def warm_child(args) -> None:
    """The warm-start process: import, load the model through the Engine with the fast path and
    the persistent compile cache, one image; prints the absolute times it reached each point."""
    times = {}
    import torch

    from infra.catalog.weights import WeightsStore
    from infra.engine.engine import DiffusersEngine
    from infra.settings import Settings

    times["t_imported"] = time.time()
    work = Path(args.work_dir)
    device = "cpu" if args.tiny else "cuda"
    settings = Settings(
        _env_file=None, data_dir=work / "data", models_dir=work / "models", build_tiny_models=False, device=device,
        fast_path=True, compile_mode=args.compile_modes[0], compile_cache_dir=args.cache_dir, batch_samples=True,
    )
    store = WeightsStore(work / "models")
    engine = DiffusersEngine(settings, store)
    if args.tiny:
        from dataclasses import replace

        engine.cache.fast = replace(engine.cache.fast, allow_cpu=True, backend=args.cpu_compile_backend)
    engine.warm(args.model_id)
    times["t_loaded"] = time.time()
    params = job_params(args.model_id, seeds=[SEED], size=args.size, steps=args.steps, prompt=PROMPT,
                        negative_prompt=NEGATIVE, guidance_scale=GUIDANCE,
                        scheduler=store.default_scheduler(args.model_id))
    engine.generate(params, {})
    if device == "cuda":
        torch.cuda.synchronize()
    times["t_first_image"] = time.time()
    started = time.perf_counter()
    engine.generate(params, {})
    if device == "cuda":
        torch.cuda.synchronize()
    from infra.engine.speed import is_compiled

    from infra.engine.speed import denoiser

    compiled = is_compiled(denoiser(engine.cache.models()[0].pipeline))
    print("WARM " + json.dumps({**times, "second_image_s": round(time.perf_counter() - started, 4),
                                "compiled": compiled}), flush=True)


# --------------------------------------------------------------------------- the table


COLUMNS = (
    ("stage", "stage"), ("batch", "batch"), ("variant", "variant"), ("s_per_image", "s/image"),
    ("images_per_s", "images/s"), ("speedup", "x baseline"), ("unet_it_per_s", "UNet it/s"),
    ("tflops", "TFLOP/s"), ("pct_of_matmul_peak", "% bf16 peak"), ("peak_gb", "peak GiB"),
    ("first_s", "first run s"), ("vae_decode_s", "VAE decode s"), ("diff_mean", "mean |diff|"),
    ("diff_max", "max |diff|"), ("within_tolerance", "ok"), ("warm_start_s", "warm start s"), ("error", "error"),
)


def table(report: dict) -> str:
    env = report.get("environment", {})
    matmul = report.get("matmul", {})
    lines = [
        f"device: {env.get('device')}; torch {env.get('packages', {}).get('torch')}, diffusers "
        f"{env.get('packages', {}).get('diffusers')}, python {env.get('python')}; measured matmul "
        f"{matmul.get('dtype')} {matmul.get('n')}^3: {matmul.get('tflops')} TFLOP/s",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in report.get("rows", []):
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key, "")
            cells.append(str(value if value is not None else "").replace("|", "/").replace("\n", " ")[:120])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check with the tiny configs (no meaningful timings)")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma list of stages: {', '.join(STAGES)}")
    parser.add_argument("--compile-modes", default="reduce-overhead",
                        help="comma list of SDAPI_COMPILE_MODE values, one fast variant each")
    parser.add_argument("--quantizations", default="auto",
                        help="comma list of SDAPI_QUANTIZATION values, one Flux variant each on the last fast one "
                        "(auto: fp8 on Ada / Hopper, int8 below; int8 with --tiny)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    parser.add_argument("--work-dir", default="/tmp/sdapi-gpu-bench")
    parser.add_argument("--cache-dir", default=None, help="compile cache (default: WORK_DIR/compile-cache)")
    parser.add_argument("--reps", type=int, default=0, help="timed runs per variant (default 3; 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (default 30; 6 with --tiny)")
    parser.add_argument("--budget-s", type=float, default=480, help="start nothing new after this many seconds")
    parser.add_argument("--batches", default="1",
                        help="comma list of the SD 1.5 stages' batch sizes to run (of 1, 4; the others run batch 1)")
    parser.add_argument("--speed-modes", action="store_true",
                        help="also the output-changing speed modes on SD 1.5 text2img (tomesd, cfg cutoff)")
    parser.add_argument("--cpu-compile-backend", default="eager", help="dynamo backend of the --tiny fast variant")
    parser.add_argument("--warm-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-id", default="", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    args.compile_modes = [m for m in args.compile_modes.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.quantizations = [q for q in args.quantizations.split(",") if q and q != "none"]
    unknown = set(args.only) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    if args.warm_child:
        warm_child(args)
        return None
    return Bench(args).run()


if __name__ == "__main__":
    main()
