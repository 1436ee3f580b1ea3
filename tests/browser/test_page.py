"""The page at `/` in a real browser (headless Chromium) against a real server on the tiny models:
the playground (text2img to an image with its progress, seed and meta, the exact request as
Python and curl, reuse; a mask painted with the mouse and inpainted, its prompt an HTML tag shown
as text), the console (the queue with a long
job cancelled, a model loaded by path until ready, verified and deleted, the usage chart and its
CSV, the server and storage facts), keys kept out of URLs, prompts rendered as text, a strict CSP,
the phone width and the dark scheme; no console error anywhere. Screenshots of each screen go to
the artifacts folder (tests/browser/conftest.py)."""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image

from infra.limits import key_id
from tests.browser.conftest import ADMIN_KEY, GEN_KEY
from tests.conftest import png_bytes, scene

API = "/api/v1/enterprise"
PROMPT = "a lighthouse on a cliff at dusk"
XSS = "<img src=x onerror=alert(1)>"
QUICK = {"width": 64, "height": 64, "steps": 4}
# a job of many seconds on the tiny model: seen running (and queued behind), then cancelled
LONG = {"prompt": "a lighthouse", "width": 512, "height": 512, "steps": 40, "instant_response": "yes"}


def api(server, endpoint: str, key: str, **body) -> dict:
    return httpx.post(f"{server.base}{API}/{endpoint}", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60).json()


