"""Model switch, in the engine (one process, models already in the model cache):

* `A -> B`: a text2img job on model B right after one on model A (two tiny SD models, both
  cached), against B right after B: the switch's extra time, end to end through `Engine.run`;
* `text2img -> inpaint` on one model: an inpaint job right after a text2img job, against inpaint
  after inpaint;
* the mechanics alone, without denoising (what a switch costs the engine: the cache lookup and the
  job's pipeline for the variant), the way the engine does it now (`ModelCache.pipeline`: the
  variant is built once per model, a job gets a shallow copy with its own scheduler) and the way it
  did before (`from_pipe` for every job), measured in the same run; with `--big DIR` (a store built
  by bench.coldload) also on the SD 1.5-sized model.

    python -m bench.switch [--quick] [--rounds N] [--big STORE_DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from bench.common import cleanup, emit, job_params, peak_rss_mb, scratch

INPUTS_SIZE = 64


def _inpaint_inputs() -> dict[str, bytes]:
    from PIL import Image

    from infra.net.inputs import encode_input

    init = Image.linear_gradient("L").resize((INPUTS_SIZE, INPUTS_SIZE)).convert("RGB")
    mask = Image.new("L", (INPUTS_SIZE, INPUTS_SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    return {"init_image": encode_input(init), "mask_image": encode_input(mask)}


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


def end_to_end(engine, rounds: int) -> dict:
    """Median engine time of a job after a different job vs after the same kind of job."""
    inputs = _inpaint_inputs()

    def job(kind: str, seed: int) -> float:
        model_id = {"a": "tiny-sd", "b": "tiny-sd-b", "inpaint": "tiny-sd"}[kind]
        task = "inpaint" if kind == "inpaint" else "text2img"
        params = job_params(model_id, task=task, seeds=(seed,), strength=1.0 if task == "inpaint" else None)
        started = time.perf_counter()
        engine.run(params, inputs if task == "inpaint" else {})
        return time.perf_counter() - started

    for kind in ("a", "b", "inpaint", "a", "b", "inpaint"):  # warm: both models cached, every variant seen
        job(kind, 0)
    same_b, switched_b, same_inpaint, switched_inpaint = [], [], [], []
    for i in range(rounds):
        job("b", i)
        same_b.append(job("b", i))
        job("a", i)
        switched_b.append(job("b", i))
        job("inpaint", i)
        same_inpaint.append(job("inpaint", i))
        job("a", i)
        switched_inpaint.append(job("inpaint", i))
    return {
        "model_b_after_b_ms": _median_ms(same_b),
        "model_b_after_a_ms": _median_ms(switched_b),
        "model_switch_extra_ms": round(_median_ms(switched_b) - _median_ms(same_b), 3),
        "inpaint_after_inpaint_ms": _median_ms(same_inpaint),
        "inpaint_after_text2img_ms": _median_ms(switched_inpaint),
        "variant_switch_extra_ms": round(_median_ms(switched_inpaint) - _median_ms(same_inpaint), 3),
    }


def mechanics(cache, model_ids: tuple[str, str], rounds: int) -> dict:
    """A switch without the denoising: cache.model + the job's pipeline, now and as before."""
    from infra.engine.cache import VARIANTS
    from infra.engine.schedulers import build_scheduler

    def now(model_id: str, variant: str):
        model = cache.model(model_id)
        return cache.pipeline(model, variant, "PNDMScheduler", False, None)

    def before(model_id: str, variant: str):  # the code this replaced: from_pipe for every job
        model = cache.model(model_id)
        fresh = build_scheduler("PNDMScheduler", model.scheduler_config, False, None)
        pipeline = VARIANTS[model.family][variant].from_pipe(model.pipeline, scheduler=fresh, dtype=model.pipeline.dtype)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    result = {}
    a, b = model_ids
    for name, fn in (("now", now), ("before", before)):
        fn(a, "text2img"), fn(b, "text2img"), fn(a, "inpaint")  # warm
        models, variants = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            fn(b if len(models) % 2 else a, "text2img")
            models.append(time.perf_counter() - started)
            started = time.perf_counter()
            fn(a, "inpaint" if len(variants) % 2 else "text2img")
            variants.append(time.perf_counter() - started)
        result[name] = {"model_switch_ms": _median_ms(models), "variant_switch_ms": _median_ms(variants)}
    return result


def run(quick: bool = False, rounds: int | None = None, big: Path | None = None) -> dict:
    import torch

    from infra.catalog.weights import WeightsStore
    from infra.engine.engine import DiffusersEngine
    from infra.runtime import Runtime
    from infra.settings import Settings

    rounds = rounds or (5 if quick else 20)
    folder = scratch("switch")
    try:
        settings = Settings(data_dir=folder / "data", models_dir=folder / "models", torch_threads=1, device="cpu")
        runtime = Runtime.local(settings)
        runtime.ensure_builtin_models()
        source = runtime.weights.folder("tiny-sd")
        runtime.weights.install("tiny-sd-b", "stable_diffusion",
                                lambda target: shutil.copytree(source, target, dirs_exist_ok=True),
                                source="copy of tiny-sd", family="sd")
        engine = DiffusersEngine(settings, runtime.weights)
        result = {
            "benchmark": "switch",
            "tiny_end_to_end": end_to_end(engine, rounds),
            "tiny_mechanics": mechanics(engine.cache, ("tiny-sd", "tiny-sd-b"), rounds * 5),
        }
        if big is not None:
            from bench.coldload import MODEL_ID

            torch.set_num_threads(max(1, torch.get_num_threads()))
            big_settings = Settings(data_dir=folder / "data", models_dir=big, device="cpu")
            big_engine = DiffusersEngine(big_settings, WeightsStore(big))
            result["sd15_mechanics"] = mechanics(big_engine.cache, (MODEL_ID, MODEL_ID), rounds)
        result["peak_rss_mb"] = peak_rss_mb()
        return result
    finally:
        cleanup(folder)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.switch")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--big", type=Path, help="a weights store built by bench.coldload (its store/ folder)")
    args = parser.parse_args()
    emit(run(args.quick, args.rounds, args.big))


if __name__ == "__main__":
    main()
