"""A small app in modal_app's shape (images, env, a snapshotting GPU class, a web function, a
Volume, a Dict) for the tests of the Modal stand-in itself (tests/modal/test_cloud.py): every hook
and input says what it saw."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import modal

from tests.modal.cloud import Crash, Preempted

GPU_ENV = {"TOY_IMAGE": "gpu", "TOY_DATA": "/data"}
WEB_ENV = {"TOY_IMAGE": "web", "TOY_DATA": "/data"}
gpu_image = modal.Image.debian_slim().env(GPU_ENV)
web_image = modal.Image.debian_slim().env(WEB_ENV)

app = modal.App("toy")
data = modal.Volume.from_name("toy-data", create_if_missing=True)
marks = modal.Dict.from_name("toy-marks", create_if_missing=True)  # what happened once, across containers
EVENTS: list[tuple[str, str | None]] = []  # (hook, the secret's value it saw)

WORKER_OPTIONS = dict(image=gpu_image, volumes={"/data": data}, max_containers=2, enable_memory_snapshot=True)


@app.cls(**WORKER_OPTIONS)
class Worker:
    @modal.enter(snap=True)
    def load(self):
        EVENTS.append(("snap=True", os.environ.get("TOY_SECRET")))
        self.loaded = ["weights"]
        self.seen: list[str] = []

    @modal.enter(snap=False)
    def restore(self):
        EVENTS.append(("snap=False", os.environ.get("TOY_SECRET")))

    @modal.method()
    def run(self, what: str) -> dict:
        self.seen.append(what)
        if what in ("crash", "preempt") and marks.put(what, 1, skip_if_exists=True):  # the first delivery dies
            raise Crash() if what == "crash" else Preempted()
        if what == "write":
            with open(os.path.join(os.environ["TOY_DATA"], "note.txt"), "w") as f:
                f.write("hello")
            data.commit()
        if what == "stop":
            modal.experimental.stop_fetching_inputs()
        if what == "long":  # ten seconds in short sleeps; says whether it was interrupted
            EVENTS.append(("long", modal.current_input_id()))
            try:
                for _ in range(1000):
                    time.sleep(0.01)
            except BaseException as exc:
                EVENTS.append(("interrupted", type(exc).__name__))
                raise
        return {"input": modal.current_input_id(), "seen": list(self.seen), "loaded": self.loaded,
                "image": os.environ["TOY_IMAGE"], "shell": os.environ.get("TOY_SHELL"),
                "secret": os.environ.get("TOY_SECRET"),
                "files": sorted(os.listdir(os.environ["TOY_DATA"]))}

    @modal.exit()
    def stop(self):
        EVENTS.append(("exit", None))


@app.function(image=web_image, volumes={"/data": data}, timeout=150)
@modal.concurrent(max_inputs=100)
@modal.asgi_app()
def web():
    from fastapi import FastAPI

    api = FastAPI()
    running = {"now": 0, "most": 0}
    lock = threading.Lock()

    @api.get("/slow")
    async def slow(seconds: float):
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @api.get("/sync")
    def sync_handler():  # on anyio's worker threads
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep(0.2)
        with lock:
            running["now"] -= 1
        return dict(running)

    @api.get("/env")
    def env():
        return {"image": os.environ["TOY_IMAGE"], "secret": os.environ.get("TOY_SECRET")}

    return api
