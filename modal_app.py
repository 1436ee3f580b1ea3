"""Deploy the API to Modal:  modal deploy modal_app.py

Preview deployment: ONE GPU container serves the same FastAPI app as the local server, with
its in-process worker, the weights on a Volume and the jobs database on the container's disk.
That is why it is capped at one container. The scalable shape (CPU web tier + autoscaling GPU
worker class + modal.Dict jobs + scheduled cache cleaner) replaces this file in the Modal issue.

Before the first deploy, create the API keys secret:
    modal secret create sd-enterprise-api SDAPI_API_KEYS=<your-key>[,<another-key>]
"""

from __future__ import annotations

import os

import modal

APP_NAME = "sd-enterprise-api"
GPU = os.environ.get("SDAPI_MODAL_GPU", "A100-80GB")
WEIGHTS_PATH = "/weights"

image = (
    modal.Image.debian_slim(python_version="3.11")
    # on Linux, PyPI's torch wheel is the CUDA build; the local CPU pin is kept apart in pyproject's `cpu` extra
    .pip_install("torch==2.13.0", "torchvision==0.28.0")
    .pip_install(
        "diffusers==0.42.1",
        "transformers==5.23.0",
        "accelerate==1.15.0",
        "safetensors==0.8.0",
        "scipy==1.17.1",
        "numpy==2.4.6",
        "peft==0.21.2",
        "tomesd==0.1.3",
        "opencv-python-headless==5.0.0.93",
        "spandrel==0.4.2",
        "imageio-ffmpeg==0.8.1",
        "nudenet==3.4.2",
        "onnxruntime==1.32.0",
        "fastapi==0.165.0",
        "pydantic>=2.10,<3",
        "pydantic-settings>=2.6,<3",
        "httpx==0.28.1",
        "pillow==13.0.0",
    )
    # load_model reaches the hub and model URLs from here; local paths mean nothing in a container
    # text2video's default adapter is the real AnimateDiff one, fetched into the Volume on first use
    .env({"SDAPI_DATA_DIR": "/tmp/sdapi", "SDAPI_MODELS_DIR": WEIGHTS_PATH, "SDAPI_ALLOW_LOCAL_MODEL_PATHS": "false",
          "SDAPI_DEFAULT_MOTION_ADAPTER_ID": "animatediff-motion-adapter-v1-5-2"})
    # not only .py files: infra/engine/configs holds the architecture configs single-file loading needs
    .add_local_python_source("handlers", "models", "infra", ignore=["**/__pycache__/**", "**/*.pyc"])
)

weights = modal.Volume.from_name("sd-enterprise-weights", create_if_missing=True)
app = modal.App(APP_NAME)


@app.function(
    image=image,
    gpu=GPU,
    volumes={WEIGHTS_PATH: weights},
    secrets=[modal.Secret.from_name("sd-enterprise-api", required_keys=["SDAPI_API_KEYS"])],
    max_containers=1,  # jobs live in this container's SQLite file (see the module docstring)
    scaledown_window=300,
    timeout=3600,
)
@modal.concurrent(max_inputs=32)
@modal.asgi_app()
def api():
    from infra.api import create_app
    from infra.runtime import Runtime

    return create_app(Runtime.local())
