"""Load on loopback: a real server process (uvicorn, `python -m infra.cli serve`) takes 200
concurrent text2img requests with the tiny model. No job is lost: every request gets an id, every
id is fetchable to `success`, every output downloads and every webhook reaches a loopback receiver
with a valid signature. Then the faults: a receiver that is down while the jobs finish gets its
webhooks once it is back (retried); an S3 endpoint that stops mid-load fails the jobs it catches
with a clear message, and none is left `processing`."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import pytest

from infra.jobs.webhooks import verify
from tests.conftest import KEY, free_port, start_moto
from tests.conftest import ServerProcess as Server

pytestmark = pytest.mark.slow  # the CI command runs slow tests too

SECRET = "load-test-webhook-secret"
TERMINAL = {"success", "failed"}


class Receiver:
    """A webhook receiver on a fixed loopback port, which can be started late (down until then)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[tuple[dict, bytes]] = []  # (headers, body)
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> Receiver:
        received, lock = self.received, self._lock

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    received.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def by_track_id(self) -> dict[str, list[dict]]:
        """Payloads per track_id, one per event (a retry of a delivery that did arrive is the same
        X-Webhook-Id and the same bytes: at least once, de-duplicated as a receiver would), each
        checked: signed with the secret, JSON, a finished job's envelope."""
        with self._lock:
            items = list(self.received)
        events: dict[str, bytes] = {}
        for headers, body in items:
            assert verify(SECRET, headers["X-Webhook-Timestamp"], body, headers["X-Webhook-Signature"]), headers
            assert events.setdefault(headers["X-Webhook-Id"], body) == body
        payloads: dict[str, list[dict]] = {}
        for body in events.values():
            payload = json.loads(body)
            assert payload["status"] in TERMINAL and isinstance(payload["id"], int), payload
            payloads.setdefault(payload["track_id"], []).append(payload)
        return payloads


@pytest.fixture
def start_server(models_dir, tmp_path):
    """start_server(**settings) -> a server process on a copy of the tiny models, stopped afterwards."""
    servers = []
    shutil.copytree(models_dir, tmp_path / "models")

    def start(**settings) -> Server:
        defaults = dict(
            workers=2, torch_threads=1, sync_timeout=1, fetch_allowlist="127.0.0.1,localhost",
            webhook_secret=SECRET, cleanup_interval=0, safety_checker_default="false",
        )
        server = Server(tmp_path / f"data{len(servers)}", tmp_path / "models", **{**defaults, **settings})
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def t2i(webhook: str, track_id: str) -> dict:
    return {"key": KEY, "prompt": "a red bench", "width": 32, "height": 32, "steps": 1, "samples": 1,
            "safety_checker": "no", "enhance_prompt": "no", "webhook": webhook, "track_id": track_id}


def submit_all(server: Server, bodies: list[dict], concurrency: int) -> list[dict]:
    """POST every body at once from `concurrency` threads; the JSON answers in order."""
    with httpx.Client(base_url=server.base, timeout=120,
                      limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)) as http:
        def post(body: dict) -> dict:
            response = http.post("/api/v1/enterprise/text2img", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(post, bodies))


def fetch_until_terminal(server: Server, ids: list[int], timeout: float) -> dict[int, dict]:
    """fetch every id until each is `success` or `failed`; the last answers by id."""
    results: dict[int, dict] = {}
    pending = set(ids)
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.base, timeout=30) as http:
        while pending:
            for job_id in sorted(pending):
                result = http.post("/api/v1/enterprise/fetch", json={"key": KEY, "request_id": job_id}).json()
                assert result["status"] in TERMINAL | {"processing"}, result
                results[job_id] = result
                if result["status"] in TERMINAL:
                    pending.discard(job_id)
            if pending:
                assert time.monotonic() < deadline, f"{len(pending)} job(s) still processing: {sorted(pending)[:10]}"
                time.sleep(0.5)
    return results


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_200_concurrent_requests_lose_no_job_and_deliver_every_webhook(start_server):
    receiver = Receiver().start()
    try:
        server = start_server()
        count = 200
        started = time.monotonic()
        answers = submit_all(server, [t2i(receiver.url, f"load-{n}") for n in range(count)], concurrency=count)

        # every request answered with a job: `success` (done within the sync wait) or `processing`
        assert Counter(a["status"] for a in answers).keys() <= {"success", "processing"}, Counter(
            a["status"] for a in answers)
        ids = [a["id"] for a in answers]
        assert all(isinstance(i, int) for i in ids)
        assert len(set(ids)) == count  # no id handed out twice

        results = fetch_until_terminal(server, ids, timeout=240)
        assert Counter(r["status"] for r in results.values()) == {"success": count}, [
            r for r in results.values() if r["status"] != "success"][:3]

        # every output is there; fetch answers with the links the request was promised
        with httpx.Client(timeout=30) as http:
            for answer in answers:
                result = results[answer["id"]]
                promised = answer["output"] if answer["status"] == "success" else answer["future_links"]
                assert result["output"] == promised
                [link] = result["output"]
                response = http.get(link)
                assert response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n", link

        # every job's webhook delivered (each job's `webhook_status` says so too)
        wait_for(lambda: len(receiver.received) >= count, 60, f"{len(receiver.received)} of {count} webhooks")
        time.sleep(0.5)  # nothing more (no duplicates) arrives
        payloads = receiver.by_track_id()
        assert sorted(payloads) == sorted(f"load-{n}" for n in range(count))
        for n, answer in enumerate(answers):
            [payload] = payloads[f"load-{n}"]
            assert payload["id"] == answer["id"] and payload["status"] == "success"
            assert payload["output"] == results[answer["id"]]["output"]
        with httpx.Client(base_url=server.base, timeout=30) as http:
            statuses = Counter(
                http.post("/api/v1/enterprise/fetch", json={"key": KEY, "request_id": i}).json()["webhook_status"]
                for i in ids
            )
        assert sum(n for status, n in statuses.items() if status.startswith("delivered")) == count, statuses
        assert server.post("system_details")["queue_num"] == 0  # nothing left queued or running
        print(f"200 jobs: {time.monotonic() - started:.1f}s from the first request to the last webhook")
    finally:
        receiver.stop()


