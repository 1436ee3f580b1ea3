"""In-memory STAND-INS for Modal's cloud objects, for tests only.

These are not Modal: the real `modal.Dict`, `modal.Function.spawn` and `modal.FunctionCall` talk
to Modal's servers and need a token, which tests never have. The stand-ins keep the semantics our
code relies on, so code tested against them behaves the same against the cloud:

- `FakeDict`: values are copied through pickle on `put` and on `get` (Modal cloudpickles them),
  so a caller mutating a value after `put`, or a value it got, changes nothing stored;
  `put(key, value, skip_if_exists=True)` writes only when the key is absent and returns whether
  it wrote (Modal's atomic "claim" primitive); every operation is atomic (thread-safe), as each
  is one request to Modal. Not modelled: the 7-day expiry of idle entries and the size limits.
- `FakeFunction.spawn(*args)`: runs the callable on a thread (a container) and returns a
  `FakeFunctionCall`, whose `get(timeout=0)` raises the built-in `TimeoutError` while the call
  runs (as `modal.FunctionCall.get` does), re-raises the call's exception, or returns its result.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

_MISSING = object()


class FakeDict:
    """Stand-in for `modal.Dict` (see the module docstring)."""

    def __init__(self, data: dict | None = None):
        self._data: dict[Any, bytes] = {}
        self._lock = threading.Lock()
        self.puts = 0  # writes done, for tests that count round trips
        for key, value in (data or {}).items():
            self.put(key, value)

    def get(self, key, default=None):
        with self._lock:
            blob = self._data.get(key, _MISSING)
        return default if blob is _MISSING else pickle.loads(blob)

    def put(self, key, value, *, skip_if_exists: bool = False) -> bool:
        blob = pickle.dumps(value)
        with self._lock:
            if skip_if_exists and key in self._data:
                return False
            self._data[key] = blob
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
        with self._lock:
            blob = self._data.pop(key, _MISSING)
        if blob is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return pickle.loads(blob)

    def update(self, mapping=None, **kwargs) -> None:
        blobs = {key: pickle.dumps(value) for key, value in {**dict(mapping or {}), **kwargs}.items()}
        with self._lock:
            self._data.update(blobs)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def keys(self):
        with self._lock:
            return iter(list(self._data))

    def values(self):
        return (value for _, value in self.items())

    def items(self):
        with self._lock:
            snapshot = list(self._data.items())
        return ((key, pickle.loads(blob)) for key, blob in snapshot)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class FakeFunctionCall:
    """Stand-in for `modal.FunctionCall`: the handle `spawn` returns."""

    def __init__(self, target, args, kwargs):
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, target, args, kwargs) -> None:
        try:
            self._result = target(*args, **kwargs)
        except BaseException as exc:  # re-raised by get(), as Modal re-raises the remote exception
            self._error = exc
        finally:
            self._done.set()

    def get(self, timeout: float | None = None):
        """The result; `TimeoutError` (the built-in) while still running after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError("the function call is still running")
        if self._error is not None:
            raise self._error
        return self._result


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
