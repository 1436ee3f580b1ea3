"""A faithful stand-in for the Modal cloud this deployment runs on: the real `modal_app` classes and
functions, run in containers that behave as Modal's do (modal 1.6.4; the facts and their source
lines: ../shared/notes/modal-semantics.md). No account, no network.

- **Containers**: each runs one function (or the GPU class) in its own context: the environment its
  image bakes in (`modal_app.WEB_ENV` / `GPU_ENV`) plus the secret's, never the test process's
  (`os.environ` is swapped for a per-container view); its own view of every Volume it mounts; a
  class's lifecycle hooks run in order.
- **Dicts**: `standins.FakeDict` (atomic `put(skip_if_exists)`, no compare-and-set, a latency per
  round trip, 7-day idle expiry on the cloud's `clock`, a size limit per value).
- **Volumes** (`FakeVolume`): a container sees the committed state as of its start or its last
  `reload()`; its writes reach others only on `commit()`, which also reloads; `reload()` (and the
  reload inside `commit()`) raises `RuntimeError` while the container has a file open on the
  Volume; uncommitted changes may be committed by a reload (`volume.py:912`); `file_count()`.
- **Inputs**: `spawn` returns a `FakeFunctionCall` with an `fc-...` id (`FunctionCall.from_id`
  finds it); each input has an `in-...` id (`modal.current_input_id()`); a container that crashes
  (a test raises `Crash` inside it) or is pre-empted (`Preempted`, after which its `@modal.exit`
  hooks run) dies, and Modal delivers the same input, same id, to a fresh container, up to
  `redeliveries` times, then the call fails. `modal.experimental.stop_fetching_inputs()` ends the
  container after its input.
- **Cancel** (`FunctionCall.cancel(terminate_containers=False)`, `_functions.py:2523`: "cancel the
  FunctionCall and terminate its inputs without retrying"): an input still waiting is taken out of
  the backlog and never runs; a running one is interrupted where it is, as Modal's container does it
  for a class with one input at a time (`_container_entrypoint.py:250-262`: SIGUSR1, whose handler
  raises `modal.exception.InputCancellation`, a BaseException, in the thread running the input; here
  it is raised in the container's thread, so it lands at the input's next bytecode, after a C call
  such as a sleep returns, as a signal handler would). Either way the input is not delivered again
  and `get()` raises `modal.exception.RemoteError` (a TERMINATED result carries no data:
  `_utils/function_utils.py:537-574`). The container stays and takes the next input; with
  `terminate_containers=True` it stops after the cancelled input (its exit hooks run). A call that
  ended is not changed. `call.cancels` records every cancel asked.
- **Snapshots**: for a class with `enable_memory_snapshot`, the `snap=True` hooks run once, in the
  first container; every container after it starts from the object they left (restored: its
  attributes copied, what they hold shared, as one memory image) and runs only the `snap=False`
  hooks. A restore refreshes the environment and nothing else. Each GPU class (`Worker`, and one per
  GPU type SDAPI_MODAL_FAMILY_GPUS routes a family to) has its own snapshot, containers and backlog;
  `cloud.gpus` says which GPU type each asks for.
- **Autoscaling**: at most `max_containers` containers of the class, each taking `max_inputs` (1)
  input at a time; inputs wait in the backlog for a free container.
- **Web** (`web_request` / `web_burst`): the ASGI app built in a web container (its lifespan run),
  at most `max_inputs` requests in flight per web container (more containers start for more), sync
  handlers on anyio's 40 worker threads, and a request past `web_timeout` (150 s) answered with a
  303 to a result URL. A streaming response (server-sent events) comes back whole once the app
  closed it (httpx's ASGI transport collects the body), so a stream test reads streams that end:
  with their `result`, or with the `reconnect` the app sends inside the web function's limits.
  `start_web()` starts one more web container (for a test that sends a client's requests to
  different ones, as Modal's router may).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import ctypes
import itertools
import os
import shutil
import threading
import time
import types
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.modal.standins import CallOutcome, Clock, FakeDict

CURRENT: contextvars.ContextVar[Container | None] = contextvars.ContextVar("modal_container", default=None)
WEB_TIMEOUT = 150.0  # seconds a web request may take before Modal answers 303


class Crash(BaseException):
    """Raised by a test inside a container: the container dies mid-input (no exit hooks run)."""


class Preempted(BaseException):
    """Raised by a test inside a container: Modal pre-empts it (exit hooks run, then it is gone)."""


# --------------------------------------------------------------------------- the environment


class ContainerEnviron(MutableMapping):
    """`os.environ` as the running code sees it: the current container's environment inside a
    container, the test process's outside."""

    def __init__(self, real):
        self.real = real

    def _env(self):
        container = CURRENT.get()
        return container.env if container is not None else self.real

    def __getitem__(self, key):
        return self._env()[key]

    def __setitem__(self, key, value):
        self._env()[key] = value

    def __delitem__(self, key):
        del self._env()[key]

    def __iter__(self):
        return iter(list(self._env()))

    def __len__(self):
        return len(self._env())

    def copy(self) -> dict:
        return dict(self._env())