def test_a_receiver_down_during_the_load_gets_its_webhooks_when_it_is_back(start_server):
    """The receiver's port is closed while the jobs finish; the sender retries (backoff 0.25 s,
    doubling) and every webhook lands once it is up again."""
    receiver = Receiver()  # not started: connection refused
    try:
        server = start_server(webhook_attempts=8, webhook_backoff=0.25)
        count = 20
        answers = submit_all(server, [t2i(receiver.url, f"down-{n}") for n in range(count)], concurrency=count)
        ids = [a["id"] for a in answers]
        results = fetch_until_terminal(server, ids, timeout=120)
        assert Counter(r["status"] for r in results.values()) == {"success": count}
        # all done, none delivered: every job's webhook is waiting for a retry
        with httpx.Client(base_url=server.base, timeout=30) as http:
            def webhook_status(job_id):
                return http.post("/api/v1/enterprise/fetch", json={"key": KEY, "request_id": job_id}).json()[
                    "webhook_status"]

            assert all(webhook_status(i).startswith(("pending", "retrying")) for i in ids)
            receiver.start()
            wait_for(lambda: len(receiver.received) >= count, 90, f"{len(receiver.received)} of {count} webhooks")
            wait_for(lambda: all(webhook_status(i).startswith("delivered") for i in ids), 30, "webhook_status")
            assert any(webhook_status(i) != "delivered" for i in ids)  # "delivered after n attempts": retried
        time.sleep(0.5)
        payloads = receiver.by_track_id()
        assert sorted(payloads) == sorted(f"down-{n}" for n in range(count))
        assert all(len(p) == 1 and p[0]["status"] == "success" for p in payloads.values())
    finally:
        receiver.stop()


def test_an_s3_endpoint_that_stops_mid_load_fails_jobs_with_a_message_and_strands_none(start_server):
    """Outputs go to S3 (moto on loopback); the endpoint stops while jobs run. Each job ends
    `success` (stored before the stop) or `failed` saying its output could not be stored; none
    stays `processing`, and each one's webhook says the same as fetch."""
    moto, endpoint = start_moto()
    stopped = False
    receiver = Receiver().start()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="a",
                     aws_secret_access_key="a").create_bucket(Bucket="out")
        server = start_server()
        s3 = {"public_url": f"{endpoint}/out", "region_name": "us-east-1", "endpoint_url": endpoint,
              "aws_access_key_id": "a", "aws_secret_access_key": "secret-s3-key", "image_directory": "gen",
              "bucket": "out"}
        assert server.post("update_s3", **s3)["status"] == "success"
        count = 20
        bodies = [{**t2i(receiver.url, f"s3-{n}"), "instant_response": "yes"} for n in range(count)]
        answers = submit_all(server, bodies, concurrency=count)
        ids = [a["id"] for a in answers]
        with httpx.Client(base_url=server.base, timeout=30) as http:
            # stop the endpoint once some jobs are done and others still queued
            def done() -> int:
                return sum(http.post("/api/v1/enterprise/fetch", json={"key": KEY, "request_id": i}).json()["status"]
                           in TERMINAL for i in ids)

            wait_for(lambda: done() >= 3, 60, "no job finished")
        moto.stop()
        stopped = True
        # and more load after the stop: these cannot be stored anywhere
        late = submit_all(server, [{**t2i(receiver.url, f"s3-{count + n}"), "instant_response": "yes"}
                                   for n in range(10)], concurrency=10)
        answers += late
        ids += [a["id"] for a in late]
        results = fetch_until_terminal(server, ids, timeout=120)
        outcome = Counter(r["status"] for r in results.values())
        assert outcome["success"] >= 3 and outcome["failed"] >= len(late), outcome
        assert all(results[a["id"]]["status"] == "failed" for a in late)
        for result in results.values():
            if result["status"] == "failed":
                assert "could not be stored" in result["message"], result
                assert "secret-s3-key" not in json.dumps(result)
        wait_for(lambda: len(receiver.received) >= len(ids), 60, f"{len(receiver.received)} of {len(ids)} webhooks")
        payloads = receiver.by_track_id()
        for n, answer in enumerate(answers):
            [payload] = payloads[f"s3-{n}"]
            assert payload["status"] == results[answer["id"]]["status"]
    finally:
        receiver.stop()
        if not stopped:
            moto.stop()
