"""Deploy the API to Modal:  modal deploy modal_app.py

What runs where (and why, under Modal's semantics: ../shared/notes/modal-semantics.md):
- `web`: the same FastAPI app as the local server, on CPU containers (`@modal.asgi_app`,
  `@modal.concurrent`). Jobs live in `modal.Dict`s (records; the queue of open jobs), work goes
  to the GPU class with `.spawn()` and each call's id is kept with its job. At most
  SDAPI_MODAL_MAX_CONTAINERS jobs are spawned and unfinished at once; the others wait in the queue
  Dict and are spawned in the fair order (priority, then round-robin across keys) as GPUs free
  up, since Modal's own input queue is first come, first served. A request waits for its
  job asynchronously (no thread per wait) for up to SDAPI_SYNC_TIMEOUT (120 s, under Modal's 150 s
  web limit), then answers `processing`; a stream/{id} ends with a `reconnect` event after
  SDAPI_STREAM_MAX_SECONDS (120 s, under the web function's 150 s timeout). A cancelled queued
  job's call is cancelled (`FunctionCall.cancel`: its input never runs); a running job stops at its
  next step (its worker reads the cancel from the jobs Dict), so its GPU container stays for the
  next job. Outputs go to the S3 bucket of SDAPI_S3_CONFIG (the production default) or, without
  one, to the `sd-enterprise-data` Volume, served under /files. Its image has no torch.
- `Worker`: the GPU class (SDAPI_MODAL_GPU). Its memory snapshot holds the imports and the default
  model's weights (in the GPU's dtype on the CPU: fp16, bf16 for a transformer family; on the GPU
  itself with SDAPI_MODAL_GPU_SNAPSHOT). After every restore a container reads its own settings and
  the restart generation of its own start, then moves the weights to the GPU, where the engine
  applies the fast path and the memory settings (SDAPI_QUANTIZATION, SDAPI_TEXT_ENCODER_OFFLOAD:
  infra/engine/speed.py).
- One more GPU class per other GPU type that SDAPI_MODAL_FAMILY_GPUS routes a model family to (e.g.
  "flux=H100,qwen=H100,sd3=L40S" adds `Worker_H100` and `Worker_L40S`): the same body on another card,
  autoscaled on its own. A job is spawned to the class of its model's family (the catalog entry's
  `family`); every other family's jobs go to `Worker`. Each class snapshots the default model only
  if it runs that model's family. SDAPI_MODAL_MAX_CONTAINERS stays one ceiling (the fair queue's
  slots) across all the classes. `run(job_id)` takes one job through `execute_job`; Modal's
  re-delivery of an input after a pre-emption or a crash takes the job up again; after each input
  it spawns the next job of the fair queue (its slot is free). Webhooks are
  handed to `deliver_webhook`, so a GPU never waits for a receiver. The compile cache has a Volume of
  its own (`sd-enterprise-compile-cache`).
- `download_model`: model loads (load_model, load_vae, models fetched on first use, the default
  models of a fresh deployment) on a CPU container; when one ends, the jobs that waited for it are
  spawned (a job never holds a GPU while its model downloads).
- `deliver_webhook`: one job's webhook, with its retries, on a CPU container.
- `recover_jobs` (every 2 minutes): jobs whose spawn was lost or whose call failed, found by their
  calls, and held jobs into any free slot; `clean_caches` (hourly): expired outputs, old job records, download scratch, usage folded,
  and every Dict entry an operator relies on written again so none expires (7 idle days).

Before the first deploy, create the secret with the API keys and, for production, the output bucket
(update_s3's fields in JSON):
    modal secret create sd-enterprise-api SDAPI_API_KEYS=<your-key>[,<another-key>] \\
        SDAPI_S3_CONFIG='{"endpoint_url": ..., "bucket": ..., ...}' [SDAPI_WEBHOOK_SECRET=<secret>]

Deploy-time settings (environment variables of the `modal deploy` command; baked into the images,
so every container reads the same): see DEPLOY_DEFAULTS below and the README.
Smoke test of the deployed app: python scripts/modal_smoke.py --key <api key>
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import modal
import modal.experimental

APP_NAME = "sd-enterprise-api"

# --------------------------------------------------------------------------- deploy-time settings

# Read from the deploying shell here, and baked into every image: a container sees only its image's
# environment (and the secret's), so when it imports this file it reads the same values.
DEPLOY_DEFAULTS = {
    "SDAPI_MODAL_GPU": "A100-80GB",  # the GPU type of the workers (H100, L40S, ...)
    "SDAPI_MODAL_FAMILY_GPUS": "",  # family=GPU pairs ("flux=H100,sd3=L40S"): those families' jobs on a class of their own
    "SDAPI_MODAL_GPU_SNAPSHOT": "false",  # true: Modal's (alpha) GPU memory snapshot besides the CPU one
    "SDAPI_MODAL_MIN_CONTAINERS": "0",  # GPU workers kept warm (billed while up); 0: scale to zero
    "SDAPI_MODAL_MAX_CONTAINERS": "10",  # the GPU burst ceiling (the cost ceiling of a burst; the fair queue's slots)
    "SDAPI_MODAL_SPAWN_AHEAD": "0",  # jobs handed to Modal beyond the ceiling (0: all wait in the fair queue)
    "SDAPI_MODAL_BUFFER_CONTAINERS": "0",  # extra idle GPU workers while busy
    "SDAPI_MODAL_SCALEDOWN_WINDOW": "300",  # seconds a GPU worker waits idle before it goes
    "SDAPI_MODAL_WEB_MIN_CONTAINERS": "0",  # CPU web containers kept warm (cheap: 1 avoids the web cold start)
    "SDAPI_MODAL_WEB_MAX_INPUTS": "100",  # requests one web container takes at once
}
DEPLOY_ENV = {name: os.environ.get(name, default) for name, default in DEPLOY_DEFAULTS.items()}
GPU = DEPLOY_ENV["SDAPI_MODAL_GPU"]
GPU_SNAPSHOT = DEPLOY_ENV["SDAPI_MODAL_GPU_SNAPSHOT"].lower() in ("1", "true", "yes")
MIN_CONTAINERS = int(DEPLOY_ENV["SDAPI_MODAL_MIN_CONTAINERS"])
MAX_CONTAINERS = int(DEPLOY_ENV["SDAPI_MODAL_MAX_CONTAINERS"])
BUFFER_CONTAINERS = int(DEPLOY_ENV["SDAPI_MODAL_BUFFER_CONTAINERS"])
SCALEDOWN_WINDOW = int(DEPLOY_ENV["SDAPI_MODAL_SCALEDOWN_WINDOW"])
WEB_MIN_CONTAINERS = int(DEPLOY_ENV["SDAPI_MODAL_WEB_MIN_CONTAINERS"])
WEB_MAX_INPUTS = int(DEPLOY_ENV["SDAPI_MODAL_WEB_MAX_INPUTS"])

# the model families of the catalog (a manifest's `family`), and the GPU type each runs on when not SDAPI_MODAL_GPU's
FAMILIES = ("sd", "sdxl", "flux", "sd3", "qwen", "zimage", "flux2", "svd")  # svd: img2video's models


def family_gpus(text: str) -> dict[str, str]:
    """SDAPI_MODAL_FAMILY_GPUS ("flux=H100,sd3=L40S") as {family: GPU type}, less the families it
    puts on SDAPI_MODAL_GPU's type anyway."""
    routes = {}
    for item in (part.strip() for part in text.split(",")):
        family, _, gpu = (side.strip() for side in item.partition("="))
        if not item:
            continue
        if family not in FAMILIES or not gpu:
            raise ValueError(f"SDAPI_MODAL_FAMILY_GPUS: {item!r} is not FAMILY=GPU with FAMILY one of {', '.join(FAMILIES)}")
        if gpu != GPU:
            routes[family] = gpu
    return routes


