"""Stage 1 of the GPU run (issue 22): the production path on CUDA, end to end through HTTP.

    python -m bench.gpu_check --out DIR [--work-dir DIR] [--budget-s 150] [--only sd15,sdxl]
    python -m bench.gpu_check --tiny    # the same on the CPU with the tiny configs: checks the script

What runs, in order (each job time-boxed; the report is rewritten after every row, so a run cut off
still says what passed):
1. Models with random weights in the weights store the speed stages share (`bench.gpu.ensure_model`,
   same ids, built once): SD 1.5 architecture (text2img, and its inpainting variant), SDXL
   architecture; fp16, drawn on the GPU (--tiny: the tiny configs in fp32 on the CPU). For each
   family a LoRA and a ControlNet written by `tests/model_files` from the model's own UNet, then
   loaded through `load_model_v2` from their folders, as an operator loads them.
2. The GPU worker as Modal runs it (`infra/modal_worker.py`, driven as tests/modal/cloud.py drives
   the class's hooks): `ModalWorker.for_snapshot(runtime, gpu_snapshot=False)` builds the engine
   with the default model in CPU memory in fp16 (before the memory snapshot), then
   `after_restore(runtime)` moves it to the device the settings name (`cuda`), as every restored
   container does. The local runtime's dispatcher runs its jobs on that worker's engine. The settings
   are the GPU worker's on Modal (modal_app's SETTINGS and GPU_SETTINGS: fast path, batched samples,
   fp16 store) but torch.compile (`--compile-mode`, default none): every new batch x size compiles
   for about a minute, more than this stage has; the speed stages hold the compiled outputs to the
   baseline's (bench/gpu.py, `fast[MODE]` rows, mean |diff| within its tolerance).
3. The real app (`create_app`) under uvicorn on a loopback port, and jobs through HTTP (httpx), the
   enterprise v1 routes: per family inpaint (SD 1.5: the seed page's example body verbatim, its
   image URLs pointed at a loopback file server), text2img with `samples: 4`, img2img, a LoRA job, a
   ControlNet job.

Each job must: answer 200 and end `success` (polled at `fetch_result` while `processing`); give the
number of outputs asked for, each a decodable PNG of the size asked for; show no NaN image (a NaN
latent decodes to a flat black picture, so: pixel std above FLAT_STD; SDXL's fp16 VAE is the usual
culprit); inpaint: every unmasked pixel exactly the init image's; samples: 4 different images;
LoRA and ControlNet: a different image from the same seed without them; img2img: not the init image.
Also reported: the engine's device after the restore, what the engine applied per model (dtype, VAE
upcast, fast path: `memory_report`), and each job's seconds through HTTP.

Results: DIR/gpu-check[-tiny].json and .md; exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

STARTED = time.time()
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu  # (the repository root is on the path first; gpu puts the stand-ins in place)
from bench.common import free_port

KEY = "enterprise_api_key"
API = "/api/v1/enterprise"
FLAT_STD = 2.0  # pixel std (0-255) under which an output counts as flat: a NaN or black image
JOB_TIMEOUT_S = 240.0  # one job through HTTP, its model's first load included

# family -> (base config, tiny config, size, tiny size)
FAMILIES = {"sd15": ("sd15", "tiny-sd", 512, 64), "sdxl": ("sdxl", "tiny-sdxl", 1024, 128)}
STEPS, TINY_STEPS = 12, 3  # the checked jobs' steps (correctness, not speed); the seed body keeps its own 30

# The seed page's example body (../shared/spec/seed-inpaint-endpoint.txt), verbatim but for the model
# and the two image URLs (the GPU box reaches no internet: the same paths on a loopback server).
SEED_IMAGE = "CompVis/stable-diffusion/main/data/inpainting_examples/overture-creations-5sI6fQgYIuo.png"
SEED_MASK = "CompVis/stable-diffusion/main/data/inpainting_examples/overture-creations-5sI6fQgYIuo_mask.png"
SEED_BODY = {
    "key": KEY, "model_id": "your_model_id", "prompt": "a cat sitting on a bench", "negative_prompt": None,
    "init_image": SEED_IMAGE, "mask_image": SEED_MASK, "width": "512", "height": "512", "samples": "1",
    "num_inference_steps": "30", "safety_checker": "no", "enhance_prompt": "yes", "guidance_scale": 7.5,
    "strength": 0.7, "scheduler": "PNDMScheduler", "seed": None, "lora_model": None, "tomesd": "yes",
    "use_karras_sigmas": "yes", "vae": None, "lora_strength": None, "embeddings_model": None, "webhook": None,
    "track_id": None,
}


# --------------------------------------------------------------------------- models


def config_name(family: str, tiny: bool) -> str:
    """The family's architecture config (infra/engine/configs); its model is `bench-<config>`, as bench.gpu names it."""
    config, tiny_config, _, _ = FAMILIES[family]
    return tiny_config if tiny else config


