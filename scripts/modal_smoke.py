"""Smoke test of the deployed app:  python scripts/modal_smoke.py --key <api key>

Finds the `web` function of the deployed app by name (`modal.Function.from_name`: the deployment
itself, with its real Dicts and Volumes; `modal run` would start an ephemeral copy instead), then
through its public URL: asks system_details, generates one small text2img on the default model
(a cold GPU start and, on a fresh deployment, the default model's download included), waits for it
with `fetch`, and downloads the image. Prints one JSON line of figures; exits 1 with the reason when
a step fails.

--url skips the lookup (a proxy in front of the app, or a `modal serve` URL).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import httpx

APP_NAME = "sd-enterprise-api"  # modal_app.APP_NAME (not imported: that would need the deploy settings)
API = "/api/v1/enterprise"


class SmokeFailed(Exception):
    pass


def web_url(app_name: str) -> str:
    import modal

    return modal.Function.from_name(app_name, "web").get_web_url()


def smoke(client: httpx.Client, key: str, timeout: float = 900.0, size: int = 512) -> dict:
    """The checks, through `client` (its base_url the app's). Their figures."""
    started = time.monotonic()

    def post(endpoint: str, **body) -> dict:
        response = client.post(f"{API}/{endpoint}", json={"key": key, **body}, timeout=180)
        try:
            answer = response.json()
        except ValueError:
            raise SmokeFailed(f"{endpoint}: HTTP {response.status_code}, not JSON: {response.text[:200]}") from None
        if response.status_code != 200 or answer.get("status") in ("error", "failed"):
            raise SmokeFailed(f"{endpoint}: HTTP {response.status_code}: {json.dumps(answer)[:500]}")
        return answer

    # 1. the web tier answers and knows the key
    details = post("system_details")
    # 2. one image on the default model, waited for with fetch
    job = post("text2img", prompt="a lighthouse on a cliff at dawn", width=size, height=size, samples=1,
               num_inference_steps=20, seed=1)
    answered_s = time.monotonic() - started
    while job["status"] == "processing":
        if time.monotonic() - started > timeout:
            raise SmokeFailed(f"job {job.get('id')} still processing after {timeout:.0f} s")
        time.sleep(min(max(float(job.get("eta") or 5), 2), 15))
        job = post("fetch", request_id=job["id"])
    if job["status"] != "success" or not job.get("output"):
        raise SmokeFailed(f"job {job.get('id')}: {json.dumps(job)[:500]}")
    # 3. the image itself
    image = client.get(job["output"][0], timeout=120)
    if image.status_code != 200:
        raise SmokeFailed(f"the output link answered HTTP {image.status_code}: {job['output'][0]}")
    from PIL import Image

    with Image.open(io.BytesIO(image.content)) as decoded:
        got = decoded.size
    if got != (size, size):
        raise SmokeFailed(f"the image is {got[0]}x{got[1]}, not {size}x{size}")
    return {"ok": True, "job_id": job["id"], "first_answer_s": round(answered_s, 1),
            "image_s": round(time.monotonic() - started, 1), "generation_time_s": job.get("generationTime"),
            "image_bytes": len(image.content), "device": details.get("device") or details.get("gpu")}


def main(argv: list[str] | None = None, transport: httpx.BaseTransport | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", required=True, help="an API key of the deployment (SDAPI_API_KEYS)")
    parser.add_argument("--app", default=APP_NAME, help=f"the deployed app's name (default {APP_NAME})")
    parser.add_argument("--url", help="the web tier's URL (default: looked up from the deployed app)")
    parser.add_argument("--size", type=int, default=512, help="width and height of the test image")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the image")
    args = parser.parse_args(argv)
    url = args.url or web_url(args.app)
    try:
        with httpx.Client(base_url=url, transport=transport, follow_redirects=True) as client:
            figures = smoke(client, args.key, timeout=args.timeout, size=args.size)
    except (SmokeFailed, httpx.HTTPError) as exc:
        print(json.dumps({"ok": False, "url": url, "error": str(exc)}))
        return 1
    print(json.dumps({**figures, "url": url}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