FAMILY_GPUS = family_gpus(DEPLOY_ENV["SDAPI_MODAL_FAMILY_GPUS"])
# the GPU classes: `Worker` on SDAPI_MODAL_GPU, one more per other GPU type (`Worker_H100`, `Worker_A100_80GB`, ...)
WORKER_CLASSES = {GPU: "Worker", **{gpu: "Worker_" + re.sub(r"\W", "_", gpu) for gpu in FAMILY_GPUS.values()}}
DEVICE_LABEL = f"modal: {GPU}" + (" (" + ", ".join(f"{f}: {g}" for f, g in FAMILY_GPUS.items()) + ")" if FAMILY_GPUS else "")

WEIGHTS_PATH = "/weights"  # the weights store (Volume)
DATA_PATH = "/data"  # outputs when no S3 bucket is set (Volume)
COMPILE_CACHE_PATH = "/compile-cache"  # torch.compile's cache (Volume: kernel files held open never block the weights)
WEB_TIMEOUT = 150  # Modal's limit for a web request; the sync budget below stays under it
SYNC_TIMEOUT = 120
# a stream/{id} connection ends with a `reconnect` event before the web function's timeout cuts it
# (the client goes on with Last-Event-ID); an operator may choose less (or more, still under the timeout)
STREAM_MARGIN = 30
STREAM_MAX_SECONDS = float(os.environ.get("SDAPI_STREAM_MAX_SECONDS", WEB_TIMEOUT - STREAM_MARGIN))
if modal.is_local() and not 0 < STREAM_MAX_SECONDS <= WEB_TIMEOUT - 5:  # checked where `modal deploy` runs
    raise ValueError(f"SDAPI_STREAM_MAX_SECONDS must be above 0 and at most {WEB_TIMEOUT - 5} s (the web function's "
                     f"timeout is {WEB_TIMEOUT} s), not {STREAM_MAX_SECONDS:g}")

