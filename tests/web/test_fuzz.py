"""Schema fuzzing (schemathesis) and the OpenAPI document as a contract.

- In process: every documented enterprise v1 POST endpoint gets bodies generated from the app's own
  OpenAPI document, valid ones and broken ones, with a valid key so they reach the handlers. Every
  answer must be a documented status with a JSON body in the documented envelope; never a 5xx.
  The fuzzed app records jobs but does not run them, nor model loads (the HTTP surface is what is
  fuzzed); a second test runs fuzzed text2img requests for real, with the sizes clamped small, and
  checks each job ends `success` or `failed`.
- From outside, as a user would: `schemathesis run` with all its checks, on every route of every
  API generation of a live server, and a client built by openapi-python-client from the same
  document making a text2img call.

Bounded and deterministic: a fixed number of examples per endpoint, derandomized, no example
database.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from infra.web.api import ENDPOINTS, PREFIXES
from tests.conftest import KEY, open_client

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPERATIONS = [f"{PREFIXES[0]}/{name}" for name in ENDPOINTS] + [f"{PREFIXES[0]}/fetch/{{request_id}}"]
# examples per endpoint; FUZZ_EXAMPLES=300 (positive; negative a third of it) for a deeper run by hand
_POSITIVE = int(os.environ.get("FUZZ_EXAMPLES", "24"))
EXAMPLES = {GenerationMode.POSITIVE: _POSITIVE, GenerationMode.NEGATIVE: max(1, _POSITIVE * 2 // 5)}
# bodies that are only a key: a few examples say all there is (restart_server and clear_cache cost an
# engine reload each)
KEY_ONLY = {f"{PREFIXES[0]}/{name}" for name, e in ENDPOINTS.items() if e.request.model_fields.keys() <= {"key"}}
JOB_STATUSES = {"success", "processing", "failed"}


def fuzz_settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        derandomize=True,  # the same examples on every run: CI cannot flake on a lucky draw
        database=None,  # no .hypothesis/ example database in the tree
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


@pytest.fixture(scope="module")
def fuzz_env(models_dir, tmp_path_factory):
    """Settings for the fuzzed apps, in the environment: update_server (fuzzed too) reads the
    environment again, and must find the same settings, not the defaults (a 30 s sync wait...)."""
    root = tmp_path_factory.mktemp("fuzz")
    # a copy: delete_model is fuzzed too, and the session's models are shared with other modules
    shutil.copytree(models_dir, root / "models")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # no .env from the checkout
        env = {
            "SDAPI_MODELS_DIR": str(root / "models"),
            "SDAPI_BUILD_TINY_MODELS": "false",
            "SDAPI_FETCH_KNOWN_MODELS": "false",
            "SDAPI_ALLOW_LOCAL_MODEL_PATHS": "false",  # no load_model of "/" from a fuzzed url
            "SDAPI_FETCH_ALLOWLIST": "",  # fuzzed URLs to loopback are refused, as in production
            "SDAPI_IMAGE_FETCH_TIMEOUT": "2",
            "SDAPI_WEBHOOK_ATTEMPTS": "1",
            "SDAPI_WEBHOOK_TIMEOUT": "2",
            "SDAPI_CLEANUP_INTERVAL": "0",
            "SDAPI_SYNC_TIMEOUT": "0",  # generation requests answer `processing` at once
        }
        for name, value in env.items():
            mp.setenv(name, value)
        yield root


@pytest.fixture(scope="module")
def fuzz_client(fuzz_env):
    client = open_client(fuzz_env / "data", fuzz_env / "models", fetch_allowlist=[])
    runtime = client.app.state.runtime
    # jobs and model loads are recorded but never run: a fuzzed 1024x1024, 50-step, 4-sample job
    # would cost minutes of CPU, and a fuzzed `owner/repo` load would go to the Hugging Face Hub
    runtime.dispatcher.submit = lambda job_id: None
    runtime.dispatcher.load = lambda request: None
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def api_schema(fuzz_client):
    return schemathesis.openapi.from_dict(fuzz_client.get("/openapi.json").json())


def send(client, case):
    """The case through the TestClient (the app's lifespan is the fixture's), with a valid key in
    the body when the body is an object and as a Bearer token always."""
    if isinstance(case.body, dict):
        case.body["key"] = KEY
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url), headers={"Authorization": f"Bearer {KEY}"})
    content = kwargs.pop("data", None)
    if "json" not in kwargs and content is not None:
        kwargs["content"] = content if isinstance(content, bytes) else str(content).encode()
    kwargs.pop("cookies", None)
    return client.request(**kwargs)


def check_envelope(case, response) -> dict:
    """No crash; a JSON object in the documented envelope (on top of schemathesis' schema checks)."""
    code = response.status_code
    where = f"{case.operation.path} {code}: {case.body!r:.300} -> {response.text[:500]}"
    assert code < 500, where
    assert response.headers["content-type"].startswith("application/json"), where
    assert "Traceback" not in response.text, where
    body = response.json()
    assert isinstance(body, dict), where
    if code >= 400:
        assert body["status"] == "error", where
        message = body["message"]
        assert message and (isinstance(message, str) or all(isinstance(v, list) for v in message.values())), where
    elif "status" in body:  # nsfw_image_check and schedulers_list answer without one, as the spec shows
        assert body["status"] in JOB_STATUSES | {"ok"}, where
        if body["status"] in JOB_STATUSES and case.operation.path.rsplit("/", 1)[-1] in JOB_ENDPOINTS:
            assert "id" in body, where
    return body


JOB_ENDPOINTS = {"text2img", "img2img", "inpaint", "controlnet", "text2video", "super_resolution"}


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=str)
@pytest.mark.parametrize("path", OPERATIONS)
def test_fuzzed_requests_get_documented_envelopes(fuzz_client, api_schema, path, mode):
    operation = api_schema[path]["POST"]
    seen: dict[int, int] = {}
    examples = min(EXAMPLES[mode], 4) if path in KEY_ONLY else EXAMPLES[mode]

    @fuzz_settings(examples)
    @given(case=operation.as_strategy(mode))
    def run(case):
        response = send(fuzz_client, case)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        check_envelope(case, response)
        case.validate_response(
            response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance]
        )

    run()
    assert sum(seen.values()) > 0
    # the valid key got the requests past authentication
    assert 401 not in seen, seen


