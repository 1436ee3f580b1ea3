"""Per-key usage metering: what an operator bills from. Counted per key, endpoint and day,
persisted, readable by admin keys only, the same on the SQLite and the Modal Dict store."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from infra.jobs.usage import COUNTERS, SqliteUsageStore, UsageMeter, today
from infra.limits import key_id
from tests.conftest import video_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

API = "/api/v1/enterprise"
ALICE, BOB, ADMIN = "alice-key-0001", "bob-key-0002", "admin-key-0003"
DAY = "2026-11-24"


def usage(client, **fields):
    response = client.post(f"{API}/usage", json={"key": ADMIN, **fields})
    assert response.status_code == 200, response.text
    return {entry["key_id"]: entry for entry in response.json()["keys"]}


def t2i(client, key, **fields):
    body = {"key": key, "prompt": "x", "width": 32, "height": 32, "steps": 1, **fields}
    return client.post(f"{API}/text2img", json=body)


# --------------------------------------------------------------------------- through the API


def test_usage_is_counted_per_key_and_endpoint_and_survives_a_restart(make_client, tmp_path):
    data_dir = tmp_path / "metered"
    client = make_client(data_dir, api_keys=[ALICE, BOB], admin_api_keys=[ADMIN])
    first = t2i(client, ALICE, samples=2)
    assert first.json()["status"] == "success"
    assert t2i(client, ALICE).json()["status"] == "success"
    assert t2i(client, ALICE, width=-5).status_code == 422  # counted as a request and an error, no job
    assert client.post(f"{API}/fetch/{first.json()['id']}", json={"key": BOB}).status_code == 200
    assert client.post(f"{API}/fetch_queue_image", json={"key": BOB, "request_id": first.json()["id"]}).status_code == 200
    assert client.post(f"{API}/text2img", json={"key": "not-a-key"}).status_code == 401  # nobody's usage

    keys = usage(client)
    alice, bob = keys[key_id(ALICE)], keys[key_id(BOB)]
    assert set(keys) == {key_id(ALICE), key_id(BOB)}  # the admin's own usage call is counted after answering
    t = alice["endpoints"]["text2img"]
    assert (t["requests"], t["errors"], t["jobs_succeeded"], t["jobs_failed"], t["images"]) == (3, 1, 2, 0, 3)
    assert t["gpu_seconds"] > 0 and t["video_seconds"] == 0
    assert alice["total"] == t
    assert bob["endpoints"] == {"fetch": {**dict.fromkeys(COUNTERS, 0), "requests": 2}}  # aliases count as fetch
    assert ALICE not in str(keys) and BOB not in str(keys)

    client.__exit__(None, None, None)  # a restart: the counts are on disk
    again = make_client(data_dir, api_keys=[ALICE, BOB], admin_api_keys=[ADMIN])
    after = usage(again, api_key=ALICE)
    assert list(after) == [key_id(ALICE)] and after[key_id(ALICE)]["endpoints"]["text2img"] == t
    assert key_id(ADMIN) in usage(again)  # the first usage call, counted for the admin key
    assert list(usage(again, key_id=key_id(BOB))) == [key_id(BOB)]


def test_failed_jobs_are_counted_with_their_engine_time_and_no_images(make_client):
    client = make_client(api_keys=[ALICE], admin_api_keys=[ADMIN])
    runtime = client.app.state.runtime
    real_run = runtime.dispatcher.engine().run

    def broken_run(endpoint, params, inputs):
        real_run(endpoint, params, inputs)  # the engine's time is spent...
        raise RuntimeError("CUDA error: an illegal memory access was encountered")  # ...then it fails

    runtime.dispatcher.engine().run = broken_run
    result = t2i(client, ALICE, samples=2)
    assert result.json()["status"] == "failed"
    counts = usage(client)[key_id(ALICE)]["endpoints"]["text2img"]
    assert (counts["jobs_failed"], counts["jobs_succeeded"], counts["images"]) == (1, 0, 0)
    assert counts["gpu_seconds"] > 0


def test_usage_by_day_and_date_range(make_client):
    client = make_client(api_keys=[ALICE], admin_api_keys=[ADMIN])
    meter = client.app.state.runtime.usage
    meter.count(key_id(ALICE), "inpaint", now=1_700_000_000, requests=1, images=4)  # 2023-11-14
    meter.count(key_id(ALICE), "inpaint", now=1_700_086_400, requests=1, images=1)  # 2023-11-15
    both = usage(client, start_date="2023-11-01", end_date="2023-11-30", by_day="yes")[key_id(ALICE)]
    assert both["total"]["images"] == 5
    assert {day: c["images"] for day, c in both["days"].items()} == {"2023-11-14": 4, "2023-11-15": 1}
    one = usage(client, start_date="2023-11-15", end_date="2023-11-15")[key_id(ALICE)]
    assert one["total"]["images"] == 1 and "days" not in one
    assert list(usage(client)) == [key_id(ADMIN)]  # this month: only the admin's own usage calls


@pytest.mark.parametrize(
    "fields, phrase",
    [({"start_date": "yesterday"}, "YYYY-MM-DD"), ({"start_date": "2026-02-30"}, "start_date"),
     ({"start_date": "2026-11-02", "end_date": "2026-11-01"}, "after")],
)
def test_bad_dates_are_a_clear_400(make_client, fields, phrase):
    client = make_client(admin_api_keys=[ADMIN])
    response = client.post(f"{API}/usage", json={"key": ADMIN, **fields})
    assert response.status_code == 400 and response.json()["status"] == "error"
    assert phrase in response.json()["message"] + response.json().get("tip", "")


def test_generation_keys_may_not_read_usage(make_client):
    client = make_client(api_keys=[ALICE], admin_api_keys=[ADMIN])
    assert client.post(f"{API}/usage", json={"key": ALICE}).status_code == 403


def test_a_failed_write_keeps_the_counts_for_the_next_flush(tmp_path):
    store = SqliteUsageStore(tmp_path / "usage.sqlite3")
    meter = UsageMeter(store, SimpleNamespace(usage_flush_seconds=60))
    meter.request("k", "inpaint", error=True)
    real_add, store.add = store.add, lambda rows: (_ for _ in ()).throw(OSError("disk full"))
    meter.flush()
    store.add = real_add
    meter.request("k", "inpaint", error=False)
    counts = meter.totals(today(), today()).rows[(today(), "k", "inpaint")]
    assert (counts["requests"], counts["errors"]) == (2, 1)


def test_video_jobs_count_seconds_of_video_not_images(tmp_path):
    meter = UsageMeter(SqliteUsageStore(tmp_path / "u.sqlite3"), SimpleNamespace(usage_flush_seconds=60))
    job = SimpleNamespace(status="success", endpoint="text2video", owner="k", output_keys=["generations/a.mp4"],
                          params=video_params(num_frames=16, fps=8))
    meter.job(job, 12.0)
    counts = meter.totals(today(), today()).rows[(today(), "k", "text2video")]
    assert (counts["video_seconds"], counts["images"], counts["gpu_seconds"]) == (2.0, 0, 12.0)