# the server's settings in every container (the secret adds the keys, the bucket, ...)
SETTINGS = {
    "SDAPI_DATA_DIR": DATA_PATH,
    "SDAPI_MODELS_DIR": WEIGHTS_PATH,
    "SDAPI_ALLOW_LOCAL_MODEL_PATHS": "false",  # paths mean nothing inside a container
    "SDAPI_BUILD_TINY_MODELS": "false",
    # the default models: fetched into the weights Volume by the downloader on first need
    "SDAPI_DEFAULT_MODEL_ID": os.environ.get("SDAPI_DEFAULT_MODEL_ID", "stable-diffusion-v1-5"),
    "SDAPI_DEFAULT_MODEL_SOURCE": os.environ.get("SDAPI_DEFAULT_MODEL_SOURCE", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "SDAPI_DEFAULT_INPAINT_MODEL_ID": os.environ.get("SDAPI_DEFAULT_INPAINT_MODEL_ID", "stable-diffusion-inpainting"),
    "SDAPI_DEFAULT_INPAINT_MODEL_SOURCE": os.environ.get(
        "SDAPI_DEFAULT_INPAINT_MODEL_SOURCE", "stable-diffusion-v1-5/stable-diffusion-inpainting"),
    "SDAPI_DEFAULT_MOTION_ADAPTER_ID": "animatediff-motion-adapter-v1-5-2",
    "SDAPI_DEFAULT_IMAGE_TO_VIDEO_MODEL_ID": os.environ.get("SDAPI_DEFAULT_IMAGE_TO_VIDEO_MODEL_ID",
                                                            "stable-video-diffusion-img2vid-xt"),
    "SDAPI_SYNC_TIMEOUT": str(SYNC_TIMEOUT),
    "SDAPI_STREAM_MAX_SECONDS": f"{STREAM_MAX_SECONDS:g}",
    "SDAPI_CLEANUP_INTERVAL": "0",  # the scheduled functions clean
    "SDAPI_STORE_PRECISION": "fp16",  # what the GPU worker runs; the downloader that stores it has no GPU
    # memory on the GPU (infra/engine/speed.py): in every image, so system_details on the web tier reports them
    "SDAPI_TEXT_ENCODER_OFFLOAD": os.environ.get("SDAPI_TEXT_ENCODER_OFFLOAD", "auto"),
    "SDAPI_QUANTIZATION": os.environ.get("SDAPI_QUANTIZATION", "none"),
    "SDAPI_QUANTIZE_TEXT_ENCODERS": os.environ.get("SDAPI_QUANTIZE_TEXT_ENCODERS", "false"),
}
# the GPU worker only: the engine's fast path (channels_last, fused QKV, torch.compile of the UNet or
# transformer and the VAE decoder; see infra/engine/speed.py), one batched pass per job, and the compile
# cache on its Volume
GPU_SETTINGS = {
    "SDAPI_FAST_PATH": "true",
    "SDAPI_BATCH_SAMPLES": "true",
    "SDAPI_COMPILE_MODE": os.environ.get("SDAPI_COMPILE_MODE", "reduce-overhead"),
    "SDAPI_COMPILE_CACHE_DIR": COMPILE_CACHE_PATH,
}
WEB_ENV = {**SETTINGS, **DEPLOY_ENV}  # a web, download or scheduled container's environment (plus the secret's)
GPU_ENV = {**WEB_ENV, **GPU_SETTINGS}  # a GPU worker's

# --------------------------------------------------------------------------- images

# the packages come from pyproject.toml, the one place they are pinned: the web image takes the base
# dependencies (no torch), the GPU image also the `torch`, `engine` and `quant` (torchao) extras (on Linux,
# PyPI's torch==2.13.0 is the CUDA build; the local CPU build comes from the machines' own disks)
PYPROJECT = str(Path(__file__).with_name("pyproject.toml"))
GPU_EXTRAS = ["torch", "engine", "quant"]
SOURCE = ("handlers", "models", "infra")
IGNORE = ["**/__pycache__/**", "**/*.pyc"]  # not only .py: infra/engine/configs holds architecture configs

web_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_pyproject(PYPROJECT)
    .env(WEB_ENV)
    .add_local_python_source(*SOURCE, ignore=IGNORE)
)
gpu_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_pyproject(PYPROJECT, optional_dependencies=GPU_EXTRAS)
    # rembg (removebg_mask, the `engine` extra) imports pymatting, whose numba kernels compile on the first
    # import (about a minute) into numba's cache beside the package: once here, in the image, not per container
    # (numba compiles again where the container's CPU differs from the builder's)
    .run_commands("python -c 'import rembg'")
    .env(GPU_ENV)
    .add_local_python_source(*SOURCE, ignore=IGNORE)
)

