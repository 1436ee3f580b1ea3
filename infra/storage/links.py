"""Signed, expiring links: a path plus `expires` and an HMAC `signature` made with a server
secret, so a link can be handed to another machine (sync_models' model archives) without
handing over an API key."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode


def sign_path(path: str, secret: str, seconds: int) -> str:
    expires = int(time.time()) + seconds
    return f"{path}?{urlencode({'expires': expires, 'signature': _signature(path, expires, secret)})}"


def check_signature(path: str, expires: str, signature: str, secret: str) -> bool:
    if not expires.isdigit() or int(expires) < time.time():
        return False
    return hmac.compare_digest(_signature(path, int(expires), secret), signature)


def _signature(path: str, expires: int, secret: str) -> str:
    return hmac.new(secret.encode(), f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


ARCHIVE_ROUTE = "/api/v1/enterprise/model_archive"  # GET {route}/{model_id}.tar, signed (sync_models)


def link_secret(settings) -> str:
    """Signs links handed to other machines; changes when the API keys change."""
    return "\n".join(sorted(settings.api_keys))


def archive_path(model_id: str, settings) -> str:
    """A signed, expiring path to a tar of a model's files (for sync_models' target)."""
    return sign_path(f"{ARCHIVE_ROUTE}/{model_id}.tar", link_secret(settings), settings.sync_link_seconds)


PREVIEW_ROUTE = "/api/v1/enterprise/preview"  # GET {route}/{job_id}.jpg, signed (a running job's preview)
PREVIEW_LINK_SECONDS = 24 * 3600


def preview_path(job_id: int, settings) -> str:
    """A signed path to a job's latest preview: like an output link, usable without a key (an
    `<img>` tag), and not guessable from the job id."""
    return sign_path(f"{PREVIEW_ROUTE}/{job_id}.jpg", link_secret(settings), PREVIEW_LINK_SECONDS)
