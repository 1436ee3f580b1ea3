"""Webhook delivery: when a job ends, POST its ModelsLab payload (the success body, or
`{status: failed, id, message}`, each with `track_id`) to the job's `webhook`; model loads post
their event the same way.

What a receiver can rely on:

* The body is exactly the ModelsLab payload (JSON, serialised once; every attempt sends the same
  bytes). Our extras travel in headers:
  `X-Webhook-Id` (the event's id, the same on every retry of it: de-duplicate on it),
  `X-Webhook-Timestamp` (unix seconds of this attempt), `X-Webhook-Attempt` (1, 2, ...) and
  `X-Webhook-Signature: sha256=<hex>`, the HMAC-SHA256 of `f"{timestamp}.{body}"` with the
  webhook secret. `verify` is the receiver's check.
* Timeouts, connection errors, HTTP 5xx and 429 are retried, up to `webhook_attempts` attempts,
  `webhook_backoff * 2**(n-1)` seconds (+-25 % jitter) apart; a longer `Retry-After` on a 429 or
  503 is honoured (capped at `RETRY_AFTER_CAP`). Any other answer but 2xx (4xx, 3xx) means the
  receiver refused it: not retried.
* A job's events (`webhook_events`: queued, started, progress, completed) go out one at a time, in
  the order they happened; only a retried event can arrive after a later one.
* The outcome is recorded on the job as `webhook_status` (shown by fetch): `pending`,
  `retrying: attempt 2 of 5 after HTTP 500`, `delivered` / `delivered after 3 attempts`,
  `failed: gave up after 5 attempts: HTTP 500`, `failed: HTTP 404 (not retried)`.

Nothing here blocks a worker: `job_finished` only queues. Deliveries wait in one timed heap
(a pending retry holds no thread) and a few sender threads take them as they fall due, so one
dead receiver occupies at most one sender for `webhook_timeout` seconds per attempt while the
others keep delivering.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from infra.jobs.progress import wire
from infra.jobs.store import Job
from infra.net import fetcher
from models.responses import job_response

log = logging.getLogger(__name__)

SENDERS = 4  # deliveries in flight at once (each one a thread while its POST runs)
RETRY_AFTER_CAP = 300.0  # seconds: the longest `Retry-After` we wait for
SIGNATURE_TOLERANCE = 300  # seconds: how old a timestamp `verify` accepts by default
USER_AGENT = "sdapi-webhooks/1"


# --------------------------------------------------------------------------- signatures


def sign(secret: str, timestamp: int | str, body: bytes | str) -> str:
    """The `X-Webhook-Signature` of a delivery: `sha256=` + hex HMAC-SHA256 of `{timestamp}.{body}`."""
    if isinstance(body, str):
        body = body.encode()
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(
    secret: str,
    timestamp: int | str,
    body: bytes | str,
    signature: str,
    tolerance: float = SIGNATURE_TOLERANCE,
) -> bool:
    """The receiver's check: `signature` (the `X-Webhook-Signature` header) was made with `secret`
    over exactly these body bytes and this `X-Webhook-Timestamp`, and the timestamp is within
    `tolerance` seconds of now (so a captured delivery cannot be replayed later)."""
    try:
        moment = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs(time.time() - moment) > tolerance:
        return False
    expected = sign(secret, timestamp, body).encode()
    return hmac.compare_digest(expected, str(signature or "").encode("utf-8", "replace"))


# --------------------------------------------------------------------------- deliveries


@dataclass
class _Delivery:
    """One event on its way to one URL; `attempts` counts the POSTs made so far."""

    event_id: str
    url: str
    body: bytes
    label: str  # for the log: "job 123" or "model_load event"
    job_id: int | None = None
    attempts: int = 0
    channel: str | None = None  # deliveries of one channel (one job's events) are not sent at the same time


@dataclass
class _Outcome:
    """What one POST came to: `delivered`, else why not, whether that is worth a retry, and the
    wait the receiver asked for (`Retry-After`), if any."""

    delivered: bool
    reason: str = ""
    retry: bool = False
    retry_after: float | None = None


def webhook_secret(settings) -> str:
    """The webhook signing secret: the setting, else HMAC-SHA256("sdapi-webhooks") keyed with the
    first API key (hex) — a receiver that knows the key can compute it; the README shows how."""
    if settings.webhook_secret:
        return settings.webhook_secret
    return hmac.new(settings.api_keys[0].encode(), b"sdapi-webhooks", hashlib.sha256).hexdigest()


class WebhookSender:
    """Signed, retried webhook deliveries on a few daemon threads.

    The settings are read at every use (update_server changes them in place): the attempts, the
    backoff and the timeout of each delivery, the allowlist of private hosts, and the secret that
    signs it (`webhook_secret`, or one derived from the API keys, see `webhook_secret`).
    Threads start with the first delivery; `stop` ends them (a later delivery starts them again).
    """

    def __init__(self, jobs, settings, senders: int = SENDERS):
        self.jobs = jobs
        self.settings = settings
        self.senders = max(1, senders)
        self._random = random.Random()
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Delivery]] = []  # (due, monotonic seconds; tie-break; delivery)
        self._order = itertools.count()
        self._live: set[str] = set()  # event ids queued or in flight (a repeated event is not sent twice)
        self._active = 0  # POSTs in flight
        self._busy: set[str | None] = set()  # channels with a POST in flight (None never enters)
        self._threads: list[threading.Thread] = []
        self._generation = threading.Event()  # set = the current sender threads are told to stop
        self._generation.set()

    @property
    def attempts(self) -> int:
        return max(1, self.settings.webhook_attempts)

    @property
    def backoff(self) -> float:
        return max(0.0, self.settings.webhook_backoff)

    @property
    def timeout(self) -> float:
        return self.settings.webhook_timeout

    @property
    def secret(self) -> str:
        return webhook_secret(self.settings)

    # --- the interface workers and the loader use
    def job_finished(self, job: Job) -> None:
        """Queue the ModelsLab payload of a finished job for its `webhook` (if it has one and did not
        leave `completed` out of its webhook_events) and mark the job `pending`. Returns at once and
        never raises (a worker calls it)."""
        if job is None or not job.webhook or not job.wants_event("completed"):
            return
        try:
            payload = job_response(job, fetch_result="").model_dump(mode="json", exclude_none=True)
            payload.pop("webhook_status", None)  # about this very delivery: not part of the payload
            payload["track_id"] = job.track_id
            if job.webhook_events:  # a client that chose its events gets the field on every one
                payload["event"] = "completed"
            delivery = _Delivery(f"job-{job.id}-{job.status}", job.webhook, _serialise(payload), f"job {job.id}", job.id,
                                 channel=f"job-{job.id}")
            self._queue(delivery, mark_pending=True)
        except Exception:  # the job itself is done; its webhook must not take the worker down
            log.exception("could not queue the webhook of job %s", job.id)

    def job_event(self, job: Job, event: str, progress: dict | None = None) -> None:
        """Queue a job's `queued`, `started` or `progress` event, when its webhook_events ask for it:
        the processing payload (with `progress` for a progress event), `event` and `track_id`,
        signed and retried like the end's. Its outcome goes to the log, not to `webhook_status`
        (which is about the end). Returns at once and never raises."""
        if job is None or not job.webhook or not job.wants_event(event):
            return
        try:
            payload = job_response(job, fetch_result="").model_dump(mode="json", exclude_none=True)
            payload.pop("webhook_status", None)
            payload.update(event=event, track_id=job.track_id)
            if progress is not None:
                payload["progress"] = wire(progress)
            seq = progress.get("seq", 0) if progress else 0
            self._queue(_Delivery(f"job-{job.id}-{event}-{seq}", job.webhook, _serialise(payload), f"job {job.id} {event}",
                                  channel=f"job-{job.id}"))
        except Exception:
            log.exception("could not queue the %s event of job %s", event, job.id)

    def post_event(self, url: str, payload: dict) -> None:
        """Queue an event that is not a job (a model load finished): signed and retried like a job's
        webhook; its outcome goes to the log. Returns at once and never raises."""
        try:
            label = f"{payload.get('event', 'webhook')} event"
            self._queue(_Delivery(f"event-{uuid.uuid4().hex}", url, _serialise(payload), label))
        except Exception:
            log.exception("could not queue a webhook event for %s", url)

    # --- lifecycle
    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or in flight (True), or `timeout` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._heap and not self._active, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sender threads (server shutdown). Deliveries due now still go out, each with
        one last attempt, within `timeout` seconds; retries that were scheduled for later are given
        up and recorded (`failed: not retried, the server stopped ...`). Call it after the workers
        have stopped; a delivery queued afterwards starts the threads again."""
        deadline = time.monotonic() + timeout
        with self._cond:
            generation, threads = self._generation, self._threads
            generation.set()
            self._threads = []
            now = time.monotonic()
            dropped = self._take(lambda due: due > now)
            self._cond.notify_all()
        for delivery in dropped:
            self._give_up_stopped(delivery)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:  # senders still busy past the timeout: what they have not taken is lost
            left = self._take(lambda due: True) if self._generation is generation else []
        for delivery in left:
            self._give_up_stopped(delivery)

    # --- queueing
    def _queue(self, delivery: _Delivery, mark_pending: bool = False) -> None:
        with self._cond:
            if delivery.event_id in self._live:
                log.info("webhook %s for %s is already on its way; not sent twice", delivery.event_id, delivery.label)
                return
            self._live.add(delivery.event_id)
        if mark_pending:  # before it is queued, so a sender's later status cannot be overwritten
            self._record(delivery, "pending")
        with self._cond:
            self._start()
            self._push(delivery, time.monotonic())

    def _push(self, delivery: _Delivery, due: float) -> None:
        """Put a delivery on the heap (the caller holds `_cond`)."""
        heapq.heappush(self._heap, (due, next(self._order), delivery))
        self._cond.notify_all()

    def _take(self, which) -> list[_Delivery]:
        """Remove and return the queued deliveries whose due time matches (the caller holds `_cond`)."""
        taken = [delivery for due, _, delivery in self._heap if which(due)]
        if taken:
            self._heap = [entry for entry in self._heap if not which(entry[0])]
            heapq.heapify(self._heap)
            self._cond.notify_all()
        return taken

    def _start(self) -> None:
        """Start the sender threads if they are not running (the caller holds `_cond`)."""
        if not self._generation.is_set():
            return
        self._generation = stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send_loop, args=(stop,), daemon=True, name=f"webhook-sender-{n}")
            for n in range(self.senders)
        ]
        for thread in self._threads:
            thread.start()

    # --- sending
    def _send_loop(self, stop: threading.Event) -> None:
        """One sender: take the earliest delivery that is due, attempt it, repeat. Once `stop` is set
        it still takes deliveries that are due, and ends when none is."""
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    free = [entry for entry in self._heap if entry[2].channel not in self._busy]
                    first = min(free, default=None)
                    if first is not None and first[0] <= now:
                        self._heap.remove(first)
                        heapq.heapify(self._heap)
                        delivery = first[2]
                        self._active += 1
                        if delivery.channel is not None:
                            self._busy.add(delivery.channel)
                        break
                    if stop.is_set():
                        return
                    self._cond.wait(first[0] - now if first is not None else None)
            try:
                self._attempt(delivery, stop)
            except Exception:  # a bug here must not kill the sender; the delivery ends failed
                log.exception("webhook %s for %s: unexpected error", delivery.event_id, delivery.label)
                self._finish(delivery, "failed: internal error while sending (not retried)")
            finally:
                with self._cond:
                    self._active -= 1
                    self._busy.discard(delivery.channel)
                    self._cond.notify_all()

    def _attempt(self, delivery: _Delivery, stop: threading.Event) -> None:
        """One POST of a delivery, then: done (delivered or refused), or back on the heap for later."""
        delivery.attempts += 1
        outcome = self._post(delivery)
        n, total = delivery.attempts, self.attempts
        if outcome.delivered:
            self._finish(delivery, "delivered" if n == 1 else f"delivered after {n} attempts")
        elif not outcome.retry:
            self._finish(delivery, f"failed: {outcome.reason} (not retried)")
        elif n >= total:
            self._finish(delivery, f"failed: gave up after {n} attempts: {outcome.reason}")
        elif stop.is_set():
            self._finish(delivery, f"failed: not retried, the server stopped (after {n} of {total} attempts: {outcome.reason})")
        else:
            delay = self._delay(n, outcome.retry_after)
            self._record(delivery, f"retrying: attempt {n + 1} of {total} after {outcome.reason}")
            log.info("webhook %s for %s: %s; attempt %d in %.1fs", delivery.event_id, delivery.label, outcome.reason, n + 1, delay)
            with self._cond:
                self._push(delivery, time.monotonic() + delay)

    def _post(self, delivery: _Delivery) -> _Outcome:
        """POST the delivery's bytes, signed for this attempt, through `infra.net.fetcher` (public
        addresses only unless allowlisted; redirects are not followed). Only the status line and
        headers of the answer are read; its body is ignored."""
        timestamp = str(int(time.time()))
        headers = {
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "X-Webhook-Id": delivery.event_id,
            "X-Webhook-Timestamp": timestamp,
            "X-Webhook-Attempt": str(delivery.attempts),
            "X-Webhook-Signature": sign(self.secret, timestamp, delivery.body),
        }
        try:
            with fetcher.stream(
                "POST",
                delivery.url,
                allowlist=self.settings.fetch_allowlist,  # hosts allowed although private
                timeout=self.timeout,
                headers=headers,
                content=delivery.body,
                follow_redirects=False,
            ) as response:
                code, retry_after = response.status_code, response.headers.get("Retry-After")
        except fetcher.PrivateAddress as exc:  # not sent, not retried
            return _Outcome(False, f"not sent: {exc.message}")
        except fetcher.Blocked as exc:  # not http(s)
            return _Outcome(False, f"invalid webhook URL: {exc.message}")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            return _Outcome(False, f"invalid webhook URL: {_short(exc)}")
        except httpx.TimeoutException:
            return _Outcome(False, f"no answer within {self.timeout:g} s", retry=True)
        except httpx.ConnectError as exc:
            return _Outcome(False, f"could not connect: {_short(exc)}", retry=True)
        except httpx.TransportError as exc:  # the connection broke mid-way
            return _Outcome(False, f"{type(exc).__name__}: {_short(exc)}", retry=True)
        if 200 <= code < 300:
            return _Outcome(True)
        if code == 429 or code >= 500:
            wait = _retry_after(retry_after) if code in (429, 503) else None
            return _Outcome(False, f"HTTP {code}", retry=True, retry_after=wait)
        return _Outcome(False, f"HTTP {code}")

    def _delay(self, attempts: int, retry_after: float | None) -> float:
        """Seconds before the next attempt: exponential backoff with +-25 % jitter, or the receiver's
        `Retry-After` where that is longer."""
        delay = self.backoff * 2 ** (attempts - 1) * self._random.uniform(0.75, 1.25)
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
        return delay

    # --- outcomes
    def _finish(self, delivery: _Delivery, status: str) -> None:
        self._record(delivery, status)
        with self._cond:
            self._live.discard(delivery.event_id)

    def _give_up_stopped(self, delivery: _Delivery) -> None:
        self._finish(delivery, f"failed: not retried, the server stopped (after {delivery.attempts} of {self.attempts} attempts)")

    def _record(self, delivery: _Delivery, status: str) -> None:
        """The delivery's state: on the job (`webhook_status`) when it is a job's, and in the log."""
        level = logging.WARNING if status.startswith("failed") else logging.INFO
        log.log(level, "webhook %s for %s to %s: %s", delivery.event_id, delivery.label, delivery.url, status)
        if delivery.job_id is None:
            return
        try:
            self.jobs.update(delivery.job_id, webhook_status=status)
        except Exception:  # the job store going away (shutdown) must not kill a sender
            log.exception("could not record the webhook status of %s", delivery.label)


