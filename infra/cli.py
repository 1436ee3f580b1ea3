"""`python -m infra.cli serve`: the local API with the built-in model (builds it on first start)."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from infra.runtime import Runtime
from infra.settings import DEV_API_KEY, Settings
from infra.web.api import create_app


def serve() -> None:
    settings = Settings()
    runtime = Runtime.local(settings)
    base = settings.public_url or f"http://{settings.host}:{settings.port}"
    key = settings.api_keys[0]

    def banner() -> None:
        print(f"\nStable Diffusion Enterprise API ready at {base}  (docs: {base}/docs)", flush=True)
        print(f"Playground and console (admin keys): {base}/", flush=True)
        if key == DEV_API_KEY:
            print(f"API key: {key}  (development key; set SDAPI_API_KEYS to your own)", flush=True)
        print(
            "Try it:\n"
            f"  curl -s -X POST {base}/api/v1/enterprise/text2img -H 'Content-Type: application/json' "
            f"-d '{{\"key\": \"{key}\", \"prompt\": \"a cat sitting on a bench\", \"width\": \"256\", "
            f"\"height\": \"256\", \"samples\": \"1\", \"num_inference_steps\": \"20\", \"seed\": 42}}'\n",
            flush=True,
        )

    if key == DEV_API_KEY and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("serving on %s with the public development key: set SDAPI_API_KEYS", settings.host)
    uvicorn.run(create_app(runtime, on_started=banner), host=settings.host, port=settings.port, log_level="info")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m infra.cli")
    parser.add_argument("command", choices=["serve"])
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve()


if __name__ == "__main__":
    main()
