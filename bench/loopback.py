"""A minimal HTTP/1.1 keep-alive client over loopback (sync for latency, asyncio for load), so
the client's own cost stays small next to the server's on a shared 2-core machine; and the bench
server: the real app under uvicorn, started in a child process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from bench.common import PYTHON, ROOT, free_port

KEY = "enterprise_api_key"


def _request(host: str, path: str, body: bytes | None) -> bytes:
    method = "POST" if body is not None else "GET"
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body or b'')}\r\n\r\n"
    return head.encode() + (body or b"")


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("response without Content-Length")


class Connection:
    """One keep-alive connection; `post` returns (status, parsed JSON body)."""

    def __init__(self, port: int):
        self.host = f"127.0.0.1:{port}"
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def call(self, path: str, payload: dict | None = None) -> tuple[int, dict]:
        body = json.dumps(payload).encode() if payload is not None else None
        self.sock.sendall(_request(self.host, path, body))
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = _content_length(head)
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        return int(head.split(b" ", 2)[1]), json.loads(rest[:length])

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


async def load(port: int, path: str, payload: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` keep-alive connections sending the same request back to back for `seconds`:
    requests per second, and how many answered something other than 200."""
    body = _request(f"127.0.0.1:{port}", path, json.dumps(payload).encode())
    done, errors = 0, 0
    deadline = time.perf_counter() + seconds

    async def client():
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                writer.write(body)
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(_content_length(head))
                done += 1
                errors += not head.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"requests": done, "errors": errors, "seconds": round(elapsed, 3), "rps": round(done / elapsed, 1)}


class BenchServer:
    """`python -m bench.server` (the real app under uvicorn, with the engine's time per job
    recorded) in a child process on a free loopback port; a context manager."""

    def __init__(self, data_dir: Path, models_dir: Path, root: Path = ROOT, **settings):
        self.port = free_port()
        self.root = root  # the source tree the server runs from (another checkout for before/after)
        self.data_dir, self.models_dir, self.settings = data_dir, models_dir, settings
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> BenchServer:
        env = {**os.environ, **{f"SDAPI_{k.upper()}": str(v) for k, v in self.settings.items()}}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "bench.server", str(self.port), str(self.data_dir), str(self.models_dir)],
            cwd=self.root, env={**env, "PYTHONPATH": str(self.root)}, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bench server exited: {(self.data_dir / 'server.log').read_text()[-3000:]}")
            try:
                conn = Connection(self.port)
                status, stats = conn.call("/bench/stats")
                conn.close()
                if status == 200 and stats["engine_ready"]:
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("bench server did not start")

    def stats(self) -> dict:
        conn = Connection(self.port)
        try:
            return conn.call("/bench/stats")[1]
        finally:
            conn.close()

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
