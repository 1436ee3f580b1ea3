"""What the browser page needs from the server, over HTTP: the page and its files at `/` with a
strict Content-Security-Policy (no inline script anywhere in them), the admin endpoints `queue` and
`queue_cancel` (ours), and system_details' `caller`. (The page itself, in a browser:
tests/browser/.)"""

from __future__ import annotations

import html.parser
import time

import pytest

from handlers import queue
from infra.limits import key_id
from infra.web.page import STATIC, content_security_policy, storage_origins

API = "/api/v1/enterprise"
GEN, ADMIN = "gen-key-3c9e", "admin-key-77aa"
LONG = {"prompt": "x", "width": 320, "height": 320, "steps": 40, "instant_response": "yes"}


@pytest.fixture
def roles(make_client):
    return make_client(api_keys=[GEN], admin_api_keys=[ADMIN], progress_seconds=0.05)


def post(client, endpoint: str, key: str, **body):
    return client.post(f"{API}/{endpoint}", json=body, headers={"Authorization": f"Bearer {key}"})


def wait_running(client, job_id: int, key: str) -> None:
    deadline = time.monotonic() + 60
    while (post(client, "fetch", key, request_id=job_id).json().get("progress") or {}).get("step", 0) < 1:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)


def test_the_page_and_its_files_are_served_with_a_strict_policy(module_client):
    page = module_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'self'" and directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'" and directives["object-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'" and directives["connect-src"] == "'self'"
    assert "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    script = module_client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.headers["content-security-policy"] == content_security_policy()
    missing = module_client.get("/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["status"] == "error"
    assert module_client.head("/").status_code == 200
    schema = module_client.get("/openapi.json").json()
    assert "/" not in schema["paths"] and not any(path.startswith("/static") for path in schema["paths"])


class _Markup(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.inline_scripts, self.handlers, self.styles, self.sources = 0, [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.handlers += [name for name in attrs if name.startswith("on")]
        if "style" in attrs or tag == "style":
            self.styles.append(tag)
        if tag == "script":
            self._in_script = True
            self.sources.append(attrs.get("src"))

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1


def test_no_inline_script_style_or_handler_and_no_markup_from_strings():
    markup = _Markup()
    markup.feed((STATIC / "index.html").read_text())
    assert markup.inline_scripts == 0 and not markup.handlers and not markup.styles
    assert markup.sources == ["/static/app.js"]
    for script in STATIC.glob("*.js"):
        source = script.read_text()
        # text goes in as text: nothing the page shows is parsed as markup
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, f"{script.name}: {sink}"
        assert 'setAttribute("style"' not in source  # a style attribute is inline style


def test_the_policy_allows_images_from_the_bucket_outputs_go_to():
    described = {"endpoint_url": "https://s3.us-east-1.amazonaws.com", "bucket": "outs", "addressing_style": "virtual",
                 "public_url": "https://cdn.example/generations/", "secret_access_key": "****"}
    assert storage_origins(described) == ["https://cdn.example", "https://s3.us-east-1.amazonaws.com",
                                          "https://outs.s3.us-east-1.amazonaws.com"]
    assert storage_origins({"kind": "local", "root": "/data/outputs"}) == []
    policy = content_security_policy(storage_origins(described))
    assert "img-src 'self' data: blob: https://cdn.example https://s3.us-east-1.amazonaws.com" in policy


def test_system_details_names_the_calling_key_and_whether_it_is_an_admin_key(roles):
    assert post(roles, "system_details", GEN).json()["caller"] == {"key_id": key_id(GEN), "admin": False}
    assert post(roles, "system_details", ADMIN).json()["caller"] == {"key_id": key_id(ADMIN), "admin": True}
    assert GEN not in post(roles, "system_details", GEN).text


def test_queue_lists_every_keys_jobs_and_queue_cancel_ends_any_of_them(roles, monkeypatch):
    running = post(roles, "text2img", GEN, **LONG).json()
    wait_running(roles, running["id"], GEN)
    queued = post(roles, "text2img", ADMIN, **LONG, priority="high").json()  # behind it (one worker)
    assert post(roles, "queue", GEN).status_code == 403  # admin keys only
    listing = post(roles, "queue", ADMIN).json()
    assert listing["status"] == "success"
    assert len(listing["jobs"]) == 2, listing
    first, second = listing["jobs"]
    assert (first["id"], first["state"], first["key_id"]) == (running["id"], "running", key_id(GEN))
    assert first["progress"]["stage"] == "denoising" and first["progress"]["step"] >= 1 and first["started_at"]
    assert (second["id"], second["state"], second["priority"]) == (queued["id"], "queued", "high")
    assert second["queue_position"] == 0 and second["progress"]["stage"] == "queued" and second["started_at"] is None
    assert first["endpoint"] == "text2img" and first["model_id"] == "tiny-sd" and first["created_at"].endswith("Z")
    assert listing["by_key"] == {key_id(GEN): {"queued": 0, "running": 1, "high": 0, "normal": 1, "low": 0},
                                 key_id(ADMIN): {"queued": 1, "running": 0, "high": 1, "normal": 0, "low": 0}}
    assert listing["queue_by_priority"]["high"] == 1 and listing["unlisted"] == 0
    assert GEN not in str(listing) and ADMIN not in str(listing)
    # past the limit: the queued jobs first by priority, then age; the others counted
    last = post(roles, "text2img", GEN, **LONG, priority="low").json()
    monkeypatch.setattr(queue, "QUEUE_LIST_LIMIT", 1)
    short = post(roles, "queue", ADMIN).json()
    assert [job["id"] for job in short["jobs"]] == [running["id"], queued["id"]] and short["unlisted"] == 1
    assert short["by_key"][key_id(GEN)] == {"queued": 1, "running": 1, "high": 0, "normal": 1, "low": 1}
    assert post(roles, "queue_cancel", ADMIN, request_id=last["id"]).json()["cancelled"] is True

    assert post(roles, "queue_cancel", GEN, request_id=queued["id"]).status_code == 403
    assert post(roles, "cancel", ADMIN, request_id=running["id"]).status_code == 404  # the client's cancel: own jobs
    ended = post(roles, "queue_cancel", ADMIN, request_id=running["id"]).json()
    assert ended["status"] == "failed" and ended["cancelled"] is True and ended["message"] == "Cancelled by the operator"
    seen = post(roles, "fetch", GEN, request_id=running["id"]).json()  # its owner sees why
    assert seen["status"] == "failed" and seen["message"] == "Cancelled by the operator"
    again = post(roles, "queue_cancel", ADMIN, request_id=running["id"])
    assert again.status_code == 409 and "already ended" in again.json()["message"]
    assert post(roles, "queue_cancel", ADMIN, request_id=12345678).status_code == 404
    assert post(roles, "queue_cancel", ADMIN, request_id=queued["id"]).json()["cancelled"] is True
    assert post(roles, "queue", ADMIN).json()["jobs"] == []
