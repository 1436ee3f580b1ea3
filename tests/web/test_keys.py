"""Key roles: with SDAPI_ADMIN_API_KEYS set, the catalog and server endpoints need an admin key;
generation keys may generate, fetch and read the catalog. Keys are never echoed."""

from __future__ import annotations

import pytest

from infra.web.api import ENDPOINTS, PREFIXES

API = "/api/v1/enterprise"
GEN, ADMIN = "gen-key-7f3a", "admin-key-91bd"
ADMIN_ONLY = sorted(name for name, endpoint in ENDPOINTS.items() if endpoint.admin)


@pytest.fixture(scope="module")
def roles(models_dir, tmp_path_factory):
    from tests.conftest import open_client

    client = open_client(tmp_path_factory.mktemp("roles"), models_dir, api_keys=[GEN], admin_api_keys=[ADMIN])
    yield client
    client.__exit__(None, None, None)


def test_the_admin_endpoints_are_the_catalog_and_server_ones():
    assert ADMIN_ONLY == ["clear_cache", "clear_queue", "delete_model", "load_model", "load_model_v2", "load_vae",
                          "queue", "queue_cancel", "reset_s3", "restart_server", "sync_models", "update_s3",
                          "update_server", "usage"]


@pytest.mark.parametrize("name", ADMIN_ONLY)
def test_generation_keys_may_not_use_admin_endpoints(roles, name):
    response = roles.post(f"{API}/{name}", json={"key": GEN})
    assert response.status_code == 403, response.text
    assert response.json()["status"] == "error" and name in response.json()["message"]
    assert GEN not in response.text


def test_generation_keys_generate_and_read(roles):
    body = {"key": GEN, "prompt": "x", "width": 64, "height": 64, "steps": 2}
    result = roles.post(f"{API}/text2img", json=body)
    assert result.json()["status"] == "success" and GEN not in result.text
    for name in ("fetch", "system_details", "get_all_models", "schedulers_list"):
        extra = {"request_id": result.json()["id"]} if name == "fetch" else {}
        assert roles.post(f"{API}/{name}", json={"key": GEN, **extra}).status_code == 200, name


def test_admin_keys_do_everything(roles):
    assert roles.post(f"{API}/clear_queue", json={"key": ADMIN}).json()["status"] == "success"
    assert roles.post(f"{API}/clear_queue", headers={"Authorization": f"Bearer {ADMIN}"}, json={}).status_code == 200
    body = {"key": ADMIN, "prompt": "x", "width": 64, "height": 64, "steps": 2}
    assert roles.post(f"{API}/text2img", json=body).json()["status"] == "success"


def test_unknown_keys_are_refused_everywhere(roles):
    for name in ("text2img", "clear_queue", "fetch"):
        response = roles.post(f"{API}/{name}", json={"key": "nope"})
        assert response.status_code == 401 and "nope" not in response.text


def test_requests_per_minute_are_limited_per_key(make_client):
    client = make_client(api_keys=[GEN, "other-key"], rate_limit_per_minute=3)
    for _ in range(3):
        assert client.post(f"{API}/system_details", json={"key": GEN}).status_code == 200
    limited = client.post(f"{API}/system_details", json={"key": GEN})
    assert limited.status_code == 429
    assert limited.json()["status"] == "error" and limited.json()["message"] == "Rate limit exceeded"
    assert "3 requests a minute" in limited.json()["tip"] and GEN not in limited.text
    assert client.post(f"{API}/system_details", json={"key": "other-key"}).status_code == 200  # per key


def test_jobs_queued_or_running_at_once_are_capped_per_key(make_client):
    import time

    client = make_client(api_keys=[GEN, "other-key"], max_jobs_per_key=1)
    slow = {"prompt": "x", "width": 512, "height": 512, "steps": 40, "instant_response": "yes"}
    first = client.post(f"{API}/text2img", json={"key": GEN, **slow}).json()
    assert first["status"] == "processing"
    second = client.post(f"{API}/text2img", json={"key": GEN, **slow})
    assert second.status_code == 429 and "limit 1" in second.json()["tip"]
    quick = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    assert client.post(f"{API}/text2img", json={"key": "other-key", **quick, "instant_response": "yes"}).status_code == 200
    jobs = client.app.state.runtime.jobs
    assert jobs.get(first["id"]).owner and jobs.get(first["id"]).owner != GEN  # a hash, never the key
    deadline = time.monotonic() + 120
    while client.post(f"{API}/fetch", json={"key": GEN, "request_id": first["id"]}).json()["status"] == "processing":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.post(f"{API}/text2img", json={"key": GEN, **quick}).json()["status"] == "success"


def test_no_route_answers_without_a_valid_key_except_health_docs_and_links(roles):
    """Every API route refuses a request without a valid key. The only others: health, the docs,
    the signed model-archive links and the output links, which are capabilities (see below)."""
    from fastapi.routing import APIRoute

    from infra.web.generations import ROUTES

    gets = {face.path for face in ROUTES if "GET" in face.methods}  # v6/v7/v3 fetch and models: the key in the query
    gets |= {"/v1/models", "/v1/models/{model_id}"}  # the OpenAI models routes: Bearer
    open_routes = set()
    for route in roles.app.routes:
        if isinstance(route, APIRoute) and "POST" in route.methods:
            path = route.path.replace("{request_id}", "1")
            assert roles.post(path, json={"prompt": "x"}).status_code == 401, path
            assert roles.post(path, json={"key": "wrong"}).status_code == 401, path
        elif isinstance(route, APIRoute) and route.path in gets:
            path = route.path.replace("{request_id}", "1")
            assert roles.get(path).status_code == 401, path
            assert roles.get(path, params={"key": "wrong"}).status_code == 401, path
        else:
            open_routes.add(route.path)
    assert open_routes == {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                           "/api/v1/enterprise/model_archive/{model_id}.tar", "/files/{key:path}",
                           "/api/v1/enterprise/preview/{job_id}.jpg",
                           "/", "/static"} | {  # the browser page and its files (infra/web/page.py)
                               f"{prefix}/stream/{{request_id}}" for prefix in PREFIXES}  # GET: the key as for POST
    assert roles.get("/api/v1/enterprise/model_archive/tiny-sd.tar").status_code == 403  # unsigned
    assert roles.get("/api/v1/enterprise/preview/12345678.jpg").status_code == 403  # unsigned
    for prefix in PREFIXES:
        assert roles.get(f"{prefix}/stream/12345678").status_code == 401
        assert roles.get(f"{prefix}/stream/12345678?key=wrong").status_code == 401


def test_output_links_are_unguessable(roles, image_server):
    """Output and upload links work without a key, like ModelsLab's public bucket links, so their
    names carry at least ~100 random bits; nothing lists a folder."""
    import re

    body = {"key": GEN, "prompt": "x", "width": 32, "height": 32, "steps": 1, "samples": 2}
    links = roles.post(f"{API}/text2img", json=body).json()["output"]
    upload = roles.post(f"{API}/upload_image", json={"key": GEN, "image_type": "png",
                                                     "base64_image": _png_b64()}).json()["image_url"]
    uuid = "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert all(re.fullmatch(rf"http://testserver/files/generations/{uuid}-\d\.png", link) for link in links), links
    assert re.fullmatch(r"http://testserver/files/uploads/\d{49,}\.png", upload), upload
    for link in (*links, upload):
        assert roles.get(link).status_code == 200
    for listing in ("/files/generations", "/files/generations/", "/files/uploads/", "/files/"):
        assert roles.get(listing).status_code == 404


def _png_b64() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
