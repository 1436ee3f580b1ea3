"""The `UsageStore` protocol (infra/jobs/usage.py), one suite run against the local
`SqliteUsageStore` and the Modal side's `DictUsageStore` (on a `modal.Dict` stand-in): sums,
day ranges, compaction that keeps every total, and concurrent meters that lose nothing."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from infra.jobs.usage import DictUsageStore, SqliteUsageStore, UsageMeter, today
from tests.modal.standins import FakeDict

DAY = "2026-11-24"


@pytest.fixture(params=["sqlite", "dict"])
def store(request, tmp_path):
    return SqliteUsageStore(tmp_path / "usage.sqlite3") if request.param == "sqlite" else DictUsageStore(FakeDict())


def test_stores_sum_rows_and_filter_days(store):
    store.add({(DAY, "k1", "text2img"): {"requests": 1, "images": 2}, ("2026-10-31", "k1", "text2img"): {"requests": 5}})
    store.add({(DAY, "k1", "text2img"): {"requests": 1, "gpu_seconds": 0.25}})
    rows = store.rows("2026-11-01", "2026-11-30")
    assert list(rows) == [(DAY, "k1", "text2img")]
    counts = rows[(DAY, "k1", "text2img")]
    assert (counts["requests"], counts["images"], counts["gpu_seconds"]) == (2, 2, 0.25)


def test_compaction_keeps_the_totals(store):
    for n in range(5):
        store.add({(DAY, f"k{n % 2}", "inpaint"): {"requests": 1, "images": n}})
    before = store.rows(DAY, DAY)
    store.compact()
    assert store.rows(DAY, DAY) == before
    if isinstance(store, DictUsageStore):
        assert len(store.store) == 1


def test_a_reader_during_compaction_never_counts_twice():
    """The compacted sum is written before the entries it replaces are deleted: a reader that looks
    in between skips the replaced ones."""
    backing = FakeDict()
    store = DictUsageStore(backing)
    for _ in range(3):
        store.add({(DAY, "k", "fetch"): {"requests": 1}})
    seen = []
    real_pop = backing.pop

    def pop_and_read(key, *default):
        seen.append(store.rows(DAY, DAY)[(DAY, "k", "fetch")]["requests"])
        return real_pop(key, *default)

    backing.pop = pop_and_read
    store.compact()
    assert seen and set(seen) == {3}


def test_concurrent_meters_lose_nothing(store):
    """Several processes' meters (web containers, workers) writing to one store at once."""
    settings = SimpleNamespace(usage_flush_seconds=0.01)
    meters = [UsageMeter(store, settings) for _ in range(4)]
    for meter in meters:
        meter.start()

    def hammer(meter):
        for _ in range(250):
            meter.request("k", "text2img", error=False)

    threads = [threading.Thread(target=hammer, args=(m,)) for m in meters for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for meter in meters:
        meter.stop()
    assert store.rows(today(), today())[(today(), "k", "text2img")]["requests"] == 2000