# --------------------------------------------------------------------------- app, volumes, dicts, secret

app = modal.App(APP_NAME)
weights = modal.Volume.from_name("sd-enterprise-weights", create_if_missing=True)
data = modal.Volume.from_name("sd-enterprise-data", create_if_missing=True)
compile_cache = modal.Volume.from_name("sd-enterprise-compile-cache", create_if_missing=True)
jobs_dict = modal.Dict.from_name("sd-enterprise-jobs", create_if_missing=True)
inputs_dict = modal.Dict.from_name("sd-enterprise-inputs", create_if_missing=True)
queue_dict = modal.Dict.from_name("sd-enterprise-queue", create_if_missing=True)
config_dict = modal.Dict.from_name("sd-enterprise-config", create_if_missing=True)
usage_dict = modal.Dict.from_name("sd-enterprise-usage", create_if_missing=True)
secret = modal.Secret.from_name("sd-enterprise-api", required_keys=["SDAPI_API_KEYS"])
VOLUMES = {WEIGHTS_PATH: weights, DATA_PATH: data}


def call_status(call_id: str) -> str:
    """A spawned call as the dispatcher needs it: "pending", "done" or "failed: <why>"."""
    try:
        modal.FunctionCall.from_id(call_id).get(timeout=0)
    except TimeoutError:  # the built-in one: still queued or running
        return "pending"
    except modal.exception.OutputExpiredError:  # finished more than 7 days ago
        return "done"
    except Exception as exc:  # the call failed: Modal gave up on the input
        return f"failed: {type(exc).__name__}: {exc}"[:500]
    return "done"