def build_models(store, family: str, tiny: bool, device, dtype, adapters: Path) -> dict:
    """The family's base model, its inpainting variant (SD 1.5), a LoRA file and a ControlNet folder
    (written into `adapters`, loaded later through the API). Seconds each took."""
    from infra.engine import CONFIGS_DIR, LOAD_LOCK
    from tests.model_files import write_controlnet, write_lora

    config_dir = CONFIGS_DIR / config_name(family, tiny)
    base = f"bench-{config_dir.name}"
    seconds = {base: gpu.ensure_model(store, base, config_dir, False, device, dtype)}
    if family == "sd15":
        seconds[base + "-inpaint"] = gpu.ensure_model(store, base + "-inpaint", config_dir, True, device, dtype)
    started = time.perf_counter()
    lora, controlnet = adapters / f"{family}-lora" / "lora.safetensors", adapters / f"{family}-controlnet"
    with LOAD_LOCK:  # (no model is built while the engine loads one: infra.engine)
        if not lora.is_file():
            write_lora(store.folder(base), lora)
        if not (controlnet / "config.json").is_file():
            write_controlnet(store.folder(base), controlnet)
    seconds["adapters"] = time.perf_counter() - started
    return {k: round(v, 1) for k, v in seconds.items()}


# --------------------------------------------------------------------------- the app and its worker


