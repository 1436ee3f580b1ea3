"""Run-time configuration shared by every process of a deployment: named string values (the S3
settings update_s3 stores) and the generation counter (bumped by restart_server / clear_cache so
Modal workers stop taking inputs and fresh containers take over). `ConfigStore` is the protocol;
`FileConfigStore` is the local side (files under the data dir), `DictConfigStore` the Modal side
(a `modal.Dict`); tests/storage/test_config_conformance.py holds both to the same behaviour."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Protocol

from infra.storage.base import write_atomic

GENERATION_KEY = "__generation__"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ConfigStore(Protocol):
    def get(self, name: str) -> str | None: ...

    def put(self, name: str, value: str) -> None: ...

    def delete(self, name: str) -> None: ...

    def generation(self) -> int:
        """The current generation (0 before the first bump)."""

    def bump_generation(self) -> int:
        """A new generation, larger than every one before; returns it."""

    def refresh(self) -> int:
        """Keep every value alive (a modal.Dict drops an entry after 7 idle days); how many."""


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name == GENERATION_KEY:
        raise ValueError(f"not a config name: {name!r} (letters, digits, _ . -, not starting with . or -)")
    return name


class DictConfigStore:
    """Run-time configuration on a `modal.Dict`, shared by the web tier and the workers: named
    string values (the S3 settings update_s3 stores, ...) and the generation.

    The generation is an integer that restart_server / clear_cache / delete_model bump; a worker
    remembers the generation it started under and stops taking inputs once it sees a larger one,
    so fresh containers take over. Bumps never go backwards and never coincide: bump n is won
    with a `generation:{n}` key (skip_if_exists); `generation()` reads the published number and
    looks one step past it, so a bump whose publishing write was overtaken is still seen."""

    def __init__(self, d):
        self._d = d

    def get(self, name: str) -> str | None:
        return self._d.get(_check_name(name))

    def put(self, name: str, value: str) -> None:
        self._d.put(_check_name(name), value)

    def delete(self, name: str) -> None:
        self._d.pop(_check_name(name), None)

    def generation(self) -> int:
        n = self._d.get(GENERATION_KEY, 0)
        while f"generation:{n + 1}" in self._d:
            n += 1
        return n

    def bump_generation(self) -> int:
        """A new, larger generation; returns it."""
        n = self.generation() + 1
        while not self._d.put(f"generation:{n}", time.time(), skip_if_exists=True):
            n += 1
        self._d.put(GENERATION_KEY, n)
        return n

    def refresh(self) -> int:
        """Write every value again (run by the scheduled cleaner: an entry not read or written for 7
        days expires); the claim keys of past generations are dropped, the newest kept."""
        current = self.generation()
        refreshed = 0
        for name, value in list(self._d.items()):
            if isinstance(name, str) and name.startswith("generation:"):
                if name != f"generation:{current}":
                    self._d.pop(name, None)
                    continue
            self._d.put(name, value)
            refreshed += 1
        self._d.put(GENERATION_KEY, current)
        return refreshed


class FileConfigStore:
    """The local config store: one file per name under `folder`, mode 0600 (values may hold
    secrets, e.g. S3 keys), written atomically. Same interface as `DictConfigStore`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def get(self, name: str) -> str | None:
        path = self.folder / _check_name(name)
        return path.read_text() if path.is_file() else None

    def put(self, name: str, value: str) -> None:
        with self._lock:
            write_atomic(self.folder / _check_name(name), value.encode())

    def delete(self, name: str) -> None:
        with self._lock:
            (self.folder / _check_name(name)).unlink(missing_ok=True)

    def generation(self) -> int:
        path = self.folder / GENERATION_KEY
        return int(path.read_text()) if path.is_file() else 0

    def bump_generation(self) -> int:
        with self._lock:
            n = self.generation() + 1
            write_atomic(self.folder / GENERATION_KEY, str(n).encode())
            return n

    def refresh(self) -> int:
        return 0  # files do not expire