# --------------------------------------------------------------------------- Volumes


def _stamp(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, info.st_size


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def _prune_empty_dirs(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


class FakeVolume:
    """A Volume: one committed state (`server`), and one view folder per container that mounts it."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.server = root / name / "server"
        self.server.mkdir(parents=True, exist_ok=True)
        self._views_root = root / name / "views"
        self._views: dict[str, tuple[Path, dict[str, tuple]]] = {}  # container id -> (folder, stamps at last sync)
        self._lock = threading.Lock()
        self._generation = 0  # view copies made, for their names
        self.commits = self.reloads = 0

    # --- what a container does
    def commit(self) -> None:
        container = self._container()
        with self._lock:
            self._push(container)
            self.commits += 1
        self._refresh(container)  # commit() also reloads, and fails like a reload on open files

    def reload(self) -> None:
        container = self._container()
        self._check_open_files(container)
        with self._lock:
            self._push(container)  # uncommitted changes may be committed by a reload
        self._refresh(container)
        self.reloads += 1

    # --- the stand-in's side
    def mount(self, container: Container) -> Path:
        folder = self._views_root / container.id
        with self._lock:
            self._views[container.id] = (folder, {})
        self._refresh(container, check=False)
        return folder

    def unmount(self, container: Container) -> None:
        with self._lock:
            folder, _ = self._views.pop(container.id, (None, None))
        if folder is not None:
            folder.unlink(missing_ok=True)
            for generation in self._views_root.glob(f"{container.id}@*"):
                shutil.rmtree(generation, ignore_errors=True)

    def file_count(self) -> int:
        return len(_files(self.server))

    def seed(self, source: Path) -> None:
        """Committed content before the test (what earlier deployments left on the Volume)."""
        shutil.copytree(source, self.server, dirs_exist_ok=True)

    def view(self, container: Container) -> Path:
        return self._views[container.id][0]

    # --- internals
    def _container(self) -> Container:
        container = CURRENT.get()
        if container is None or container.id not in self._views:
            raise RuntimeError(f"Volume {self.name}: commit() and reload() must be called inside a container mounting it")
        return container

    def _check_open_files(self, container: Container) -> None:
        generations = str(self._views[container.id][0]) + "@"  # the folders the view's link has pointed at
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(generations):
                    raise RuntimeError(f"there are open files preventing the operation: {target}")

    def _push(self, container: Container) -> None:
        """The container's changes since its last sync into the committed state (the lock held)."""
        folder, base = self._views[container.id]
        current = _files(folder)
        for rel, path in current.items():
            if base.get(rel) != _stamp(path):
                target = self.server / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        for rel in set(base) - set(current):
            (self.server / rel).unlink(missing_ok=True)
        _prune_empty_dirs(self.server)

    def _refresh(self, container: Container, check: bool = True) -> None:
        """The container's view replaced by the committed state."""
        if check:
            self._check_open_files(container)
        with self._lock:
            folder, _ = self._views[container.id]
            # the view is a link swapped at once to a fresh copy: a reader in the container never sees
            # it half-built, as the files of a real reload never vanish under one (copies before the
            # last two go; a reader still in one has long finished)
            self._generation += 1
            fresh = folder.with_name(f"{folder.name}@{self._generation}")
            shutil.copytree(self.server, fresh, copy_function=os.link)
            link = folder.with_name(f"{folder.name}.link")
            link.unlink(missing_ok=True)
            link.symlink_to(fresh.name)
            os.replace(link, folder)
            copies = sorted(folder.parent.glob(f"{folder.name}@*"), key=lambda p: int(p.name.rsplit("@", 1)[1]))
            for old in copies[:-2]:
                shutil.rmtree(old, ignore_errors=True)
            self._views[container.id] = (folder, {rel: _stamp(path) for rel, path in _files(folder).items()})


# --------------------------------------------------------------------------- calls and inputs


class FakeFunctionCall(CallOutcome):
    """`modal.FunctionCall`: `get(timeout)` raises the built-in TimeoutError while pending or running,
    re-raises the function's exception when it failed, else returns its result. `cancel()` as the
    module docstring says (`cancelled`: it took effect; `input`: the call's one input)."""

    _ids = itertools.count(1)

    def __init__(self, service: Service | None = None):
        super().__init__()
        self.object_id = f"fc-{next(self._ids):06d}"
        self._service = service
        self.input: Input | None = None
        self.cancelled = False
        self.cancels: list[bool] = []  # terminate_containers of every cancel() asked

    def cancel(self, terminate_containers: bool = False) -> None:
        self.cancels.append(terminate_containers)
        if self._service is not None:
            self._service._cancel(self, terminate_containers)
        elif not self._done.is_set():
            self.cancelled = True
            self._finish(error=_terminated(self.object_id))

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, result=None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()


def _terminated(call_id: str) -> BaseException:
    """What `get()` raises for a cancelled call: its result is TERMINATED, without data."""
    import modal.exception

    return modal.exception.RemoteError(f"function call {call_id} was cancelled")


def _input_cancellation() -> type[BaseException]:
    import modal.exception

    return modal.exception.InputCancellation


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc  # a PyDLL function: called with the GIL held
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


def _settle() -> None:
    """A call right after an input left the user code: a cancellation sent as it left lands here
    (a function's entry is where the interpreter raises a pending asynchronous exception), inside
    the delivery's handler, not in the stand-in's own bookkeeping."""


@dataclass(eq=False)  # an input is itself (found in the backlog by identity)
class Input:
    id: str
    args: tuple
    call: FakeFunctionCall
    deliveries: int = 0
    running: bool = False  # in a container's user code now (a cancel interrupts it there)
    thread: int | None = None  # the thread running it
    terminate: bool = False  # cancelled with terminate_containers=True
    cancel_pending: bool = False  # cancelled between the backlog and a container: raised as it starts
    gate: threading.Lock = field(default_factory=threading.Lock)  # one canceller at a time


@dataclass
class Container:
    id: str
    function: str
    env: dict[str, str]
    volumes: dict[str, FakeVolume] = field(default_factory=dict)  # mount path -> volume
    state: Any = None  # a class container's object
    draining: bool = False
    alive: bool = True
    restored: bool = False  # started from the memory snapshot
    inputs: list[str] = field(default_factory=list)  # ids of the inputs it took
    current_input: str | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[Container]:
        token = CURRENT.set(self)
        try:
            yield self
        finally:
            CURRENT.reset(token)


class Service:
    """The containers of one function or class, their autoscaling and their inputs."""

    _container_ids = itertools.count(1)

    def __init__(self, cloud: Cloud, name: str, image_env: dict[str, str], mounts: dict[str, FakeVolume],
                 max_containers: int, run_input: Callable[[Container, Input], Any], start: Callable[[Container], None],
                 stop: Callable[[Container], None] | None = None):
        self.cloud, self.name = cloud, name
        self.image_env, self.mounts = image_env, mounts
        self.max_containers = max_containers
        self.run_input, self.start_container, self.stop_container = run_input, start, stop
        self.containers: list[Container] = []  # ever started
        self._backlog: list[Input] = []
        self._starting = self._waiting = self._alive = 0  # containers starting, idle, alive (any state)
        self._cond = threading.Condition()
        self._input_ids = itertools.count(1)

    # --- what callers do
    def spawn(self, *args) -> FakeFunctionCall:
        call = FakeFunctionCall(self)
        self.cloud.calls[call.object_id] = call
        call.input = Input(f"in-{self.name}-{next(self._input_ids):06d}", args, call)
        self._enqueue(call.input)
        return call

    def remote(self, *args):
        return self.spawn(*args).get(timeout=600)

    # --- the autoscaler: a container per input waiting beyond the idle and starting ones, up to the cap
    def _enqueue(self, item: Input) -> None:
        with self._cond:
            self._backlog.append(item)
            self._scale()
            self._cond.notify_all()

    def _scale(self) -> None:
        """Start containers for the inputs no idle or starting container will take (the lock held)."""
        need = len(self._backlog) - self._waiting - self._starting
        while need > 0 and self._alive < self.max_containers:
            self._alive += 1
            self._starting += 1
            need -= 1
            threading.Thread(target=self._container_loop, daemon=True, name=f"modal-{self.name}").start()

    def _new_container(self) -> Container:
        container = Container(f"ta-{self.name}-{next(self._container_ids):04d}", self.name,
                              env={**self.image_env, **self.cloud.secret_env})
        for path, volume in self.mounts.items():
            container.volumes[path] = volume
            view = volume.mount(container)
            container.env = {k: v.replace(path, str(view)) if v == path or v.startswith(path + "/") else v
                             for k, v in container.env.items()}
        self.containers.append(container)
        return container

    def _container_loop(self) -> None:
        container = self._new_container()
        # a started container moves from `_starting` to `_waiting` under one hold of the lock: in between,
        # `_scale` would count it as neither and start a container too many for a waiting input
        counted = False
        try:
            try:
                with container.active():
                    self.start_container(container)
            except Exception as exc:  # a failing @enter: the container dies, the input it was for fails
                container.alive = False
                with self._cond:
                    self._starting -= 1
                    counted = True
                    item = self._backlog.pop(0) if self._backlog else None
                if item is not None:
                    item.call._finish(error=exc)
                return
            while container.alive:
                with self._cond:
                    if not counted:
                        self._starting -= 1
                        counted = True
                    self._waiting += 1
                    try:
                        while not self._backlog:
                            if not self._cond.wait(self.cloud.scaledown_window):
                                container.alive = False  # idle past the scale-down window
                                break
                    finally:
                        self._waiting -= 1
                    if not container.alive:
                        break
                    item = self._backlog.pop(0)
                self._deliver(container, item)
                if container.draining:
                    container.alive = False
        finally:
            self._retire(container)
            with self._cond:
                if not counted:
                    self._starting -= 1
                self._alive -= 1
                self._scale()  # inputs left waiting for a container

    def _deliver(self, container: Container, item: Input) -> None:
        item.deliveries += 1
        container.inputs.append(item.id)
        container.current_input = item.id
        InputCancellation = _input_cancellation()
        try:
            try:
                with container.active():
                    with item.gate:  # (a C lock: no bytecode runs between its acquire and the body)
                        item.thread, item.running = threading.get_ident(), True
                        cancelled_before = item.cancel_pending
                    if cancelled_before:  # cancelled as it was being taken from the backlog
                        raise InputCancellation("Input was cancelled by user")
                    result = self.run_input(container, item)
            finally:
                with item.gate:
                    item.running = False  # a cancel from here on finds the input ended
                _settle()
            item.call._finish(result=result)
        except InputCancellation:  # cancelled while it ran: its output is TERMINATED, never retried
            item.call._finish(error=_terminated(item.call.object_id))
            if item.terminate:
                container.alive = False
                if self.stop_container:
                    with container.active(), contextlib.suppress(Exception):
                        self.stop_container(container)
        except Preempted:
            container.alive = False
            if self.stop_container:
                with container.active(), contextlib.suppress(Exception):
                    self.stop_container(container)
            self._again(item)
        except Crash:
            container.alive = False
            self._again(item)
        except Exception as exc:  # the function raised: the call fails with its exception
            item.call._finish(error=exc)
        finally:
            container.current_input = None

    def _cancel(self, call: FakeFunctionCall, terminate_containers: bool) -> None:
        """`FunctionCall.cancel()` (see the module docstring)."""
        item = call.input
        with self._cond:
            if call.done:
                return
            call.cancelled = True
            if item in self._backlog:  # waiting for a container (or for its next delivery): it never runs
                self._backlog.remove(item)
                call._finish(error=_terminated(call.object_id))
                return
        exc = ctypes.py_object(_input_cancellation())
        with item.gate:
            item.terminate = item.terminate or terminate_containers
            thread = ctypes.c_ulong(item.thread or 0)
            # the look and the raise with no bytecode between them that lets the input's thread run
            # (the gate held, the GIL kept through the call): the exception is raised in its user code
            if item.running:
                _set_async_exc(thread, exc)
            elif not call.done:  # being handed to a container right now: it is cancelled as it starts
                item.cancel_pending = True

    def _again(self, item: Input) -> None:
        """Modal delivers a pre-empted or crashed input again, same id, to another container."""
        if item.deliveries > self.cloud.redeliveries:
            item.call._finish(error=RuntimeError(f"input {item.id} failed: its container died {item.deliveries} times"))
            return
        self._enqueue(item)

    def _retire(self, container: Container) -> None:
        for volume in container.volumes.values():
            volume.unmount(container)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until no input is queued or running."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if not self._backlog and all(c.current_input is None for c in self.containers):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: inputs still queued or running after {timeout} s")
            time.sleep(0.02)


# --------------------------------------------------------------------------- the deployment


class Cloud:
    """modal_app deployed on the stand-ins. Build with `Cloud.deploy(modal_app, tmp_path, monkeypatch, ...)`."""

    def __init__(self, root: Path, secret_env: dict[str, str], clock: Clock, latency: float, redeliveries: int,
                 scaledown_window: float):
        self.root, self.secret_env, self.clock, self.latency = root, secret_env, clock, latency
        self.redeliveries, self.scaledown_window = redeliveries, scaledown_window
        self.calls: dict[str, FakeFunctionCall] = {}
        self.dicts: dict[str, FakeDict] = {}
        self.volumes: dict[str, FakeVolume] = {}
        self.services: dict[str, Service] = {}
        self.snapshots: dict[str, Any] = {}
        self.web_containers: list[WebContainer] = []
        self.web_max_inputs = 100
        self.web_timeout = WEB_TIMEOUT
        self.schedules: dict[str, float] = {}  # scheduled function -> seconds between its runs
        self.device_requests: list[str] = []  # the devices the engine was asked for, in order
        self.gpus: dict[str, Any] = {}  # GPU class -> the GPU type it asks Modal for
        self.on_snapshot: Callable[[Any], None] | None = None  # called with the object a snapshot holds

    # --- building
    @classmethod
    def deploy(cls, modal_app, root: Path, monkeypatch, secret_env: dict[str, str] | None = None, *,
               latency: float = 0.0, clock: Clock | None = None, redeliveries: int = 3,
               scaledown_window: float = 30.0, max_containers: int | None = None) -> Cloud:
        """Replace modal_app's Modal objects with stand-ins (Dicts, Volumes, the Worker class, the
        functions) and `modal`'s container-side calls with the cloud's. The functions' images,
        volumes and options are read from modal_app's own definitions."""
        import modal
        import modal.experimental
        from modal._partial_function import _find_callables_for_obj, _PartialFunctionFlags
        from modal._utils.async_utils import synchronizer

        cloud = cls(root, secret_env or {}, clock or Clock(), latency, redeliveries, scaledown_window)
        # a second deployment in one test starts from modal_app's real objects (and takes modal_app over)
        originals = dict(getattr(modal_app, "_cloud_originals", {}))
        for name, value in originals.items():
            monkeypatch.setattr(modal_app, name, value)

        def replace(name: str, value) -> None:
            originals.setdefault(name, getattr(modal_app, name))
            monkeypatch.setattr(modal_app, name, value)

        inner = synchronizer._translate_in
        gpu_image = inner(modal_app.gpu_image)
        volume_names = {id(inner(value)): name for name, value in vars(modal_app).items() if isinstance(value, modal.Volume)}
        classes = {name: value for name, value in vars(modal_app).items() if isinstance(value, modal.Cls)}
        for value in classes.values():
            concurrency = value._get_class_service_function().info().concurrency_info
            assert concurrency is None or concurrency.max_inputs == 1, "the stand-in runs one input per class container"
        functions = {name: value for name, value in vars(modal_app).items()
                     if isinstance(value, modal.Function) and value._get_source_info().raw_f is not None}

        monkeypatch.setattr(os, "environ", ContainerEnviron(os.environ))
        monkeypatch.setattr(time, "time", cloud.clock.now)  # the cloud's wall clock (`clock.advance` moves it)
        for name, value in list(vars(modal_app).items()):
            if isinstance(value, modal.Dict):
                cloud.dicts[name] = FakeDict(clock=cloud.clock, latency=latency)
                replace(name, cloud.dicts[name])
            elif isinstance(value, modal.Volume):
                cloud.volumes[name] = FakeVolume(name, root / "volumes")
                replace(name, cloud.volumes[name])

        def mounts_of(spec) -> dict[str, FakeVolume]:
            return {path: cloud.volumes[volume_names[id(volume)]] for path, volume in spec.volumes.items()}

        def env_of(spec) -> dict[str, str]:
            env = dict(modal_app.GPU_ENV if spec.image is gpu_image else modal_app.WEB_ENV)
            if max_containers:  # as if deployed with SDAPI_MODAL_MAX_CONTAINERS: the images bake the same ceiling
                env["SDAPI_MODAL_MAX_CONTAINERS"] = str(max_containers)
            return env

        # the GPU classes (`Worker`, and one per GPU type a family is routed to): their lifecycle hooks as the
        # container runtime finds them, a memory snapshot of each
        options = modal_app.WORKER_OPTIONS
        snapshot = bool(options.get("enable_memory_snapshot"))

        def hooks(obj, flag) -> list[Callable]:
            return list(_find_callables_for_obj(obj, flag).values())

        def start_worker(container: Container, name: str, user_cls: type) -> None:
            if snapshot and name in cloud.snapshots:  # restored from the snapshot: snap=False hooks only
                obj = restore_copy(cloud.snapshots[name], own=("infra.", modal_app.__name__))
                container.restored = True
            else:
                obj = user_cls()
                for hook in hooks(obj, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT):
                    hook()
                if snapshot:  # the memory image as the hooks left it, before any input
                    cloud.snapshots[name] = restore_copy(obj, own=("infra.", modal_app.__name__))
                    if cloud.on_snapshot is not None:
                        cloud.on_snapshot(obj)
            for hook in hooks(obj, _PartialFunctionFlags.ENTER_POST_SNAPSHOT):
                hook()
            container.state = obj

        def stop_worker(container: Container) -> None:
            for hook in hooks(container.state, _PartialFunctionFlags.EXIT):
                hook()

        def run_method(container: Container, item: Input):
            method, *args = item.args
            return _find_callables_for_obj(container.state, _PartialFunctionFlags.CALLABLE_INTERFACE)[method](*args)

        for name, value in classes.items():
            class_fn, user_cls = value._get_class_service_function(), value._get_user_cls()
            cloud.gpus[name] = class_fn._spec_.gpus
            cloud.services[name] = Service(
                cloud, name, env_of(class_fn._spec_), mounts_of(class_fn._spec_),
                max_containers or options["max_containers"], run_method,
                lambda container, name=name, user_cls=user_cls: start_worker(container, name, user_cls), stop_worker,
            )
            replace(name, _ClsHandle(cloud.services[name], class_fn.info().method_names))
        # the functions: every one but the web one runs its raw body in a container per input
        for name, function in functions.items():
            raw = function._get_source_info().raw_f
            if function.info().schedule is not None:
                cloud.schedules[name] = schedule_seconds(function.info().schedule)
            if name == "web":
                cloud._web = (raw, env_of(function._spec_), mounts_of(function._spec_))
                concurrency = function.info().concurrency_info
                cloud.web_max_inputs = concurrency.max_inputs if concurrency else 1
                continue
            cloud.services[name] = Service(cloud, name, env_of(function._spec_), mounts_of(function._spec_), 10,
                                           lambda container, item, raw=raw: raw(*item.args), lambda container: None)
            replace(name, _FunctionHandle(cloud.services[name], raw))
        # a GPU container here has no GPU: the engine's devices resolve to the CPU (and its dtype with them)
        import torch

        from infra.engine import engine as engine_module

        def resolve_device(name: str):
            cloud.device_requests.append(name)
            return torch.device("cpu")

        monkeypatch.setattr(engine_module, "resolve_device", resolve_device)
        # what code inside a container asks Modal
        monkeypatch.setattr(modal, "current_input_id", lambda: getattr(CURRENT.get(), "current_input", None))
        monkeypatch.setattr(modal.experimental, "stop_fetching_inputs", cloud._stop_fetching_inputs)
        monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(cloud.call))
        monkeypatch.setattr(modal_app, "_cloud_originals", originals, raising=False)
        return cloud

    # --- what tests (and code in containers) ask
    def call(self, call_id: str) -> FakeFunctionCall:
        return self.calls[call_id]

    def service(self, name: str) -> Service:
        return self.services[name]

    def run(self, function: str, *args):
        """Run a function (the cron's, the downloader's) once in a fresh container and wait for it."""
        return self.services[function].remote(*args)

    def _stop_fetching_inputs(self) -> None:
        container = CURRENT.get()
        if container is not None:
            container.draining = True

    def containers(self, function: str) -> list[Container]:
        if function == "web":
            return [web.container for web in self.web_containers]
        return self.services[function].containers

    # --- the web tier
    def web(self) -> WebContainer:
        """A web container with a free request slot (a new one when every one is full)."""
        for web in self.web_containers:
            if web.in_flight < self.web_max_inputs:
                return web
        return self._start_web()

    def start_web(self) -> WebContainer:
        """One more web container (Modal's router may send a client's next request to any of them)."""
        return self._start_web()

    def _start_web(self) -> WebContainer:
        raw, env, mounts = self._web
        container = Container(f"ta-web-{len(self.web_containers) + 1:04d}", "web", env={**env, **self.secret_env})
        for path, volume in mounts.items():
            container.volumes[path] = volume
            view = volume.mount(container)
            container.env = {k: v.replace(path, str(view)) if v == path or v.startswith(path + "/") else v
                             for k, v in container.env.items()}
        web = WebContainer(self, container, raw)
        self.web_containers.append(web)
        return web

    def web_request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request through the web tier (blocking)."""
        web = self.web()
        return web.run(web.request(method, path, **kwargs))

    def web_burst(self, requests: list[tuple[str, str, dict]]) -> list[tuple[float, httpx.Response]]:
        """Send `requests` at once, `web_max_inputs` per web container as Modal's router admits them
        (more containers start for more): (seconds to the answer, the answer) for each."""
        needed = max(1, -(-len(requests) // self.web_max_inputs))
        while len(self.web_containers) < needed:
            self._start_web()
        futures = []
        for i, (method, path, kwargs) in enumerate(requests):
            web = self.web_containers[i % needed]
            futures.append(asyncio.run_coroutine_threadsafe(web.timed(method, path, **kwargs), web.loop))
        return [future.result(timeout=900) for future in futures]

    def close(self) -> None:
        for web in self.web_containers:
            web.close()
        for service in self.services.values():
            with service._cond:
                service._backlog.clear()
                service._cond.notify_all()


def restore_copy(obj, memo: dict | None = None, own: tuple[str, ...] = ("infra.", "modal_app")):
    """A container's own copy of the memory a snapshot holds: the deployment's objects (those of
    `infra` and the app's module: `own`) and the dicts, lists and locks they hold are copied; what libraries
    built (models, tensors, pipelines) and the cloud's own objects (Dicts, Volumes) are shared, as
    one restored memory image would hold them unchanged."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    kind = type(obj)
    if kind in (dict, OrderedDict, defaultdict):
        new = memo[id(obj)] = copy.copy(obj)
        new.clear()
        for key, value in obj.items():
            new[key] = restore_copy(value, memo, own)
        return new
    if kind is list:
        new = memo[id(obj)] = []
        new.extend(restore_copy(value, memo, own) for value in obj)
        return new
    if isinstance(obj, types.MethodType):  # a method of a copied object is the copy's method
        return types.MethodType(obj.__func__, restore_copy(obj.__self__, memo, own))
    if isinstance(obj, threading.Event):
        new = memo[id(obj)] = threading.Event()
        if obj.is_set():
            new.set()
        return new
    if isinstance(obj, threading.Condition):
        new = memo[id(obj)] = threading.Condition()
        return new
    if kind is type(threading.Lock()):
        new = memo[id(obj)] = threading.Lock()
        return new
    if kind is type(threading.RLock()):
        new = memo[id(obj)] = threading.RLock()
        return new
    module = getattr(kind, "__module__", "") or ""
    if module.startswith(own) and hasattr(obj, "__dict__") and not isinstance(obj, type):
        new = memo[id(obj)] = copy.copy(obj)
        for name, value in list(vars(obj).items()):
            object.__setattr__(new, name, restore_copy(value, memo, own))
        return new
    return obj


def schedule_seconds(schedule: str) -> float:
    """Seconds between the runs of a function's schedule as `Function.info()` gives it:
    "Period(minutes=2)" or "Cron('17 * * * *', UTC)" (a cron's minute and hour fields read)."""
    import re

    if schedule.startswith("Period("):
        units = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400, "weeks": 604800, "months": 2592000}
        return sum(units[name] * float(value) for name, value in re.findall(r"(\w+)=([\d.]+)", schedule))
    minute, hour = re.search(r"Cron\('([^']+)'", schedule).group(1).split()[:2]
    if minute.startswith("*/"):
        return 60 * int(minute[2:])
    if minute == "*":
        return 60
    return 3600 if hour == "*" else 86400