def cancel_call(call_id: str) -> None:
    """A cancelled queued job's call: an input still waiting never runs (and is not retried);
    `terminate_containers=False` keeps the GPU container that may hold it warm for the next job."""
    modal.FunctionCall.from_id(call_id).cancel(terminate_containers=False)


def spawn_worker(class_name: str, job_id: int) -> str | None:
    """A job to a GPU class (looked up by its name when the job is spawned); its call id."""
    return getattr(globals()[class_name]().run.spawn(job_id), "object_id", None)


def modal_runtime(deliver_webhooks_here: bool = False):
    """The runtime in this container: the same Runtime as locally, with Modal's backends."""
    from infra.jobs.modal_dispatch import ModalHandles
    from infra.runtime import Runtime

    return Runtime.modal(ModalHandles(
        jobs=jobs_dict, inputs=inputs_dict, queue=queue_dict, config=config_dict, usage=usage_dict,
        spawn_job=functools.partial(spawn_worker, "Worker"),
        spawn_job_for_family={family: functools.partial(spawn_worker, WORKER_CLASSES[gpu])
                              for family, gpu in FAMILY_GPUS.items()},
        spawn_load=lambda request: download_model.spawn(request),
        spawn_webhook=None if deliver_webhooks_here else (lambda job_id: deliver_webhook.spawn(job_id)),
        call_status=call_status,
        cancel_call=cancel_call,
        device_label=DEVICE_LABEL,
        commit_outputs=data.commit, reload_outputs=data.reload,
        commit_weights=weights.commit,  # a `loading` manifest the web tier writes is seen by the downloader
        reload_weights=weights.reload,
    ))


# --------------------------------------------------------------------------- the GPU worker

WORKER_OPTIONS = dict(
    image=gpu_image,
    gpu=GPU,
    volumes={**VOLUMES, COMPILE_CACHE_PATH: compile_cache},
    secrets=[secret],
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    buffer_containers=BUFFER_CONTAINERS,
    scaledown_window=SCALEDOWN_WINDOW,
    timeout=3600,  # one job at most
    startup_timeout=900,  # a start (snapshot restore, or a first snapshot loading the default model) at most
    cpu=4.0,
    memory=32768,  # the snapshot holds an SDXL-sized model in fp16 in host memory
    enable_memory_snapshot=True,
    experimental_options={"enable_gpu_snapshot": True} if GPU_SNAPSHOT else None,
)


class GpuWorker:
    """The body of every GPU class: `Worker` below, and one per other GPU type of SDAPI_MODAL_FAMILY_GPUS."""

    gpu = GPU  # the GPU type of the class

    def serves(self, family: str) -> bool:
        """Whether jobs of this model family come to this class."""
        return FAMILY_GPUS.get(family, GPU) == self.gpu

    @modal.enter(snap=True)
    def load_into_memory(self):
        """Before the snapshot: imports and the default model's weights in memory (if its family runs here)."""
        from infra.modal_worker import ModalWorker

        self.worker = ModalWorker.for_snapshot(modal_runtime(), gpu_snapshot=GPU_SNAPSHOT, serves=self.serves)

    @modal.enter(snap=False)
    def after_restore(self):
        """In every container: its own settings and restart generation, the weights on the GPU."""
        self.worker.after_restore(modal_runtime(), reload_weights=weights.reload)

    @modal.method()
    def run(self, job_id: int) -> str:
        """Run one job to `success` or `failed`; returns its status."""
        status = self.worker.run(job_id, input_id=modal.current_input_id(), reload_weights=weights.reload)
        if self.worker.compile_cache_grew():  # kernels compiled for a new shape: keep them for other containers
            compile_cache.commit()
        if self.worker.outdated():  # restart_server / clear_cache asked for fresh containers
            modal.experimental.stop_fetching_inputs()
        return status

    @modal.exit()
    def stop(self):
        self.worker.stop()


