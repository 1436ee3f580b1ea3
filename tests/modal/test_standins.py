"""The Modal stand-ins themselves (tests/modal/standins.py): they keep the semantics the code
relies on, and importing the Modal-side backends needs neither modal nor torch."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from tests.conftest import race
from tests.modal.standins import FakeDict, FakeFunction


def test_a_running_call_reports_timeout_like_modal(tmp_path):
    release = threading.Event()
    slow = FakeFunction(lambda: release.wait(30) and "done")
    call = slow.spawn()
    with pytest.raises(TimeoutError):
        call.get(timeout=0)
    release.set()
    assert call.get(timeout=30) == "done"
    failing = FakeFunction(lambda: 1 / 0).spawn()
    with pytest.raises(ZeroDivisionError):
        failing.get(timeout=30)


def test_importing_the_modal_backends_needs_neither_modal_nor_torch():
    code = ("import sys, infra.jobs.dict_store, infra.jobs.modal_dispatch, infra.storage.config_store, tests.modal.standins; "
            "print(sorted(m for m in ('modal', 'torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_fake_dict_copies_values_and_claims_once():
    """The stand-in itself: mutation after put does not leak; skip_if_exists is a claim."""
    d = FakeDict()
    value = {"a": [1]}
    assert d.put("k", value)
    value["a"].append(2)
    got = d.get("k")
    got["a"].append(3)
    assert d.get("k") == {"a": [1]}
    assert race(8, lambda: d.put("claim", 1, skip_if_exists=True)).count(True) == 1
    assert d.pop("k") == {"a": [1]} and d.pop("k", None) is None and "k" not in d
    d.update({"x": 1, "y": 2})
    assert dict(d.items()) == {"claim": 1, "x": 1, "y": 2}