class _Method:
    def __init__(self, service: Service, name: str):
        self.service, self.name = service, name

    def spawn(self, *args) -> FakeFunctionCall:
        return self.service.spawn(self.name, *args)

    def remote(self, *args):
        return self.service.remote(self.name, *args)


class _ClsHandle:
    """`modal_app.Worker` on the cloud: `Worker().run.spawn(job_id)`."""

    def __init__(self, service: Service, methods: list[str]):
        self.service, self.methods = service, methods

    def __call__(self):
        return type("Instance", (), {name: _Method(self.service, name) for name in self.methods})()


class _FunctionHandle:
    def __init__(self, service: Service, raw: Callable):
        self.service, self.raw = service, raw

    def spawn(self, *args) -> FakeFunctionCall:
        return self.service.spawn(*args)

    def remote(self, *args):
        return self.service.remote(*args)

    def local(self, *args):
        return self.raw(*args)


class WebContainer:
    """A web container: the app built by modal_app.web in the container's context, its lifespan
    running, served from an event loop thread that carries the container's context."""

    def __init__(self, cloud: Cloud, container: Container, raw: Callable):
        self.cloud, self.container = cloud, container
        self.in_flight = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._stop: asyncio.Event | None = None

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._lifespan(raw, ready))

        context = contextvars.copy_context()
        context.run(CURRENT.set, container)
        self.thread = threading.Thread(target=context.run, args=(serve,), daemon=True, name=container.id)
        self.thread.start()
        if not ready.wait(60):
            raise AssertionError("the web container did not start")

    async def _lifespan(self, raw: Callable, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        self.app = raw()
        async with self.app.router.lifespan_context(self.app):
            self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="https://web.modal.run")
            ready.set()
            await self._stop.wait()
            await self.client.aclose()

    async def timed(self, method: str, path: str, **kwargs) -> tuple[float, httpx.Response]:
        CURRENT.set(self.container)
        started = time.monotonic()
        response = await self.request(method, path, **kwargs)
        return time.monotonic() - started, response

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        CURRENT.set(self.container)  # (a coroutine sent from another thread runs in that thread's context)
        self.in_flight += 1
        try:
            task = asyncio.ensure_future(self.client.request(method, path, **kwargs))
            try:
                return await asyncio.wait_for(asyncio.shield(task), self.cloud.web_timeout)
            except TimeoutError:
                return httpx.Response(303, headers={"Location": f"{path}?__modal_function_call_id=fc-web"})
        finally:
            self.in_flight -= 1

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=600)

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
