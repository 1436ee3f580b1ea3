"""The deployment under Modal's real semantics (issue 16), each through the stand-in
(tests/modal/cloud.py) running modal_app's own classes and functions: re-delivered inputs,
snapshots and restarts, deploy-time settings, Volume views and reloads, Dict expiry, downloads
that do not hold a GPU, webhooks off the GPU, and a fresh deployment's first image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import KEY
from tests.modal.cloud import Crash, Preempted
from tests.modal.conftest import FileServer, post, t2i, wait_done

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]
DAY = 24 * 3600


def crash_engine_runs(monkeypatch, exception: type[BaseException], times: int) -> list[str]:
    """The GPU engine raises `exception` (the container dies) on its first `times` jobs."""
    from infra.engine.engine import DiffusersEngine

    real, runs = DiffusersEngine.run, []

    def run(self, params, inputs, progress=None):
        runs.append("run")
        if len(runs) <= times:
            raise exception()
        return real(self, params, inputs, progress)

    monkeypatch.setattr(DiffusersEngine, "run", run)
    return runs


# --------------------------------------------------------------------------- 1. re-delivery



@pytest.mark.parametrize("death", [Crash, Preempted])
def test_a_job_whose_container_died_is_run_by_the_redelivered_input(cloud, monkeypatch, death):
    crash_engine_runs(monkeypatch, death, times=1)
    job = post(cloud, "text2img", **t2i(instant_response="yes"))
    done = wait_done(cloud, job["id"], timeout=60)
    assert done["status"] == "success", done
    workers = cloud.containers("Worker")
    assert len(workers) == 2 and workers[0].inputs == workers[1].inputs  # the same input, on a fresh container



def test_a_job_whose_containers_keep_dying_ends_failed_once_its_attempts_are_used(deploy, monkeypatch):
    cloud = deploy(secret={"SDAPI_JOB_ATTEMPTS": 2})
    crash_engine_runs(monkeypatch, Crash, times=10)
    job = post(cloud, "text2img", **t2i(instant_response="yes"))
    done = wait_done(cloud, job["id"], timeout=60)
    assert done["status"] == "failed" and "2" in done["message"], done



def test_a_job_whose_call_failed_says_so_on_fetch(deploy, monkeypatch):
    cloud = deploy(redeliveries=0)  # Modal gives up on the input after its container died once
    crash_engine_runs(monkeypatch, Crash, times=10)
    job = post(cloud, "text2img", **t2i(instant_response="yes"))
    cloud.service("Worker").drain()
    done = post(cloud, "fetch", request_id=job["id"])
    assert done["status"] == "failed" and "worker" in done["message"].lower(), done



def test_a_job_whose_spawn_was_lost_runs_within_minutes(cloud, monkeypatch):
    import modal_app

    worker = modal_app.Worker
    monkeypatch.setattr(modal_app, "Worker", type("Lost", (), {"__call__": lambda self: type("I", (), {
        "run": type("M", (), {"spawn": staticmethod(lambda job_id: None)})})()})())  # the web container died first
    job = post(cloud, "text2img", **t2i(instant_response="yes"))
    monkeypatch.setattr(modal_app, "Worker", worker)
    name, period = _recovery(cloud)
    assert period <= 300  # the recovery pass runs every few minutes
    cloud.clock.advance(period)
    cloud.run(name)
    assert wait_done(cloud, job["id"], timeout=60)["status"] == "success"


# --------------------------------------------------------------------------- 2. restarts and snapshots



def test_after_a_restart_a_restored_container_keeps_serving_jobs(cloud):
    assert post(cloud, "text2img", **t2i())["status"] == "success"  # the first container takes the snapshot
    assert post(cloud, "restart_server")["status"] == "success"
    for _ in range(3):
        assert post(cloud, "text2img", **t2i())["status"] == "success"
    workers = cloud.containers("Worker")
    assert len(workers) == 2, [w.inputs for w in workers]  # the old one retired; one restored container took the rest
    assert workers[1].restored and len(workers[1].inputs) == 3


# --------------------------------------------------------------------------- 3. deploy-time choices


def _import_modal_app(env: dict[str, str], expression: str):
    script = f"import json, modal_app; print(json.dumps({expression}))"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SDAPI_", "MODAL_"))}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**base, **env, "HOME": "/nonexistent"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])



def test_deploy_time_settings_reach_the_container():
    deploying_shell = {"SDAPI_MODAL_GPU": "H100", "SDAPI_MODAL_GPU_SNAPSHOT": "true", "SDAPI_MODAL_MAX_CONTAINERS": "4"}
    baked = _import_modal_app(deploying_shell, "modal_app.GPU_ENV")
    # inside the container only the image's environment exists: modal_app reads the same choices there
    seen = _import_modal_app(baked, "[modal_app.GPU, modal_app.GPU_SNAPSHOT, modal_app.MAX_CONTAINERS]")
    assert seen == ["H100", True, 4]



def test_the_cpu_snapshot_holds_the_default_model_as_the_gpu_runs_it(cloud):
    import torch

    held = {}
    cloud.on_snapshot = lambda obj: held.update(dtype=obj.worker.engine.cache.model("tiny-sd").pipeline.unet.dtype)
    assert post(cloud, "text2img", **t2i())["status"] == "success"
    assert held["dtype"] == torch.float16  # not fp32 to be cast on every restore


def test_with_the_gpu_snapshot_the_snapshot_hook_loads_onto_the_gpu(cloud, monkeypatch):
    import modal_app

    monkeypatch.setattr(modal_app, "GPU_SNAPSHOT", True)
    assert post(cloud, "text2img", **t2i())["status"] == "success"
    assert cloud.device_requests[0] == "cuda"  # the snap=True hook's engine


# --------------------------------------------------------------------------- 5. Volumes



def test_a_worker_that_cannot_reload_the_weights_still_ends_its_job(deploy, tmp_path):
    cloud = deploy(secret={"SDAPI_ALLOW_LOCAL_MODEL_PATHS": "true"})
    assert post(cloud, "text2img", **t2i())["status"] == "success"  # a worker container is up
    worker = cloud.containers("Worker")[0]
    # a LoRA is loaded by the downloader and committed; the worker's view does not show it yet
    from tests.model_files import write_lora

    lora = write_lora(cloud.volumes["weights"].server / "tiny-sd", tmp_path / "style.safetensors")
    assert post(cloud, "load_model_v2", url=str(lora), model_id="style", model_category="lora",
                model_format="safetensors")["status"] == "success"
    _wait_ready(cloud, "style")
    view = cloud.volumes["weights"].view(worker)
    with open(next(view.rglob("*.safetensors")), "rb"):  # a file held open: reload() fails in that container
        done = post(cloud, "text2img", **t2i(lora_model="style"))
        done = wait_done(cloud, done["id"]) if done["status"] == "processing" else done
    assert done["status"] in ("success", "failed"), done  # ended, not stuck
    assert done["status"] == "success" or "style" in done["message"]



def test_the_web_tier_never_answers_500_when_a_reload_is_blocked(cloud):
    done = post(cloud, "text2img", **t2i())
    link = done["output"][0].removeprefix("https://web.modal.run")
    web = cloud.web_containers[0]
    view = cloud.volumes["data"].view(web.container)
    first = cloud.web_request("GET", link)  # committed by the worker: the web view reloads to find it
    assert first.status_code == 200
    second = post(cloud, "text2img", **t2i())["output"][0].removeprefix("https://web.modal.run")
    with open(next(view.rglob("*.png")), "rb"):  # an output still being streamed
        blocked = cloud.web_request("GET", second)
    assert blocked.status_code != 500
    assert cloud.web_request("GET", second).status_code == 200



def test_the_compile_cache_has_a_volume_of_its_own():
    import modal_app

    mounts = modal_app.WORKER_OPTIONS["volumes"]
    cache_dir = modal_app.GPU_ENV["SDAPI_COMPILE_CACHE_DIR"]
    mount = next(path for path in mounts if cache_dir == path or cache_dir.startswith(path + "/"))
    assert mounts[mount] is not modal_app.weights and mounts[mount] is not modal_app.data


# --------------------------------------------------------------------------- 6. expiry



def test_nothing_an_operator_relies_on_expires_in_8_idle_days(deploy, moto_endpoint):
    import boto3

    import modal_app

    cloud = deploy(secret={"SDAPI_JOB_RETENTION_SECONDS": 30 * DAY, "SDAPI_FETCH_ALLOWLIST": "127.0.0.1,localhost"})
    admin = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="a",
                         aws_secret_access_key="a")
    admin.create_bucket(Bucket="outputs")
    s3 = {"public_url": f"{moto_endpoint}/outputs/", "region_name": "us-east-1", "endpoint_url": f"{moto_endpoint}/outputs",
          "aws_access_key_id": "a", "aws_secret_access_key": "a", "image_directory": "g"}
    assert post(cloud, "update_s3", **s3)["status"] == "success"
    job = post(cloud, "text2img", **t2i())
    assert job["status"] == "success"
    assert post(cloud, "restart_server")["status"] == "success"
    generation = modal_app.config_dict.get("__generation__")
    for _ in range(8):  # eight idle days; the scheduled functions run (at least) once a day
        cloud.clock.advance(DAY)
        for scheduled in _all_scheduled(cloud):
            cloud.run(scheduled)
    assert post(cloud, "system_details")["storage"]["bucket"] == "outputs"
    assert modal_app.config_dict.get("__generation__") == generation
    assert post(cloud, "fetch", request_id=job["id"])["status"] == "success"  # within the 30-day retention
    usage = post(cloud, "usage", by_day="no", start_date="2000-01-01", end_date="2100-01-01")
    assert usage["keys"] and usage["keys"][0]["total"]["jobs_succeeded"] >= 1


# --------------------------------------------------------------------------- 7. outputs at scale


def test_outputs_go_to_the_secrets_bucket_and_a_volume_default_says_its_file_cap(deploy, moto_endpoint):
    import boto3

    on_volume = deploy()
    assert post(on_volume, "text2img", **t2i())["status"] == "success"
    storage = post(on_volume, "system_details")["storage"]
    assert storage["kind"] == "local" and "500,000" in storage["warning"] and "SDAPI_S3_CONFIG" in storage["warning"]
    assert on_volume.volumes["data"].file_count() >= 1  # the image is a file on the Volume
    admin = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="a",
                         aws_secret_access_key="a")
    admin.create_bucket(Bucket="production")
    bucket = {"public_url": f"{moto_endpoint}/production/", "region_name": "us-east-1",
              "endpoint_url": f"{moto_endpoint}/production", "aws_access_key_id": "a", "aws_secret_access_key": "a",
              "image_directory": "g"}
    production = deploy(secret={"SDAPI_S3_CONFIG": json.dumps(bucket)})
    done = post(production, "text2img", **t2i(samples=2))
    assert done["status"] == "success" and all(link.startswith(moto_endpoint) for link in done["output"])
    assert production.volumes["data"].file_count() == 0  # nothing on the Volume: no file cap to reach
    assert len(admin.list_objects_v2(Bucket="production")["Contents"]) == 2
    assert "warning" not in post(production, "system_details")["storage"]


# --------------------------------------------------------------------------- 8. GPUs do not wait



def test_a_job_waiting_for_a_download_holds_no_gpu(deploy, tmp_path):
    from infra.engine import LOAD_LOCK
    from tests.upscaler_files import write_esrgan

    with LOAD_LOCK:
        write_esrgan(tmp_path / "x2.pth", scale=2)
    files = FileServer({"x2.pth": tmp_path / "x2.pth"})
    files.gate.clear()  # the download hangs until the test lets it go
    try:
        cloud = deploy(secret={"SDAPI_FETCH_KNOWN_MODELS": "true",
                               "SDAPI_KNOWN_MODEL_URLS": json.dumps({"RealESRGAN_x2plus": f"{files.url}/x2.pth"})})
        job = post(cloud, "text2img", **t2i(upscale="yes", instant_response="yes"))
        deadline = time.monotonic() + 30
        while not files.requests:
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        time.sleep(0.5)
        assert all(c.current_input is None for c in cloud.containers("Worker"))  # no GPU polls for the model
        files.gate.set()
        done = wait_done(cloud, job["id"], timeout=120)
        assert done["status"] == "success", done
    finally:
        files.close()



def test_webhooks_are_delivered_off_the_gpu(cloud, receivers):
    slow = receivers(default=(200, {}, 20.0))  # the receiver takes its time
    job = post(cloud, "text2img", **t2i(webhook=slow.url, instant_response="yes"))
    deadline = time.monotonic() + 60
    while not slow.requests:
        assert time.monotonic() < deadline, "the webhook was never sent"
        time.sleep(0.05)
    assert all(c.current_input is None for c in cloud.containers("Worker"))  # the GPU is free meanwhile
    assert job["id"] == json.loads(slow.requests[0].body)["id"]


# --------------------------------------------------------------------------- 9, 10. settings, smoke, warnings



def test_the_deployment_sets_what_a_modal_expert_would():
    info = _import_modal_app({}, "{name: [f.info().startup_timeout, f.info().timeout, f.info().memory_mib, f.info().cpu] "
                                 "for name, f in [('worker', modal_app.Worker._get_class_service_function())] + "
                                 "[(n, getattr(modal_app, n)) for n in modal_app.FUNCTIONS]}")
    startup, timeout, memory, cpu = info["worker"]
    assert startup and startup < timeout  # a hung start is not billed for the whole job timeout
    for name, (_, _, memory, cpu) in info.items():
        assert memory and cpu, name
    web_min = _import_modal_app({"SDAPI_MODAL_WEB_MIN_CONTAINERS": "2"}, "[modal_app.WEB_MIN_CONTAINERS, modal_app.MIN_CONTAINERS]")
    assert web_min == [2, 0]  # the web tier and the GPU tier are kept warm separately


def test_importing_modal_app_raises_no_deprecation():
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SDAPI_", "MODAL_"))}
    done = subprocess.run([sys.executable, "-W", "error", "-c", "import modal_app"], cwd=ROOT,
                          env={**base, "HOME": "/nonexistent"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr



def test_the_smoke_check_runs_an_image_through_the_deployed_app_found_by_name(cloud, monkeypatch, capsys):
    import httpx
    import modal

    source = (ROOT / "modal_app.py").read_text()
    assert "local_entrypoint" not in source  # `modal run` would run an ephemeral copy on the production state
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import modal_smoke
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    looked_up = []

    class Deployed:  # what modal.Function.from_name returns for the deployed `web`
        def get_web_url(self):
            return "https://web.modal.run"

    monkeypatch.setattr(modal.Function, "from_name", lambda app, name, **kw: looked_up.append((app, name)) or Deployed())

    class ThroughTheWebTier(httpx.BaseTransport):
        def handle_request(self, request):
            answer = cloud.web_request(request.method, request.url.raw_path.decode(), content=request.content,
                                       headers=dict(request.headers))
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    assert modal_smoke.main(["--key", KEY, "--size", "64"], transport=ThroughTheWebTier()) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert looked_up == [("sd-enterprise-api", "web")] and figures["ok"] and figures["image_bytes"] > 0
    # a failing step says which, and exits 1
    assert modal_smoke.main(["--key", "not-a-key", "--size", "64"], transport=ThroughTheWebTier()) == 1
    failed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert failed["ok"] is False and "system_details" in failed["error"]


# --------------------------------------------------------------------------- 11. first deploy, first image



def test_a_fresh_deployment_fetches_its_default_model_before_its_first_image(deploy, models_dir, tmp_path):
    from tests.model_files import write_single_file_checkpoint

    checkpoint = write_single_file_checkpoint(models_dir / "tiny-sd", tmp_path / "tiny.safetensors")
    files = FileServer({"tiny.safetensors": checkpoint})
    try:
        cloud = deploy(seed_models=False, secret={"SDAPI_DEFAULT_MODEL_ID": "sd-default",
                                                  "SDAPI_DEFAULT_MODEL_SOURCE": f"{files.url}/tiny.safetensors"})
        job = post(cloud, "text2img", **t2i(instant_response="yes"))
        assert job["status"] == "processing", job
        done = wait_done(cloud, job["id"], timeout=180)
        assert done["status"] == "success", done
        assert cloud.containers("download_model")  # the CPU downloader fetched it, not a GPU container
    finally:
        files.close()


# --------------------------------------------------------------------------- helpers


def _wait_ready(cloud, model_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while post(cloud, "verify_model", model_id=model_id)["status"] == "processing":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _all_scheduled(cloud) -> list[str]:
    return list(cloud.schedules)


def _recovery(cloud) -> tuple[str, float]:
    """The scheduled function that recovers jobs, and the seconds between its runs."""
    name = next((name for name in cloud.schedules if "job" in name), None)
    assert name is not None, f"no scheduled function recovers jobs: {cloud.schedules}"
    return name, cloud.schedules[name]
