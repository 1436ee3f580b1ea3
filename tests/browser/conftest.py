"""The browser tests' fixtures: the system's Chromium driven by Playwright (never a browser build
Playwright downloads), one per test module; a real server process on loopback with a generation
key and an admin key, over its own copy of the tiny models (the console loads and deletes models);
and pages that sign in, record every console error, page error and dialog, and every request's URL.
The browser lives for one module: Playwright's sync API marks its event loop running in the thread
while it is open, which `asyncio.run` in a later test of the same process would trip on.

Without Chromium (or Playwright) the tests fail, saying how to install it: scripts/setup.sh
installs it where apt-get can (the README's test command and CI run it first).
`SDAPI_TEST_CHROMIUM` names another Chromium binary. Screenshots go to
`tests/artifacts/` (or `SDAPI_TEST_ARTIFACTS`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess

GEN_KEY, ADMIN_KEY = "browser-gen-key-5b1d", "browser-admin-key-c47e"
INSTALL = ("the browser tests need Chromium: `apt-get install -y chromium` (Debian/Ubuntu; scripts/setup.sh does it "
           "as root or with passwordless sudo), or set SDAPI_TEST_CHROMIUM to a Chromium binary")


def chromium_path() -> str | None:
    named = os.environ.get("SDAPI_TEST_CHROMIUM")
    if named:
        return named if Path(named).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _unavailable(reason: str):
    pytest.fail(f"{reason} ({INSTALL})", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    """Chromium for one test module. (Playwright's sync API keeps its event loop marked running in
    this thread while it is open: a session-long one would break later tests' `asyncio.run`.)"""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (the dev extra)")
    path = chromium_path()
    if path is None:
        _unavailable("no Chromium found")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    folder = Path(os.environ.get("SDAPI_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    shutil.copytree(models_dir, root / "models")  # the console loads and deletes models: not the session's
    process = ServerProcess(root / "data", root / "models", api_keys=GEN_KEY, admin_api_keys=ADMIN_KEY,
                            fetch_allowlist="127.0.0.1,localhost", progress_seconds=0.05, workers=1,
                            usage_flush_seconds=0.2, build_tiny_models="false")
    process.models = root / "models"
    yield process
    process.stop()


@dataclass
class Session:
    page: object
    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)  # of the API requests (not the signed preview links)

    def assert_clean(self):
        assert not self.errors, "\n".join(self.errors)


@pytest.fixture
def open_page(browser, server):
    """open_page(key, viewport=..., color_scheme=...) -> a signed-in Session on the page at `/`."""
    contexts = []

    def open_(key: str, viewport=(1280, 800), color_scheme="light", section: str = "") -> Session:
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                      color_scheme=color_scheme, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        session = Session(page)
        page.on("console", lambda m: m.type == "error" and session.errors.append(f"console: {m.text} {m.location}"))
        page.on("pageerror", lambda e: session.errors.append(f"page error: {e}"))
        page.on("dialog", lambda d: (session.errors.append(f"dialog: {d.message}"), d.dismiss()))

        def request(r):
            session.urls.append(r.url)
            if "/api/" in r.url and "/preview/" not in r.url:
                session.headers.append(r.headers)

        page.on("request", request)
        response = page.goto(f"{server.base}/{section}")
        session.document_headers = response.headers
        page.fill("#key-input", key)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#session:not([hidden])")
        page.wait_for_selector("#fields-text2img [name=prompt]", state="attached")  # the forms are made
        return session

    yield open_
    for context in contexts:
        context.close()