class App:
    """The local runtime with the Modal worker's engine, the real app under uvicorn on loopback."""

    def __init__(self, work: Path, device: str, default_model: str, compile_mode: str):
        import uvicorn

        from infra.modal_worker import ModalWorker
        from infra.runtime import Runtime
        from infra.settings import Settings
        from infra.web.api import create_app

        data = work / "check-data"
        shutil.rmtree(data, ignore_errors=True)  # (a rerun starts with no jobs; the weights stay)
        self.port = free_port()
        settings = Settings(
            _env_file=None, data_dir=data, models_dir=work / "models", port=self.port, device=device,
            default_model_id=default_model, build_tiny_models=False, fetch_known_models=False,
            fetch_allowlist=["127.0.0.1", "localhost"], model_cache_mb=200_000,
            # the GPU worker's settings on Modal (modal_app.GPU_SETTINGS and SETTINGS; modal is not installed here)
            fast_path=True, batch_samples=True, compile_mode=compile_mode,
            compile_cache_dir=work / "compile-cache", store_precision="fp16",
        )
        self.runtime = Runtime.local(settings)
        self.hooks: dict = {}
        started = time.perf_counter()
        self.worker = ModalWorker.for_snapshot(self.runtime, gpu_snapshot=False)  # the snap=True hook
        self.hooks["for_snapshot_s"] = round(time.perf_counter() - started, 2)
        self.hooks["snapshot_device"] = self.worker.engine.device.type
        self.hooks["snapshot_loaded"] = self.worker.engine.loaded()
        started = time.perf_counter()
        self.worker.after_restore(self.runtime)  # the snap=False hook, in every container
        self.hooks["after_restore_s"] = round(time.perf_counter() - started, 2)
        self.hooks["device"] = self.worker.engine.device_name
        self.runtime.dispatcher.make_engine = lambda: self.worker.engine  # jobs run on the worker's engine
        config = uvicorn.Config(create_app(self.runtime), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Files:
    """A loopback HTTP server for the job's input images."""

    def __init__(self, root: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.root = root
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a, **kw: Quiet(*a, directory=str(root), **kw))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def put(self, name: str, image) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        return f"{self.url}/{name}"


# --------------------------------------------------------------------------- jobs and checks


class Failed(Exception):
    pass


def post(client, path: str, body: dict, timeout: float = JOB_TIMEOUT_S) -> dict:
    """One call; a generation that answers `processing` is fetched until it ends or `timeout`."""
    deadline = time.monotonic() + timeout
    response = client.post(path, json=body, timeout=timeout)
    answer = response.json()
    if response.status_code != 200:
        raise Failed(f"HTTP {response.status_code}: {json.dumps(answer)[:400]}")
    while answer.get("status") == "processing" and answer.get("fetch_result"):
        if time.monotonic() > deadline:
            raise Failed(f"still processing after {timeout:.0f} s")
        time.sleep(0.25)
        answer = client.post(answer["fetch_result"], json={"key": KEY}, timeout=timeout).json()
    if answer.get("status") != "success":
        raise Failed(f"ended {answer.get('status')!r}: {json.dumps(answer)[:400]}")
    return answer


def load(client, model_id: str, url: Path, category: str) -> None:
    """load_model_v2 from a local path, waited for (a model an earlier run of the check loaded is kept)."""
    if client.post(f"{API}/verify_model", json={"key": KEY, "model_id": model_id}).json().get("status") != "success":
        post(client, f"{API}/load_model_v2",
             {"key": KEY, "model_id": model_id, "url": str(url), "model_category": category})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        answer = client.post(f"{API}/verify_model", json={"key": KEY, "model_id": model_id}).json()
        if answer.get("status") != "processing":
            break
        if time.monotonic() > deadline:
            raise Failed(f"{model_id}: still loading")
        time.sleep(0.2)
    if answer.get("status") != "success":
        raise Failed(f"{model_id} did not load: {json.dumps(answer)[:400]}")


def outputs(client, answer: dict, count: int, size: int) -> list:
    """The job's images as uint8 arrays, checked: the count asked for, PNG, the size, not flat."""
    import numpy as np
    from PIL import Image

    links = answer.get("output") or []
    if len(links) != count:
        raise Failed(f"{len(links)} outputs, {count} asked for")
    images = []
    for link in links:
        response = client.get(link)
        if response.status_code != 200 or response.content[:8] != b"\x89PNG\r\n\x1a\n":
            raise Failed(f"output {link} is not a PNG (HTTP {response.status_code})")
        image = Image.open(io.BytesIO(response.content))
        image.load()
        if image.size != (size, size):
            raise Failed(f"output is {image.size}, {size}x{size} asked for")
        pixels = np.asarray(image.convert("RGB"))
        std = float(pixels.std())
        if std < FLAT_STD:
            raise Failed(f"a flat output (pixel std {std:.2f}, mean {pixels.mean():.1f}): a NaN or black image")
        images.append(pixels)
    return images


def mean_diff(a, b) -> float:
    import numpy as np

    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


class Check:
    def __init__(self, args):
        import torch

        self.torch, self.args, self.tiny = torch, args, args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.float32 if args.tiny else torch.float16
        self.out, self.work = Path(args.out), Path(args.work_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.name = "gpu-check" + ("-tiny" if args.tiny else "")
        self.rows: list[dict] = []
        self.report: dict = {"stage": "1: the production path on CUDA", "rows": self.rows, "passed": None}

    def save(self) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / f"{self.name}.md").write_text(table(self.report))

    def over_budget(self) -> bool:
        return time.time() - STARTED > self.args.budget_s

    def run(self) -> bool:
        torch = self.torch
        if not self.tiny and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --tiny for the CPU check")
        self.report["environment"] = gpu.environment(torch)
        from infra.catalog.weights import WeightsStore

        store = WeightsStore(self.work / "models")
        adapters = self.work / "check-adapters"
        families = self.args.only
        self.report["build_s"] = {}
        for family in families:
            self.report["build_s"].update(build_models(store, family, self.tiny, self.device, self.dtype, adapters))
        self.save()
        default = f"bench-{config_name('sd15', self.tiny)}"
        app = App(self.work, self.device.type, default, self.args.compile_mode)
        self.report["worker"] = app.hooks
        print("WORKER", json.dumps(app.hooks), flush=True)
        import httpx

        files = Files(self.work / "check-www")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{app.port}", timeout=JOB_TIMEOUT_S) as client:
                for family in families:
                    self.family(client, family, files, adapters)
                self.report["memory"] = app.worker.engine.memory_report()
        finally:
            files.server.shutdown()
            app.close()
        self.report["passed"] = bool(self.rows) and all(row.get("ok") for row in self.rows)
        self.report["seconds"] = round(time.time() - STARTED, 1)
        self.save()
        print(table(self.report))
        return self.report["passed"]

    def row(self, family: str, name: str, job) -> None:
        """Run one check (`job()` returns facts or raises Failed); a row either way."""
        row = {"family": family, "job": name}
        if self.over_budget():
            row.update(ok=False, error="skipped: time budget")
        else:
            started = time.perf_counter()
            try:
                row.update(job() or {})
                row["ok"] = True
            except Exception as exc:  # noqa: BLE001 - a failed check, or a broken one: reported, the others go on
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:600])
            row["seconds"] = round(time.perf_counter() - started, 2)
        self.rows.append(row)
        self.save()
        print("CHECK", json.dumps(row), flush=True)

    def family(self, client, family: str, files: Files, adapters: Path) -> None:
        import numpy as np
        from PIL import Image


        _, _, size, tiny_size = FAMILIES[family]
        size = tiny_size if self.tiny else size
        model = f"bench-{config_name(family, self.tiny)}"
        steps = TINY_STEPS if self.tiny else STEPS
        lora_id, controlnet_id = f"check-{family}-lora", f"check-{family}-canny"
        init, mask, _, _ = gpu.inpaint_inputs(size)
        init_url, mask_url = files.put(f"{family}/init.png", init), files.put(f"{family}/mask.png", mask)
        hint = Image.fromarray((np.random.default_rng(3).random((size, size)) > 0.5).astype(np.uint8) * 255).convert("RGB")
        hint_url = files.put(f"{family}/hint.png", hint)
        common = {"key": KEY, "model_id": model, "prompt": "a red bicycle leaning on a wall", "negative_prompt": "blurry",
                  "width": size, "height": size, "num_inference_steps": steps, "guidance_scale": 7.5, "seed": 11,
                  "safety_checker": "no", "enhance_prompt": "no"}
        plain: dict = {}

        def inpaint():
            if family == "sd15":  # the seed page's body
                seed_init, seed_mask, _, _ = gpu.inpaint_inputs(512)
                files.put(SEED_IMAGE, seed_init)
                files.put(SEED_MASK, seed_mask)
                body = {**SEED_BODY, "model_id": model + "-inpaint", "init_image": f"{files.url}/{SEED_IMAGE}",
                        "mask_image": f"{files.url}/{SEED_MASK}"}
                source, keep, side = seed_init, np.asarray(seed_mask) == 0, 512
            else:  # SDXL: the base model inpaints (the engine's inpainting variant of it)
                body = {**common, "init_image": init_url, "mask_image": mask_url, "strength": 0.9}
                source, keep, side = init, np.asarray(mask) == 0, size
            answer = post(client, f"{API}/inpaint", body)
            image = outputs(client, answer, 1, side)[0]
            source = np.asarray(source.convert("RGB"))
            changed = int((image[keep] != source[keep]).any(axis=-1).sum())
            if changed:
                raise Failed(f"{changed} unmasked pixels changed")
            if np.array_equal(image[~keep], source[~keep]):
                raise Failed("the masked area was not repainted")
            return {"unmasked_exact": True, "masked_mean_diff": round(mean_diff(image[~keep], source[~keep]), 1),
                    "std": round(float(image.std()), 1)}

        def text2img():
            answer = post(client, f"{API}/text2img", {**common, "samples": 4})
            images = outputs(client, answer, 4, size)
            plain["image"] = images[0]
            alike = [(i, j) for i in range(4) for j in range(i + 1, 4) if np.array_equal(images[i], images[j])]
            if alike:
                raise Failed(f"samples {alike} are the same image")
            return {"samples": 4, "std": [round(float(i.std()), 1) for i in images],
                    "seeds": answer.get("meta", {}).get("seed")}

        def img2img():
            answer = post(client, f"{API}/img2img", {**common, "init_image": init_url, "strength": 0.6})
            image = outputs(client, answer, 1, size)[0]
            moved = mean_diff(image, np.asarray(init.convert("RGB")))
            if moved < 1.0:
                raise Failed(f"the output is the init image (mean |diff| {moved:.2f})")
            return {"mean_diff_from_init": round(moved, 1), "std": round(float(image.std()), 1)}

        def reference():
            if "image" not in plain:  # (text2img failed: its first sample again, alone)
                plain["image"] = outputs(client, post(client, f"{API}/text2img", {**common, "samples": 1}), 1, size)[0]
            return plain["image"]

        def lora():
            load(client, lora_id, adapters / f"{family}-lora" / "lora.safetensors", "lora")
            answer = post(client, f"{API}/text2img", {**common, "samples": 1, "lora_model": lora_id, "lora_strength": 1})
            image = outputs(client, answer, 1, size)[0]
            moved = mean_diff(image, reference())
            if moved < 0.5:
                raise Failed(f"the LoRA changed nothing (mean |diff| {moved:.2f} from the same seed without it)")
            return {"mean_diff_from_plain": round(moved, 1), "std": round(float(image.std()), 1)}

        def controlnet():
            load(client, controlnet_id, adapters / f"{family}-controlnet", "controlnet")
            answer = post(client, f"{API}/controlnet", {**common, "samples": 1, "controlnet_model": controlnet_id,
                                                        "control_image": hint_url, "auto_hint": "no"})
            image = outputs(client, answer, 1, size)[0]
            moved = mean_diff(image, reference())
            if moved < 0.5:
                raise Failed(f"the ControlNet changed nothing (mean |diff| {moved:.2f} from the same seed without it)")
            return {"mean_diff_from_plain": round(moved, 1), "std": round(float(image.std()), 1)}

        for name, job in (("inpaint", inpaint), ("text2img samples 4", text2img), ("img2img", img2img),
                          ("lora", lora), ("controlnet", controlnet)):
            self.row(family, name, job)


