"""The web tier must start without torch: importing every module of handlers, models and
infra.web (and the runtime, and serving a request that needs no engine) must not import torch
or any other package of the engine's extras: the Modal web image installs the base dependencies only.
Nor rembg and what it brings (pymatting, numba, scikit-image): removebg_mask's handler answers on
the web tier, the engine alone imports rembg. onnxruntime is a base dependency (the NSFW detector
runs on it, on the web tier too), imported only when that detector first runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_web_tier_imports_without_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        import handlers, models, infra.web
        for package in (handlers, models, infra.web):  # every module of the web tier
            for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(module.name)
        import infra.runtime
        from fastapi.testclient import TestClient
        from infra.settings import Settings
        from infra.runtime import Runtime
        settings = Settings(data_dir={str(tmp_path)!r}, build_tiny_models=False, fetch_known_models=False)
        app = infra.web.api.create_app(Runtime.local(settings), manage_runtime=False)
        client = TestClient(app)
        assert client.post("/api/v1/enterprise/schedulers_list", json={{"key": "enterprise_api_key"}}).status_code == 200
        assert client.post("/api/v1/enterprise/system_details", json={{"key": "enterprise_api_key"}}).status_code == 200
        import base64, io
        from PIL import Image
        buffer = io.BytesIO(); Image.new("RGB", (32, 32), (9, 9, 9)).save(buffer, format="PNG")
        png = base64.b64encode(buffer.getvalue()).decode()
        # removebg_mask's handler: the image decoded and checked, the model looked up (not loaded here: a 404)
        removebg = client.post("/api/v6/image_editing/removebg_mask",
                               json={{"key": "enterprise_api_key", "image": png, "only_mask": True}})
        assert removebg.status_code == 404 and "background_remover" in removebg.text, removebg.text
        print("ONNX BEFORE THE DETECTOR:", "onnxruntime" in sys.modules)
        # the web tier answers these itself (the NSFW detector is ONNX on the CPU): still no torch
        check = client.post("/api/v1/enterprise/nsfw_image_check", json={{"key": "enterprise_api_key", "init_image": png}})
        assert check.json()["has_nsfw_concept"] == [False], check.text
        upload = client.post("/api/v1/enterprise/upload_image",
                             json={{"key": "enterprise_api_key", "base64_image": png, "image_type": "png"}})
        assert upload.json()["status"] == "success", upload.text
        # the `torch` and `engine` extras of pyproject.toml, by import name: the web image has none of them
        engine = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "scipy", "peft", "tomesd",
                  "spandrel", "torchvision", "imageio_ffmpeg",  # (cv2 comes with nudenet, a base dependency)
                  "rembg", "pymatting", "numba", "skimage")  # removebg_mask's, and what rembg brings
        heavy = sorted(m for m in engine if m in sys.modules)
        print("HEAVY:", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY: []" in result.stdout
    assert "ONNX BEFORE THE DETECTOR: False" in result.stdout
