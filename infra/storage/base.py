"""What every output backend shares: the error a failed write raises, content types by key, the
folder name of expiry markers, atomic file writes, and a Modal Volume reload that is tried again
while a file held open blocks it."""

from __future__ import annotations

import logging
import mimetypes
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EXPIRY_DIR = ".expires"
LOCAL = "local"  # the storage id of the server's own files (a job's `storage_id` by default)

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".base64": "text/plain; charset=us-ascii",
}


class StorageError(RuntimeError):
    """An output could not be stored (or the storage could not be reached); the message says where."""


def content_type(key: str) -> str:
    suffix = Path(key).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(key)[0] or "application/octet-stream"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` so a reader sees the old file or the whole new one, never half of it. The file
    is created with mode 0600 (mkstemp), so it also suits secrets (the config store)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


RELOAD_TRIES = 5  # a Volume reload fails while a file on it is open: try again, then go on without it
RELOAD_PAUSE = 0.2


def reload_volume(reload: Callable[[], None], tries: int = RELOAD_TRIES, pause: float = RELOAD_PAUSE) -> bool:
    """Volume.reload(), tried again while it fails (it does while a file on the Volume is open);
    False when it never succeeded (the caller goes on with what it sees)."""
    for attempt in range(tries):
        try:
            reload()
            return True
        except Exception as exc:
            if attempt == tries - 1:
                log.warning("Volume reload failed %d times: %s", tries, exc)
            else:
                time.sleep(pause * (attempt + 1))
    return False
