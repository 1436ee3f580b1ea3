"""In-memory STAND-INS for Modal's cloud objects, for tests only (the containers that run
modal_app's functions on them: tests/modal/cloud.py).

These are not Modal: the real `modal.Dict`, `modal.Function.spawn` and `modal.FunctionCall` talk
to Modal's servers and need a token, which tests never have. The stand-ins keep the semantics the
code must survive (modal 1.6.4; ../shared/notes/modal-semantics.md), so code tested against them
behaves the same against the cloud:

- `FakeDict`: values are copied through pickle on `put` and on `get` (Modal cloudpickles them),
  so a caller mutating a value after `put`, or a value it got, changes nothing stored;
  `put(key, value, skip_if_exists=True)` writes only when the key is absent and returns whether
  it wrote (Modal's one atomic "claim" primitive; there is no compare-and-set); every operation is
  atomic (thread-safe) and one round trip, which can cost `latency` seconds; an entry expires 7
  days (on `clock`) after its last read or write (`dict.py:265`); a value over `max_value_bytes`
  is refused with `RequestSizeError` (`dict.py:568`).
- `FakeFunction.spawn(*args)`: runs the callable on a thread (a container) and returns a
  `FakeFunctionCall`, whose `get(timeout=0)` raises the built-in `TimeoutError` while the call
  runs (as `modal.FunctionCall.get` does), re-raises the call's exception, or returns its result.
"""

from __future__ import annotations

import itertools
import pickle
import threading
import time
from typing import Any

_MISSING = object()
IDLE_EXPIRY_SECONDS = 7 * 24 * 3600  # a Dict entry not read or written for this long is gone
MAX_VALUE_BYTES = 64 * 1024 * 1024  # (Modal answers a too-large put with HTTP 413: RequestSizeError)


class RequestSizeError(Exception):
    """modal.exception.RequestSizeError: a Dict value too large for one request."""


_real_time = time.time  # the clock before a cloud made `time.time` its own


class Clock:
    """The stand-ins' time: the real clock, moved forward by `advance` (Dict expiry, 8 idle days).
    A deployment on tests/modal/cloud.py makes it `time.time` for everything it runs, so advancing
    it is time passing for the whole cloud (its Dicts, its jobs, its scheduled passes)."""

    def __init__(self):
        self.offset = 0.0

    def now(self) -> float:
        return _real_time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class FakeDict:
    """Stand-in for `modal.Dict` (see the module docstring)."""

    def __init__(self, data: dict | None = None, *, clock: Clock | None = None, latency: float = 0.0,
                 max_value_bytes: int = MAX_VALUE_BYTES):
        self._data: dict[Any, tuple[bytes, float]] = {}  # key -> (pickled value, last touched)
        self._lock = threading.Lock()
        self.clock = clock or Clock()
        self.latency, self.max_value_bytes = latency, max_value_bytes
        self.puts = 0  # writes done, for tests that count round trips
        self.calls = 0  # round trips
        for key, value in (data or {}).items():
            self.put(key, value)

    # --- one round trip each
    def _trip(self) -> float:
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            self.calls += 1
        return self.clock.now()

    def _live(self, key, now: float):
        """The blob of a live entry (touching it), or _MISSING; an expired entry is dropped."""
        entry = self._data.get(key, _MISSING)
        if entry is _MISSING:
            return _MISSING
        blob, touched = entry
        if now - touched > IDLE_EXPIRY_SECONDS:
            del self._data[key]
            return _MISSING
        self._data[key] = (blob, now)
        return blob

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, touched) in self._data.items() if now - touched > IDLE_EXPIRY_SECONDS]:
            del self._data[key]

    def get(self, key, default=None):
        now = self._trip()
        with self._lock:
            blob = self._live(key, now)
        return default if blob is _MISSING else pickle.loads(blob)

    def put(self, key, value, *, skip_if_exists: bool = False) -> bool:
        blob = pickle.dumps(value)
        if len(blob) > self.max_value_bytes:
            raise RequestSizeError("Dict.put request is too large")
        now = self._trip()
        with self._lock:
            if skip_if_exists and self._live(key, now) is not _MISSING:
                return False
            self._data[key] = (blob, now)
            self.puts += 1
            return True

    def __setitem__(self, key, value) -> None:
        self.put(key, value)

    def __getitem__(self, key):
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def pop(self, key, default=_MISSING):
        now = self._trip()
        with self._lock:
            blob = self._live(key, now)
            self._data.pop(key, None)
        if blob is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return pickle.loads(blob)

    def update(self, mapping=None, **kwargs) -> None:
        blobs = {key: pickle.dumps(value) for key, value in {**dict(mapping or {}), **kwargs}.items()}
        now = self._trip()
        with self._lock:
            self._data.update({key: (blob, now) for key, blob in blobs.items()})

    def __contains__(self, key) -> bool:
        now = self._trip()
        with self._lock:
            return self._live(key, now) is not _MISSING

    def __len__(self) -> int:
        now = self._trip()
        with self._lock:
            self._expire(now)
            return len(self._data)

    def len(self) -> int:
        return len(self)

    def keys(self):
        now = self._trip()
        with self._lock:
            self._expire(now)
            return iter(list(self._data))

    def values(self):
        return (value for _, value in self.items())

    def items(self):
        """One streaming round trip; iterating does not count as reading an entry."""
        now = self._trip()
        with self._lock:
            self._expire(now)
            snapshot = [(key, blob) for key, (blob, _) in self._data.items()]
        return ((key, pickle.loads(blob)) for key, blob in snapshot)

    def clear(self) -> None:
        self._trip()
        with self._lock:
            self._data.clear()


class CallOutcome:
    """What a `modal.FunctionCall` hands back, shared by this module's handle and the cloud's
    (tests/modal/cloud.py): `get(timeout)` raises the built-in TimeoutError while it runs,
    re-raises the function's exception when it failed, else returns its result."""

    def __init__(self):
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def get(self, timeout: float | None = None):
        if not self._done.wait(timeout):
            raise TimeoutError("the function call is still running")
        if self._error is not None:
            raise self._error
        return self._result


class FakeFunctionCall(CallOutcome):
    """Stand-in for `modal.FunctionCall`: the handle `spawn` returns."""

    _ids = itertools.count(1)

    def __init__(self, target, args, kwargs):
        super().__init__()
        self.object_id = f"fc-standin-{next(self._ids):06d}"
        self.cancels: list[bool] = []
        self._thread = threading.Thread(target=self._run, args=(target, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, target, args, kwargs) -> None:
        try:
            self._result = target(*args, **kwargs)
        except BaseException as exc:  # re-raised by get(), as Modal re-raises the remote exception
            self._error = exc
        finally:
            self._done.set()

    def cancel(self, terminate_containers: bool = False) -> None:
        """Recorded only (`cancels`): this call started on its thread at once, so nothing waits to
        be taken out, and a thread is not interrupted (the containers' stand-in, tests/modal/cloud.py,
        does what Modal does)."""
        self.cancels.append(terminate_containers)


class FakeFunction:
    """Stand-in for a Modal function or method: `.spawn(*args)` runs it on a thread; `.calls`
    keeps every spawned call with its arguments."""

    def __init__(self, target):
        self.target = target
        self.calls: list[tuple[tuple, FakeFunctionCall]] = []
        self._lock = threading.Lock()

    def spawn(self, *args, **kwargs) -> FakeFunctionCall:
        call = FakeFunctionCall(self.target, args, kwargs)
        with self._lock:
            self.calls.append((args, call))
        return call

    def local(self, *args, **kwargs):
        return self.target(*args, **kwargs)
