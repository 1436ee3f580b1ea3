"""Every endpoint answers under every prefix and alias: auth first, then body validation, and
always the ModelsLab error envelope."""

from __future__ import annotations

import pytest

from infra.web.api import ALIASES, ENDPOINTS, PREFIXES
from tests.conftest import KEY

NAMES = [*ENDPOINTS, *ALIASES, "fetch/12345678"]
ROUTES = [(f"{prefix}/{name}", name) for prefix in PREFIXES for name in NAMES]
PATHS = [path for path, _ in ROUTES]


def required_fields(name: str) -> set[str]:
    if name.startswith("fetch/"):
        return set()  # the id is in the path
    model = ENDPOINTS[ALIASES.get(name, name)].request
    return {n for n, f in model.model_fields.items() if f.is_required()}


@pytest.mark.parametrize("path", PATHS)
def test_without_key_every_path_says_invalid_api_key(module_client, path):
    response = module_client.post(path, json={"prompt": "x"})
    assert response.status_code == 401
    assert response.json()["status"] == "error"
    assert response.json()["message"] == "Invalid Api Key"


@pytest.mark.parametrize("path", PATHS)
def test_with_key_a_bad_body_is_an_error_envelope(module_client, path):
    response = module_client.post(path, json=["not", "an", "object"], headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    assert response.json() == {"status": "error", "message": "The request body must be a JSON object",
                               "tip": 'Send {"key": "...", ...}.'}


@pytest.mark.parametrize(("path", "name"), [(p, n) for p, n in ROUTES if required_fields(n)])
def test_with_key_missing_fields_are_named(module_client, path, name):
    response = module_client.post(path, json={"key": KEY})
    assert response.status_code == 422
    body = response.json()
    assert body["status"] == "error"
    assert set(body["message"]) == required_fields(name)
    for field in required_fields(name):
        assert body["message"][field] == [f"The {field} field is required."]


def test_invalid_json_is_reported_after_auth(module_client):
    path = "/api/v1/enterprise/text2img"
    assert module_client.post(path, content=b"{not json").status_code == 401
    response = module_client.post(path, content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    assert response.json()["message"].startswith("The request body is not valid JSON")


def test_key_in_body_works_without_content_type(module_client):
    response = module_client.post("/api/v1/enterprise/system_details", content=f'{{"key": "{KEY}"}}'.encode())
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@pytest.mark.parametrize(
    "auth", [{"json": {"key": "wrong"}}, {"json": {}, "headers": {"Authorization": "Bearer wrong"}},
             {"json": {}, "headers": {"Authorization": f"Basic {KEY}"}}, {"json": {"key": 12345}}]
)
def test_wrong_keys_are_refused(module_client, auth):
    response = module_client.post("/api/v1/enterprise/system_details", **auth)
    assert response.status_code == 401 and response.json()["message"] == "Invalid Api Key"


def test_configured_keys_replace_the_development_key(make_client):
    client = make_client(api_keys=["k1", "k2"])
    assert client.post("/api/v1/enterprise/system_details", json={"key": KEY}).status_code == 401
    assert client.post("/api/v1/enterprise/system_details", json={"key": "k2"}).json()["status"] == "ok"


def test_legacy_clients_can_get_errors_with_http_200(make_client):
    client = make_client(errors_with_http_200=True)
    response = client.post("/api/v1/enterprise/text2img", json={"key": "nope", "prompt": "x"})
    assert response.status_code == 200
    assert response.json()["message"] == "Invalid Api Key"


def test_unknown_routes_and_methods_get_the_envelope(module_client):
    missing = module_client.post("/api/v1/enterprise/no_such_endpoint", json={"key": KEY})
    assert missing.status_code == 404 and missing.json()["status"] == "error"
    wrong_method = module_client.get("/api/v1/enterprise/text2img")
    assert wrong_method.status_code == 405 and "use POST" in wrong_method.json()["message"]


def test_oversized_bodies_are_refused(make_client):
    client = make_client(max_body_bytes=1024 * 1024)
    response = client.post("/api/v1/enterprise/text2img", json={"key": KEY, "prompt": "x" * (2 * 1024 * 1024)})
    assert response.status_code == 413
    assert response.json()["status"] == "error"


def test_openapi_documents_every_request_model(module_client):
    schema = module_client.get("/openapi.json").json()
    for name, endpoint in ENDPOINTS.items():
        operation = schema["paths"][f"/api/v1/enterprise/{name}"]["post"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{endpoint.request.__name__}"
        assert endpoint.request.__name__ in schema["components"]["schemas"]
    assert "/api/v1/enterprise/fetch/{request_id}" in schema["paths"]
    docs = module_client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_schedulers_list_and_system_details(module_client):
    schedulers = module_client.post("/api/v1/enterprise/schedulers_list", json={"key": KEY}).json()
    assert "status" not in schedulers  # as the original: a bare list
    assert "PNDMScheduler" in schedulers["schedulers"] and "LCMScheduler" in schedulers["schedulers"]
    assert "KarrasVeScheduler" not in schedulers["schedulers"]
    details = module_client.post("/api/v1/enterprise/system_details", json={"key": KEY}).json()
    assert details["status"] == "ok" and details["model_count"] == 4
    assert sorted(details["models"]) == ["tiny-motion-adapter", "tiny-sd", "tiny-sd-inpaint", "tiny-svd"]
    assert {"queue_time", "queue_num", "device", "version"} <= set(details)


def test_catalog_reads(module_client):
    models = module_client.post("/api/v1/enterprise/get_all_models", json={"key": KEY}).json()
    assert models["status"] == "success"
    entry = {m["model_id"]: m for m in models["models"]}["tiny-sd-inpaint"]
    assert entry["category"] == "inpaint" and entry["status"] == "ready"
    assert len(entry["load_data"]) == 19 and entry["load_data"][2] == "/"  # MM/DD/YYYY HH:MM:SS
    found = module_client.post("/api/v1/enterprise/verify_model", json={"key": KEY, "model_id": "tiny-sd"})
    assert found.json() == {
        "status": "success", "message": "Model exists on server", "model_id": "tiny-sd", "category": "stable_diffusion"
    }
    missing = module_client.post("/api/v1/enterprise/verify_model", json={"key": KEY, "model_id": "nope"})
    assert missing.status_code == 404 and missing.json()["message"].startswith("Model id not found")