@app.cls(**WORKER_OPTIONS)
@modal.concurrent(max_inputs=1)  # one job at a time per GPU; autoscaling adds containers
class Worker(GpuWorker):
    """The GPU class on SDAPI_MODAL_GPU: every family's jobs that SDAPI_MODAL_FAMILY_GPUS sends nowhere else."""


# the other GPU classes, each a module-level name (Modal finds a class in its container by its name here)
for _gpu, _name in WORKER_CLASSES.items():
    if _name != "Worker":
        _families = ", ".join(family for family, gpu in FAMILY_GPUS.items() if gpu == _gpu)
        _body = type(_name, (GpuWorker,), {"gpu": _gpu, "__module__": __name__, "__qualname__": _name,
                                           "__doc__": f"The GPU class on {_gpu}: the jobs of {_families} models."})
        globals()[_name] = app.cls(**{**WORKER_OPTIONS, "gpu": _gpu})(modal.concurrent(max_inputs=1)(_body))


# --------------------------------------------------------------------------- CPU functions

CPU_FUNCTION = dict(image=web_image, secrets=[secret], cpu=1.0, memory=1024)


@app.function(image=gpu_image, volumes={WEIGHTS_PATH: weights}, secrets=[secret], timeout=3600, cpu=4.0,
              memory=32768)  # converting a single-file SDXL checkpoint holds it twice in memory
def download_model(request: dict) -> str:
    """A load_model / load_vae / first-use download: fetch, verify, convert into the Volume, commit;
    then the jobs that waited for it are spawned."""
    from infra.modal_worker import run_download

    runtime = modal_runtime()
    try:
        return run_download(runtime, request)
    finally:
        weights.commit()


@app.function(**CPU_FUNCTION, timeout=900)
def deliver_webhook(job_id: int) -> str:
    """One job's webhook, with the retries the settings allow (off the GPU)."""
    from infra.modal_worker import deliver_webhook as deliver

    return deliver(modal_runtime(deliver_webhooks_here=True), job_id, timeout=870)


@app.function(**CPU_FUNCTION, volumes={WEIGHTS_PATH: weights}, timeout=300, schedule=modal.Period(minutes=2))
def recover_jobs() -> dict:
    """Every 2 minutes: jobs whose spawn was lost, whose call failed, or whose models finished loading."""
    runtime = modal_runtime()
    queued, failed = runtime.recover_jobs()
    return {"jobs_spawned": len(queued), "jobs_failed": len(failed)}


@app.function(**CPU_FUNCTION, volumes=VOLUMES, timeout=3600, schedule=modal.Cron("17 * * * *"))
def clean_caches() -> dict:
    """Hourly: expired outputs, job records past their retention (the others written again so no
    Dict entry expires before it), download scratch; usage folded; the run-time config refreshed."""
    runtime = modal_runtime()
    report = {**runtime.cleaner.clean(), "usage_entries_folded": runtime.usage.store.compact(),
              "config_entries_refreshed": runtime.config.refresh()}
    runtime.webhooks.wait_idle(60)
    data.commit()
    weights.commit()
    return report


FUNCTIONS = ("download_model", "deliver_webhook", "recover_jobs", "clean_caches", "web")

# --------------------------------------------------------------------------- the web tier


@app.function(image=web_image, volumes=VOLUMES, secrets=[secret], timeout=WEB_TIMEOUT, min_containers=WEB_MIN_CONTAINERS,
              cpu=2.0, memory=2048)
@modal.concurrent(max_inputs=WEB_MAX_INPUTS)  # waits are asynchronous: a request holds no thread while it waits
@modal.asgi_app()
def web():
    from infra.web.api import create_app

    return create_app(modal_runtime())