def _serialise(payload: dict) -> bytes:
    """The exact bytes sent (and signed) on every attempt."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _retry_after(value: str | None) -> float | None:
    """A `Retry-After` header in seconds (it is either a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _short(exc: Exception, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SpawnedWebhooks:
    """Job webhooks delivered by another function: on Modal the GPU worker hands each finished job
    to a CPU function (`spawn(job_id)`, modal_app.deliver_webhook), which delivers it with the
    retries above, so a GPU container never waits for a slow or dead receiver. Events that are not
    jobs (a model load ended, in the CPU downloader) go out from here through `events`."""

    def __init__(self, spawn, events: WebhookSender):
        self.spawn, self.events = spawn, events

    def job_finished(self, job: Job) -> None:
        """Hand the job's webhook to the delivery function; returns at once and never raises."""
        if job is None or not job.webhook:
            return
        try:
            self.spawn(job.id)
        except Exception:  # the job itself is done; the recovery of webhooks is the receiver's fetch
            log.exception("could not hand the webhook of job %s to the delivery function", job.id)

    def job_event(self, job: Job, event: str, progress: dict | None = None) -> None:
        """A job's queued / started / progress event goes out from this container (it waits for no
        receiver: the senders are threads)."""
        self.events.job_event(job, event, progress)

    def post_event(self, url: str, payload: dict) -> None:
        self.events.post_event(url, payload)

    def wait_idle(self, timeout: float) -> bool:
        return self.events.wait_idle(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self.events.stop(timeout)