def table(report: dict) -> str:
    worker = report.get("worker", {})
    env = report.get("environment", {})
    lines = [
        (f"stage 1 on {env.get('device')}: worker built on {worker.get('snapshot_device')} "
         f"({worker.get('for_snapshot_s')} s, loaded {worker.get('snapshot_loaded')}), after_restore on "
         f"{worker.get('device')} ({worker.get('after_restore_s')} s); passed: {report.get('passed')}"),
        "",
        "| family | job | ok | seconds | facts | error |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.get("rows", []):
        facts = {k: v for k, v in row.items() if k not in ("family", "job", "ok", "seconds", "error")}
        error = str(row.get("error", "")).replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {row['family']} | {row['job']} | {'yes' if row.get('ok') else 'NO'} | {row.get('seconds', '')} "
                     f"| {json.dumps(facts).replace('|', '/')} | {error} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check with the tiny configs")
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma list of families: {', '.join(FAMILIES)}")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    parser.add_argument("--work-dir", default="/tmp/sdapi-gpu-bench", help="shared with bench.gpu (its weights store)")
    parser.add_argument("--budget-s", type=float, default=150, help="start no check after this many seconds")
    parser.add_argument("--compile-mode", default="none",
                        help="SDAPI_COMPILE_MODE of the worker (Modal's is reduce-overhead; each new batch x size "
                        "compiles for about a minute, so stage 1 checks the fast path uncompiled and the speed "
                        "stages check the compiled outputs against the baseline)")
    args = parser.parse_args(argv)
    args.only = [f for f in args.only.split(",") if f]
    unknown = set(args.only) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families: {', '.join(sorted(unknown))}")
    return 0 if Check(args).run() else 1


if __name__ == "__main__":
    raise SystemExit(main())
