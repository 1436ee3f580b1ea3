"""Webhook delivery: when a job ends, POST its ModelsLab payload (the success body, or
`{status: failed, id, message}`, each with `track_id`) to the job's `webhook`.

Delivery runs on its own thread so a slow or dead receiver never holds up a worker; the outcome
is recorded on the job as `webhook_status` (shown by fetch).
"""

from __future__ import annotations

import logging
import threading

import httpx

from infra.jobs import Job
from models.responses import job_response

log = logging.getLogger(__name__)


class WebhookSender:
    def __init__(self, jobs, timeout: float = 10.0):
        self.jobs = jobs
        self.timeout = timeout

    def job_finished(self, job: Job) -> None:
        if job.webhook:
            threading.Thread(target=self._deliver, args=(job,), daemon=True, name=f"webhook-{job.id}").start()

    def post_event(self, url: str, payload: dict) -> None:
        """POST an event that is not a job (a model load finished) on its own thread."""
        threading.Thread(target=self._post_event, args=(url, payload), daemon=True, name="webhook-event").start()

    def _post_event(self, url: str, payload: dict) -> None:
        log.info("event webhook %s to %s: %s", payload.get("event"), url, self._post(url, payload))

    def _deliver(self, job: Job) -> None:
        payload = job_response(job, fetch_result="").model_dump(mode="json", exclude_none=True)
        payload["track_id"] = job.track_id
        status = self._post(job.webhook, payload)
        log.info("webhook for job %s: %s", job.id, status)
        self.jobs.update(job.id, webhook_status=status)

    def _post(self, url: str, payload: dict) -> str:
        """One POST; its outcome as `delivered` or `failed: <why>`."""
        try:
            response = httpx.post(url, json=payload, timeout=self.timeout)
            return "delivered" if response.is_success else f"failed: HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            return f"failed: {type(exc).__name__}"
