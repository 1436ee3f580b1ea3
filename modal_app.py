"""Deploy the API to Modal:  modal deploy modal_app.py

What runs where:
- `web`: the same FastAPI app as the local server, on CPU containers (`@modal.asgi_app`,
  `@modal.concurrent`), built with the Modal runtime: jobs in a `modal.Dict`, work handed to the
  GPU class with `.spawn()`, outputs on the `sd-enterprise-data` Volume (served under `/files/...`
  as locally) or in the S3 bucket set with update_s3. Its image has no torch: it starts fast.
- `Worker`: the GPU class (`SDAPI_MODAL_GPU`, A100-80GB by default). `@modal.enter(snap=True)`
  loads the default model on the CPU for the memory snapshot; a second `@modal.enter` moves it to
  the GPU. `run(job_id)` takes one job through the same `execute_job` the local worker uses. Its
  image turns on the engine's GPU fast path (`GPU_SETTINGS`: torch.compile with a compile cache on
  the weights Volume, committed when a job compiled something new; SDAPI_COMPILE_MODE at deploy time).
  Autoscaling replaces a load balancer: min / max / buffer containers and the scale-down window
  are settable at deploy time through the environment variables below.
- `download_model`: model loads (load_model, load_vae, first-use upscalers) on a CPU container with
  the weights Volume mounted; the Volume is committed when the load ends.
- `clean_caches`: a `modal.Cron` running the same cleaning pass as clear_cache (expired outputs,
  old job records, download scratch).

Before the first deploy, create the secret with the API keys (and, optionally, the webhook signing
secret and a default S3 bucket as update_s3's fields in JSON):
    modal secret create sd-enterprise-api SDAPI_API_KEYS=<your-key>[,<another-key>] \
        [SDAPI_WEBHOOK_SECRET=<secret>] [SDAPI_S3_CONFIG='{"endpoint_url": ..., ...}']

Deploy-time settings (environment variables of the `modal deploy` command):
    SDAPI_MODAL_GPU (A100-80GB), SDAPI_MODAL_MIN_CONTAINERS (0), SDAPI_MODAL_MAX_CONTAINERS (10),
    SDAPI_MODAL_BUFFER_CONTAINERS (0), SDAPI_MODAL_SCALEDOWN_WINDOW (300 s),
    SDAPI_MODAL_GPU_SNAPSHOT (false: CPU memory snapshot only; true: also GPU memory, Modal's
    experimental option — restores CUDA state and compiled kernels, see the README).
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

APP_NAME = "sd-enterprise-api"
GPU = os.environ.get("SDAPI_MODAL_GPU", "A100-80GB")
MIN_CONTAINERS = int(os.environ.get("SDAPI_MODAL_MIN_CONTAINERS", "0"))
MAX_CONTAINERS = int(os.environ.get("SDAPI_MODAL_MAX_CONTAINERS", "10"))
BUFFER_CONTAINERS = int(os.environ.get("SDAPI_MODAL_BUFFER_CONTAINERS", "0"))
SCALEDOWN_WINDOW = int(os.environ.get("SDAPI_MODAL_SCALEDOWN_WINDOW", "300"))
GPU_SNAPSHOT = os.environ.get("SDAPI_MODAL_GPU_SNAPSHOT", "false").lower() in ("1", "true", "yes")

WEIGHTS_PATH = "/weights"  # the weights store (Volume)
DATA_PATH = "/data"  # outputs served under /files when no S3 bucket is set (Volume)
WEB_TIMEOUT = 150  # Modal's limit for a web request; the sync budget below stays under it

# --------------------------------------------------------------------------- images

# the packages come from pyproject.toml, the one place they are pinned: the web image takes the base
# dependencies (no torch), the GPU image also the `torch` and `engine` extras (on Linux, PyPI's
# torch==2.13.0 is the CUDA build; the local CPU build comes from the machines' own disks)
PYPROJECT = str(Path(__file__).with_name("pyproject.toml"))
GPU_EXTRAS = ["torch", "engine"]
SETTINGS = {
    "SDAPI_DATA_DIR": DATA_PATH,
    "SDAPI_MODELS_DIR": WEIGHTS_PATH,
    "SDAPI_ALLOW_LOCAL_MODEL_PATHS": "false",  # paths mean nothing inside a container
    "SDAPI_BUILD_TINY_MODELS": "false",
    "SDAPI_DEFAULT_MODEL_ID": os.environ.get("SDAPI_DEFAULT_MODEL_ID", "stable-diffusion-v1-5"),
    "SDAPI_DEFAULT_INPAINT_MODEL_ID": os.environ.get("SDAPI_DEFAULT_INPAINT_MODEL_ID", "stable-diffusion-inpainting"),
    "SDAPI_DEFAULT_MOTION_ADAPTER_ID": "animatediff-motion-adapter-v1-5-2",
    "SDAPI_SYNC_TIMEOUT": "120",
    "SDAPI_CLEANUP_INTERVAL": "0",  # the cron function cleans
    "SDAPI_STORE_PRECISION": "fp16",  # what the GPU worker runs; the downloader that stores it has no GPU
}
# the GPU worker only: the engine's fast path (channels_last, fused QKV, torch.compile of the UNet and
# VAE decoder; see infra/engine/speed.py), one batched pass per job, and a compile cache on the weights
# Volume that the worker commits after a job compiled something new, so later containers do not recompile
GPU_SETTINGS = {
    "SDAPI_FAST_PATH": "true",
    "SDAPI_BATCH_SAMPLES": "true",
    "SDAPI_COMPILE_MODE": os.environ.get("SDAPI_COMPILE_MODE", "reduce-overhead"),
    "SDAPI_COMPILE_CACHE_DIR": f"{WEIGHTS_PATH}/.compile-cache",
}
SOURCE = ("handlers", "models", "infra")
IGNORE = ["**/__pycache__/**", "**/*.pyc"]  # not only .py: infra/engine/configs holds architecture configs

web_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_pyproject(PYPROJECT)
    .env(SETTINGS)
    .add_local_python_source(*SOURCE, ignore=IGNORE)
)
gpu_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_pyproject(PYPROJECT, optional_dependencies=GPU_EXTRAS)
    .env({**SETTINGS, **GPU_SETTINGS})
    .add_local_python_source(*SOURCE, ignore=IGNORE)
)

# --------------------------------------------------------------------------- app, volumes, dicts, secret

app = modal.App(APP_NAME)
weights = modal.Volume.from_name("sd-enterprise-weights", create_if_missing=True)
data = modal.Volume.from_name("sd-enterprise-data", create_if_missing=True)
jobs_dict = modal.Dict.from_name("sd-enterprise-jobs", create_if_missing=True)
inputs_dict = modal.Dict.from_name("sd-enterprise-inputs", create_if_missing=True)
config_dict = modal.Dict.from_name("sd-enterprise-config", create_if_missing=True)
usage_dict = modal.Dict.from_name("sd-enterprise-usage", create_if_missing=True)
secret = modal.Secret.from_name("sd-enterprise-api", required_keys=["SDAPI_API_KEYS"])
VOLUMES = {WEIGHTS_PATH: weights, DATA_PATH: data}


def modal_runtime():
    """The app's runtime on Modal: the same Runtime as locally, with Modal's backends."""
    from infra.runtime import Runtime

    return Runtime.modal(
        jobs=jobs_dict,
        inputs=inputs_dict,
        config=config_dict,
        usage=usage_dict,
        spawn_job=lambda job_id: Worker().run.spawn(job_id),
        spawn_load=lambda request: download_model.spawn(request),
        device_label=f"modal: {GPU}",
        commit_outputs=data.commit,
        reload_outputs=data.reload,
        commit_weights=weights.commit,  # a `loading` manifest the web tier writes is seen by the downloader
        reload_weights=weights.reload,
    )


# --------------------------------------------------------------------------- the GPU worker


@app.cls(
    image=gpu_image,
    gpu=GPU,
    volumes=VOLUMES,
    secrets=[secret],
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    buffer_containers=BUFFER_CONTAINERS,
    scaledown_window=SCALEDOWN_WINDOW,
    timeout=3600,
    enable_memory_snapshot=True,
    experimental_options={"enable_gpu_snapshot": True} if GPU_SNAPSHOT else None,
)
@modal.concurrent(max_inputs=1)  # one job at a time per GPU; autoscaling adds containers
class Worker:
    @modal.enter(snap=True)
    def load_on_cpu(self):
        """Before the snapshot: imports and the default model's weights in CPU memory."""
        from infra.modal_worker import ModalWorker

        self.worker = ModalWorker(modal_runtime(), device="cuda" if GPU_SNAPSHOT else "cpu")
        self.worker.warm()

    @modal.enter(snap=False)
    def move_to_gpu(self):
        """After each restore: the loaded weights move to the GPU (a no-op with a GPU snapshot)."""
        self.worker.move_to("cuda")

    @modal.method()
    def run(self, job_id: int) -> str:
        """Run one job to `success` or `failed`; returns its status."""
        status = self.worker.run(job_id, reload_weights=weights.reload)
        if self.worker.compile_cache_grew():  # kernels compiled for a new shape: keep them for other containers
            weights.commit()
        if self.worker.outdated():  # restart_server / clear_cache asked for fresh containers
            import modal.experimental

            modal.experimental.stop_fetching_inputs()
        return status


