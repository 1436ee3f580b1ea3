"""The web tier must start without torch: importing every module of handlers, models and
infra.web (and the runtime, and serving a request that needs no engine) must not import torch
or any other package of the engine's extras: the Modal web image installs the base dependencies only."""

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
        settings = Settings(data_dir={str(tmp_path)!r}, build_tiny_models=False)
        app = infra.web.api.create_app(Runtime.local(settings), manage_runtime=False)
        client = TestClient(app)
        assert client.post("/api/v1/enterprise/schedulers_list", json={{"key": "enterprise_api_key"}}).status_code == 200
        assert client.post("/api/v1/enterprise/system_details", json={{"key": "enterprise_api_key"}}).status_code == 200
        # the web tier answers these itself (the NSFW detector is ONNX on the CPU): still no torch
        import base64, io
        from PIL import Image
        buffer = io.BytesIO(); Image.new("RGB", (32, 32), (9, 9, 9)).save(buffer, format="PNG")
        png = base64.b64encode(buffer.getvalue()).decode()
        check = client.post("/api/v1/enterprise/nsfw_image_check", json={{"key": "enterprise_api_key", "init_image": png}})
        assert check.json()["has_nsfw_concept"] == [False], check.text
        upload = client.post("/api/v1/enterprise/upload_image",
                             json={{"key": "enterprise_api_key", "base64_image": png, "image_type": "png"}})
        assert upload.json()["status"] == "success", upload.text
        # the `torch` and `engine` extras of pyproject.toml, by import name: the web image has none of them
        engine = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "scipy", "peft", "tomesd",
                  "spandrel", "torchvision", "imageio_ffmpeg")  # (cv2 comes with nudenet, a base dependency)
        heavy = sorted(m for m in engine if m in sys.modules)
        print("HEAVY:", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY: []" in result.stdout