def wait_for(look, timeout: float = 60.0, pause: float = 0.1):
    """`look()` again until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := look()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(pause)
    return value


def idle(server) -> None:
    """Wait until no job is queued or running (an earlier test's job may still run in the background)."""
    wait_for(lambda: not api(server, "queue", ADMIN_KEY)["jobs"], timeout=120, pause=0.2)


def fill(page, task: str, **fields):
    for name, value in fields.items():
        page.fill(f"#fields-{task} [name={name}]", str(value))


def finished_card(page):
    """The newest card, once its job has ended."""
    card = page.locator("#gallery .card").first
    card.locator(".badge[data-state=success], .badge[data-state=failed], .badge[data-state=cancelled]").wait_for()
    return card


def test_text2img_shows_progress_the_image_its_seed_and_the_exact_request(open_page, server, artifacts, tmp_path):
    session = open_page(GEN_KEY)
    page = session.page
    policy = session.document_headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'self'" in policy
    assert page.locator("#nav-console").is_hidden()  # a generation key: no console
    fill(page, "text2img", prompt=PROMPT, width=64, height=64, num_inference_steps=4)
    with page.expect_request(lambda r: r.url.endswith(f"{API}/text2img") and r.method == "POST") as sent:
        page.click("#generate")
    card = finished_card(page)
    assert card.locator(".badge").text_content() == "success"
    assert card.locator("progress").evaluate("p => p.value") == 100
    assert card.locator(".percent").text_content() == "100 %"
    assert card.get_attribute("data-followed-by") == "stream"  # the job stream, not polling
    image = card.locator(".images img")
    image.wait_for()
    wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth") == 64)
    job = api(server, "fetch", GEN_KEY, request_id=int(card.get_attribute("data-job-id")))
    assert job["status"] == "success" and image.get_attribute("src") == job["output"][0]
    assert card.locator(".seed strong").text_content() == str(job["meta"]["seed"])
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=artifacts / "playground.png")
    card.locator("details summary").click()
    assert card.locator("dl.meta dd", has_text=PROMPT).count() == 1
    page.screenshot(path=artifacts / "playground-meta.png")

    body = json.loads(sent.value.post_data)
    assert body["prompt"] == PROMPT and body["width"] == 64 and "key" not in body
    card.get_by_role("button", name="Copy as Python").click()
    snippet = card.locator("textarea.snippet")
    snippet.wait_for()
    code = snippet.input_value()
    assert GEN_KEY not in code
    ran = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SDAPI_KEY": GEN_KEY}, capture_output=True,
                         text=True, timeout=60, check=False)
    assert ran.returncode == 0, ran.stderr
    again = ast.literal_eval(ran.stdout.strip())  # the snippet prints the answer's dict
    assert again["status"] in ("processing", "success") and again["meta"]["prompt"] == job["meta"]["prompt"]
    card.get_by_role("button", name="Copy as curl").click()
    curl = snippet.input_value()
    assert f"{server.base}{API}/text2img" in curl and "$SDAPI_KEY" in curl and GEN_KEY not in curl
    assert json.loads(curl.split("--data-raw '", 1)[1].rsplit("'", 1)[0]) == body

    card.get_by_role("button", name="Reuse these settings").click()
    assert page.input_value("#fields-text2img [name=seed]") == str(job["meta"]["seed"])
    assert page.input_value("#fields-text2img [name=prompt]") == PROMPT

    # the key: kept in this tab, sent as a Bearer header, never in a URL
    assert page.evaluate("() => sessionStorage.getItem('sdapi.key')") == GEN_KEY
    assert session.urls and not [url for url in session.urls if GEN_KEY in url]
    assert session.headers and all(h.get("authorization") == f"Bearer {GEN_KEY}" for h in session.headers)
    page.reload()
    page.wait_for_selector("#fields-text2img [name=prompt]")  # signed in still, no key asked again
    assert page.locator("#login").is_hidden()
    # every control has a label, and the form is reachable with the keyboard
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('#playground :is(input, select, textarea)')]
        .filter(e => !e.labels?.length && !e.getAttribute('aria-label')).map(e => e.outerHTML)""")
    assert not unlabelled
    reached = set()
    page.locator("#tab-text2img").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("() => document.activeElement.id || document.activeElement.name || ''"))
    assert {"generate", "prompt"} <= {r.split("-")[1] if r.startswith("f-") else r for r in reached}
    session.assert_clean()


def test_a_mask_painted_with_the_mouse_is_sent_and_inpainted_exactly_there(open_page, server, artifacts):
    session = open_page(GEN_KEY)
    page = session.page
    page.click("#tab-inpaint")
    init = scene(64, 64)
    page.set_input_files("#init-file", files=[{"name": "scene.png", "mimeType": "image/png", "buffer": png_bytes(init)}])
    canvas = page.locator("#painter canvas.paint")
    canvas.wait_for()
    page.fill("#painter input[type=range] >> nth=0", "12")  # brush size, in image pixels
    box = canvas.bounding_box()
    scale = box["width"] / 64
    start, end = (12.0, 30.0), (50.0, 38.0)  # in image pixels

    def at(x, y):
        return box["x"] + x * scale, box["y"] + y * scale

    page.mouse.move(*at(*start))
    page.mouse.down()
    page.mouse.move(*at(*end), steps=12)
    page.mouse.up()
    fill(page, "inpaint", prompt=XSS, num_inference_steps=4)
    page.locator("#painter").scroll_into_view_if_needed()
    page.screenshot(path=artifacts / "inpaint-mask.png")
    with page.expect_request(lambda r: r.url.endswith(f"{API}/inpaint") and r.method == "POST") as sent:
        page.click("#generate")
    card = finished_card(page)
    assert card.locator(".badge").text_content() == "success", card.text_content()

    body = json.loads(sent.value.post_data)
    mask = np.asarray(data_image(body["mask_image"]).convert("L"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    distance = segment_distance(start, end)
    assert (mask[distance < 6 - 1] == 255).all()  # white within the brush's radius of the stroke
    assert (mask[distance > 6 + 1] == 0).all()  # black beyond it
    assert np.array_equal(np.asarray(data_image(body["init_image"]).convert("RGB")), np.asarray(init))

    # over the API: the output keeps every pixel the mask keeps, and repainted the stroke
    job = api(server, "fetch", GEN_KEY, request_id=int(card.get_attribute("data-job-id")))
    assert job["status"] == "success" and job["meta"]["mask_image"] == "(base64 image)"
    output = np.asarray(Image.open(io.BytesIO(httpx.get(job["output"][0], timeout=30).content)).convert("RGB"))
    keep = mask == 0
    assert np.array_equal(output[keep], np.asarray(init)[keep])
    assert not np.array_equal(output[~keep], np.asarray(init)[~keep])
    card.locator(".images img").wait_for()
    # the prompt is text: no element was made of it, no script ran (a dialog would be an error)
    card.locator("details summary").click()
    assert page.locator("img[src=x]").count() == 0
    assert card.locator("dl.meta dd", has_text=XSS).count() == 1
    assert XSS in card.locator(".images img").get_attribute("alt")
    page.locator("#painter").scroll_into_view_if_needed()
    page.screenshot(path=artifacts / "inpaint-result.png")
    session.assert_clean()


def data_image(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def segment_distance(a, b, size=64) -> np.ndarray:
    """Each pixel centre's distance to the segment a-b (image pixels)."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    (ax, ay), (bx, by) = a, b
    t = np.clip(((xs - ax) * (bx - ax) + (ys - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2), 0, 1)
    return np.hypot(xs - (ax + t * (bx - ax)), ys - (ay + t * (by - ay)))


def test_the_console_shows_the_queue_and_cancels_a_running_job(open_page, server, artifacts):
    idle(server)
    running = api(server, "text2img", GEN_KEY, **LONG)
    wait_for(lambda: (api(server, "fetch", GEN_KEY, request_id=running["id"]).get("progress") or {}).get("step", 0) > 0)
    queued = api(server, "text2img", ADMIN_KEY, **LONG, priority="high")  # behind it (one worker)
    session = open_page(ADMIN_KEY, section="#console")
    page = session.page
    page.wait_for_selector("#panel-queue:not([hidden])")
    row = page.locator(f"#queue-rows tr[data-job-id='{running['id']}']")
    row.wait_for()
    assert row.get_attribute("data-state") == "running"
    assert row.locator("td").nth(1).text_content() == key_id(GEN_KEY)
    wait_for(lambda: row.locator("progress").evaluate("p => p.value") > 0)
    waiting = page.locator(f"#queue-rows tr[data-job-id='{queued['id']}']")
    assert waiting.get_attribute("data-state") == "queued" and "high" in waiting.text_content()
    assert page.locator("#queue-keys tr").count() == 2
    page.screenshot(path=artifacts / "console-queue.png")

    row.get_by_role("button", name=f"Cancel job {running['id']}").click()
    row.wait_for(state="detached")
    ended = api(server, "fetch", GEN_KEY, request_id=running["id"])
    assert ended["status"] == "failed" and ended["cancelled"] is True and ended["message"] == "Cancelled by the operator"
    started = page.locator(f"#queue-rows tr[data-job-id='{queued['id']}'][data-state=running]")
    started.wait_for()  # the queued one runs now; cancel it too
    started.get_by_role("button", name=f"Cancel job {queued['id']}").click()
    started.wait_for(state="detached")
    page.locator("#queue-empty:not([hidden])").wait_for()
    assert api(server, "fetch", ADMIN_KEY, request_id=queued["id"])["cancelled"] is True
    session.assert_clean()


def test_the_console_loads_a_model_by_path_until_ready_then_verifies_and_deletes_it(open_page, server, artifacts):
    session = open_page(ADMIN_KEY, section="#console")
    page = session.page
    page.click("#tab-models")
    page.locator("#model-rows tr[data-model-id=tiny-sd]").wait_for()
    page.fill("#load-fields [name=url]", str(server.models / "tiny-sd"))
    page.fill("#load-fields [name=model_id]", "copied-sd")
    page.click("#load-form button[type=submit]")
    row = page.locator("#model-rows tr[data-model-id=copied-sd]")
    row.wait_for()
    page.locator("#model-rows tr[data-model-id=copied-sd][data-status=ready]").wait_for()
    assert api(server, "verify_model", ADMIN_KEY, model_id="copied-sd")["message"] == "Model exists on server"
    row.get_by_role("button", name="Verify copied-sd").click()
    page.locator("#model-rows tr[data-model-id=copied-sd] .note", has_text="Model exists on server").wait_for()
    page.screenshot(path=artifacts / "console-models.png")
    delete = row.get_by_role("button", name="Delete copied-sd")
    delete.click()
    assert delete.text_content() == "Delete: sure?"  # a second press deletes
    delete.click()
    row.wait_for(state="detached")
    models = api(server, "get_all_models", ADMIN_KEY)["models"]
    assert "copied-sd" not in {m["model_id"] for m in models}
    session.assert_clean()


def test_the_usage_chart_shows_the_jobs_just_run_and_downloads_as_csv(open_page, server, artifacts):
    for _ in range(2):
        assert api(server, "text2img", GEN_KEY, prompt="x", **QUICK)["status"] == "success"
    idle(server)  # no job ends between the page's usage and the test's
    session = open_page(ADMIN_KEY, section="#console")
    page = session.page
    page.click("#tab-usage")
    gen = key_id(GEN_KEY)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    bar = page.locator(f"#usage-chart rect.bar[data-key='{gen}'][data-day='{today}']")
    bar.wait_for()
    usage = api(server, "usage", ADMIN_KEY, start_date=today, end_date=today, by_day="yes")
    counted = {k["key_id"]: k["days"][today]["jobs_succeeded"] for k in usage["keys"]}
    assert counted[gen] >= 2
    bars = page.locator(f"#usage-chart rect.bar[data-day='{today}']")
    shown = {bars.nth(i).get_attribute("data-key"): float(bars.nth(i).get_attribute("data-value"))
             for i in range(bars.count())}
    assert shown == {k: float(v) for k, v in counted.items() if v}
    page.screenshot(path=artifacts / "console-usage.png")
    with page.expect_download() as download:
        page.click("#usage-csv")
    rows = list(csv.DictReader(open(download.value.path())))  # noqa: SIM115 - read once
    mine = [r for r in rows if r["key_id"] == gen and r["day"] == today]
    assert len(mine) == 1 and int(mine[0]["jobs_succeeded"]) >= counted[gen]

    page.click("#tab-system")
    page.locator("#system dd", has_text="cpu").wait_for()
    storage = page.locator("#storage").text_content()
    assert "local" in storage and "secret" not in storage
    page.screenshot(path=artifacts / "console-server.png")
    session.assert_clean()


def test_the_page_fits_a_phone_and_follows_the_dark_scheme(open_page, server, artifacts):
    session = open_page(GEN_KEY, viewport=(390, 844), color_scheme="dark")
    page = session.page
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert sum(int(c) for c in background[background.index("(") + 1:-1].split(",")[:3]) < 3 * 64  # dark
    page.click("#tab-inpaint")
    page.set_input_files("#init-file", files=[{"name": "s.png", "mimeType": "image/png", "buffer": png_bytes(scene(64, 64))}])
    page.locator("#painter canvas.paint").wait_for()
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=artifacts / "playground-phone-dark.png", full_page=True)
    session.assert_clean()
    operator = open_page(ADMIN_KEY, viewport=(390, 844), color_scheme="dark", section="#console")
    operator.page.locator("#queue-status", has_text="queued or running").wait_for()
    assert operator.page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    operator.page.screenshot(path=artifacts / "console-phone-dark.png", full_page=True)
    operator.assert_clean()