# --------------------------------------------------------------------------- model downloads and cleaning


@app.function(image=gpu_image, volumes={WEIGHTS_PATH: weights}, secrets=[secret], timeout=3600)
def download_model(request: dict) -> str:
    """A load_model / load_vae / first-use download: fetch, verify, convert into the Volume, commit."""
    from infra.modal_worker import run_download

    status = run_download(modal_runtime(), request)
    weights.commit()
    return status


@app.function(image=web_image, volumes=VOLUMES, secrets=[secret], schedule=modal.Cron("17 * * * *"))
def clean_caches() -> dict:
    """Hourly: jobs whose worker died (retried or failed), expired outputs, job records past their
    retention, download scratch; usage entries folded into one."""
    runtime = modal_runtime()
    queued, failed = runtime.recover_jobs()
    report = {**runtime.cleaner.clean(), "jobs_requeued": len(queued), "jobs_failed": len(failed),
              "usage_entries_folded": runtime.usage.store.compact()}
    runtime.webhooks.wait_idle(60)
    data.commit()
    weights.commit()
    return report


# --------------------------------------------------------------------------- the web tier


@app.function(image=web_image, volumes=VOLUMES, secrets=[secret], timeout=WEB_TIMEOUT, min_containers=MIN_CONTAINERS)
@modal.concurrent(max_inputs=100)
@modal.asgi_app()
def web():
    from infra.web.api import create_app

    return create_app(modal_runtime())


# --------------------------------------------------------------------------- smoke test


@app.local_entrypoint()
def smoke(key: str, model_id: str = "", prompt: str = "a lighthouse at dusk"):
    """modal run modal_app.py --key <api key>: calls the deployed app's endpoints, prints timings
    (the first call may hit cold containers, the second warm ones)."""
    import time

    import httpx

    base = web.get_web_url()
    body = {"key": key, "prompt": prompt, "width": 512, "height": 512, "num_inference_steps": 20}
    if model_id:
        body["model_id"] = model_id
    for attempt in ("cold", "warm"):
        started = time.time()
        result = httpx.post(f"{base}/api/v1/enterprise/text2img", json=body, timeout=WEB_TIMEOUT).json()
        while result.get("status") == "processing":
            time.sleep(2)
            result = httpx.post(result["fetch_result"], json={"key": key}, timeout=30).json()
        print(f"{attempt}: {result.get('status')} in {time.time() - started:.1f} s -> {result.get('output')}")
    details = httpx.post(f"{base}/api/v1/enterprise/system_details", json={"key": key}, timeout=30).json()
    print("system_details:", details)
