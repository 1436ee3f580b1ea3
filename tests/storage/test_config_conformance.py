"""The `ConfigStore` protocol (infra/storage/config_store.py), one suite run against the local
`FileConfigStore` and the Modal side's `DictConfigStore` (on a `modal.Dict` stand-in), plus what
each does alone (private files; racing bumps on a Dict)."""

from __future__ import annotations

import os
import stat
import time

import pytest

from infra.storage.config_store import DictConfigStore, FileConfigStore
from tests.conftest import race
from tests.modal.standins import FakeDict


@pytest.fixture(params=["file", "modal-dict"])
def config(request, tmp_path):
    if request.param == "file":
        return FileConfigStore(tmp_path / "config")
    return DictConfigStore(FakeDict())


def test_config_get_put_delete(config):
    assert config.get("storage") is None
    config.put("storage", '{"bucket": "a"}')
    assert config.get("storage") == '{"bucket": "a"}'
    config.put("storage", '{"bucket": "b"}')
    assert config.get("storage") == '{"bucket": "b"}'
    config.delete("storage")
    assert config.get("storage") is None
    config.delete("storage")  # deleting what is not there is fine


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "__generation__"])
def test_config_refuses_names_that_are_not_plain(config, name):
    with pytest.raises(ValueError):
        config.put(name, "x")


def test_config_generation_starts_at_0_and_each_bump_raises_it(config):
    assert config.generation() == 0
    assert config.bump_generation() == 1
    assert config.bump_generation() == 2
    assert config.generation() == 2


def test_file_config_is_private_to_the_owner(tmp_path):
    config = FileConfigStore(tmp_path / "config")
    config.put("storage", "secret key inside")
    config.bump_generation()
    for path in (tmp_path / "config").iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert FileConfigStore(tmp_path / "config").get("storage") == "secret key inside"  # survives a restart


def test_dict_generation_bumps_racing_are_distinct_and_never_go_back():
    d = FakeDict()
    config = DictConfigStore(d)
    bumps = race(8, config.bump_generation)
    assert sorted(bumps) == list(range(1, 9))
    assert config.generation() == 8
    # a bump whose publishing write was overtaken by an older one is still seen
    d.put("generation:9", time.time())
    assert config.generation() == 9 and config.bump_generation() == 10