def test_the_fuzzed_app_still_answers(fuzz_client):
    result = fuzz_client.post(f"{PREFIXES[0]}/system_details", json={"key": KEY}).json()
    assert result["status"] == "ok"


# --------------------------------------------------------------------------- real generations


def wait_terminal(client, job_id: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (result := client.post(f"{PREFIXES[0]}/fetch", json={"key": KEY, "request_id": job_id}).json())[
        "status"
    ] == "processing":
        assert time.monotonic() < deadline, f"job {job_id} still processing"
        time.sleep(0.1)
    return result


def test_fuzzed_text2img_jobs_end_success_or_failed(fuzz_env, api_schema):
    """Fuzzed text2img bodies run for real (sizes clamped to 64x64, 1 sample, 2 steps): a job ends
    `success` with fetchable outputs or `failed` with a message, never stuck or a 5xx."""
    client = open_client(fuzz_env / "data-gen", fuzz_env / "models", fetch_allowlist=[], sync_timeout=30,
                         cleanup_interval=0, webhook_attempts=1)
    operation = api_schema[f"{PREFIXES[0]}/text2img"]["POST"]
    outcomes: dict[str, int] = {}
    try:

        @fuzz_settings(max(12, _POSITIVE // 2))
        @given(case=operation.as_strategy(GenerationMode.POSITIVE))
        def run(case):
            case.body.update(width=64, height=64, samples=1, num_inference_steps=2, steps=2, webhook=None,
                             highres_fix="no", upscale="no", temp="no")
            response = send(client, case)
            body = check_envelope(case, response)
            case.validate_response(response, checks=[status_code_conformance, response_schema_conformance])
            if response.status_code >= 400:
                outcomes["rejected"] = outcomes.get("rejected", 0) + 1
                return
            if body["status"] == "processing":
                body = wait_terminal(client, body["id"])
            outcomes[body["status"]] = outcomes.get(body["status"], 0) + 1
            if body["status"] == "failed":
                assert body["message"] and body["message"] != "Failed, Try Again", body
            else:
                assert body["status"] == "success", body
                for link in body["output"]:
                    assert client.get(link).status_code == 200, link

        run()
    finally:
        client.__exit__(None, None, None)
    assert outcomes.get("success", 0) > 0, outcomes


def test_the_documented_error_statuses_cover_what_the_api_answers(api_schema):
    """Every status an ApiError subclass carries is documented on every route."""
    from models import errors

    codes = {cls.status_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.ApiError)}
    raw = api_schema.raw_schema
    for path in OPERATIONS:
        documented = {int(code) for code in raw["paths"][path]["post"]["responses"]}
        assert codes | {200, 422} <= documented, (path, sorted(codes - documented))


def test_fetch_by_path_documents_its_path_parameter(api_schema):
    parameters = api_schema.raw_schema["paths"][f"{PREFIXES[0]}/fetch/{{request_id}}"]["post"]["parameters"]
    assert [(p["name"], p["in"]) for p in parameters] == [("request_id", "path")]


def test_the_schema_says_what_the_api_takes_of_bodies_and_required_fields(fuzz_client, api_schema):
    """Two of schemathesis' conformance checks (schema-violating bodies accepted, schema-valid ones
    rejected), held here: a key-only endpoint takes no body at all when the key is a header, and the
    schema says so; a required field can be neither null nor blank, since both mean "not set"."""
    raw = api_schema.raw_schema
    system_details = raw["paths"][f"{PREFIXES[0]}/system_details"]["post"]["requestBody"]
    assert system_details["required"] is False
    no_body = fuzz_client.post(f"{PREFIXES[0]}/system_details", headers={"Authorization": f"Bearer {KEY}"})
    assert no_body.status_code == 200 and no_body.json()["status"] == "ok"
    assert raw["paths"][f"{PREFIXES[0]}/text2img"]["post"]["requestBody"]["required"] is True
    model_id = raw["components"]["schemas"]["ModelIdRequest"]["properties"]["model_id"]
    assert {"type": "null"} not in model_id["anyOf"]
    strings = [option for option in model_id["anyOf"] if option.get("type") == "string"]
    assert strings and all(option["pattern"] == r"[^ \t\r\n]" for option in strings)
    blank = fuzz_client.post(f"{PREFIXES[0]}/verify_model", json={"key": KEY, "model_id": " "})
    assert blank.status_code == 422  # what the schema now forbids, the API refuses


# --------------------------------------------------------------------------- schemathesis, as a user runs it

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_EXAMPLES = int(os.environ.get("CONFORMANCE_EXAMPLES", "4"))


# the routes whose body another route has (v6 and v3 take v1's bodies, the families' routes v1's,
# v7's inpaint its image-to-image's): in CI the coverage phase skips them (the fuzzing phase runs
# on every route);
# CONFORMANCE_FULL=1 runs it on every route, as `schemathesis run` with schemathesis.toml does
COVERAGE_TWINS = ("^/api/v6/|^/api/v7/images/inpaint$|^/api/v3/|^/api/v1/enterprise/(video|image_editing|super_resolution)/")


@pytest.fixture(scope="module")
def live_server(fuzz_env):
    """The API in a server process of its own on a loopback port, its jobs run by the stand-in
    engine (tests/web/standin_server.py), with fuzz_env's settings."""
    from tests.conftest import ServerProcess

    server = ServerProcess(fuzz_env / "data-live", fuzz_env / "models", command=("-m", "tests.web.standin_server"))
    yield server.base
    server.stop()


@pytest.mark.slow
def test_schemathesis_with_all_checks_passes_on_every_route(live_server, tmp_path):
    """`schemathesis run` on the live server's OpenAPI document: every route of every API
    generation (v1 and its families, v6, v7, v3, OpenAI), the coverage and fuzzing phases, all of
    schemathesis' checks (a schema-valid body accepted, a schema-violating one refused, documented
    statuses, content types and bodies, `Allow` on a 405, ...), with the repository's
    schemathesis.toml. Bounded for CI: a few fuzzed examples per route, the coverage phase on each
    distinct body (COVERAGE_TWINS); CONFORMANCE_EXAMPLES=100 CONFORMANCE_FULL=1 for the whole run."""
    config = (ROOT / "schemathesis.toml").read_text()
    if not os.environ.get("CONFORMANCE_FULL"):
        config += f"\n[[operations]]\ninclude-path-regex = '{COVERAGE_TWINS}'\nphases.coverage.enabled = false\n"
    (tmp_path / "schemathesis.toml").write_text(config)
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(tmp_path / "schemathesis.toml"),
               "run", f"{live_server}/openapi.json", "--phases=coverage,fuzzing", "--checks", "all",
               "--max-examples", str(CONFORMANCE_EXAMPLES), "--generation-deterministic", "--no-shrink",
               "--workers", "1", "--request-timeout", "30", "--no-color",
               "-H", f"Authorization: Bearer {KEY}", "--report-dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)
    summary = run.stdout[run.stdout.rfind("SUMMARY"):]
    assert run.returncode == 0, f"{tmp_path / 'schemathesis.txt'}:\n{run.stdout[-15000:]}{run.stderr[-2000:]}"
    tested = re.search(r"Tested: (\d+)", summary)
    operations = sum(len(methods) for methods in httpx.get(f"{live_server}/openapi.json").json()["paths"].values())
    assert tested and int(tested.group(1)) == operations, summary  # every route, every method


# --------------------------------------------------------------------------- a client generated from the document


def test_a_client_generated_by_openapi_python_client_makes_a_text2img_call(live_server, tmp_path):
    """openapi-python-client, a standard generator, builds a Python client from the live server's
    OpenAPI document with no warning; the package compiles, and its own text2img and fetch
    functions, unchanged, start a job and read its result with typed models."""
    import compileall
    import importlib

    (tmp_path / "openapi.json").write_bytes(httpx.get(f"{live_server}/openapi.json").content)
    (tmp_path / "config.yaml").write_text("post_hooks: []\npackage_name_override: sdapi_client\n")
    generate = subprocess.run(
        [str(Path(sys.executable).parent / "openapi-python-client"), "generate", "--path", "openapi.json",
         "--output-path", "client", "--config", "config.yaml", "--fail-on-warning"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert generate.returncode == 0, generate.stdout[-5000:] + generate.stderr[-2000:]
    package = tmp_path / "client" / "sdapi_client"
    assert compileall.compile_dir(package, quiet=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path / "client"))
        client_module = importlib.import_module("sdapi_client")
        text2img = importlib.import_module("sdapi_client.api.enterprise_v_1.text2img")
        fetch_by_path = importlib.import_module("sdapi_client.api.enterprise_v_1.fetch_by_path")
        models = importlib.import_module("sdapi_client.models")

        client = client_module.AuthenticatedClient(base_url=live_server, token=KEY)
        answer = text2img.sync(client=client, body=models.Text2ImgRequest(
            prompt="a red cube on a table", width=64, height=64, samples=2, num_inference_steps=2, seed=7))
        assert isinstance(answer, models.ProcessingResponse | models.SuccessResponse), answer
        deadline = time.monotonic() + 60
        while isinstance(answer, models.ProcessingResponse):
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)
            answer = fetch_by_path.sync(answer.id, client=client)
        assert isinstance(answer, models.SuccessResponse), answer
        assert len(answer.output) == 2
        meta = answer.meta.to_dict()  # (meta is a free-form object in the schema, as the docs show it)
        assert meta["seed"] == 7 and meta["W"] == 64, meta
        for link in answer.output:
            assert httpx.get(link).headers["content-type"] == "image/png"
        # an error answer is the generated ErrorResponse model, not an exception
        refused = text2img.sync(client=client, body=models.Text2ImgRequest(prompt="x", width=4096))
        assert isinstance(refused, models.ErrorResponse) and "width" in str(refused.message.to_dict())
        for name in [name for name in sys.modules if name.startswith("sdapi_client")]:
            del sys.modules[name]


def test_every_constraint_in_the_document_is_json_schema(api_schema):
    """pydantic writes a constraint it cannot place (behind a BeforeValidator) under its own name,
    `ge` / `le`, which no client or fuzzer reads as a bound: the document has none of those."""

    def keys(node):
        if isinstance(node, dict):
            yield from node
            for value in node.values():
                yield from keys(value)
        elif isinstance(node, list):
            for value in node:
                yield from keys(value)

    assert not {"ge", "le", "gt", "lt", "min_length", "max_length"} & set(keys(api_schema.raw_schema["components"]))
