"""Where outputs go. `LocalStorage` writes files under the data dir that the app serves at
`/files/<key>`; the S3 side (boto3) implements the same `put` / `url` / `remove_expired`.

An object may carry an expiry (`temp: yes` outputs, upload_image uploads): past it the object is
no longer served, and the cache cleaner deletes it. Locally the expiry is a small file under
`.expires/` mirroring the key (never served: hidden paths are not objects).
"""

from __future__ import annotations

import mimetypes
import os
import tempfile
import time
from pathlib import Path

EXPIRY_DIR = ".expires"

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


class LocalStorage:
    url_prefix = "/files"

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes, content_type: str, expires_at: float | None = None) -> None:
        """Write atomically: a reader never sees half a file under an advertised link. The expiry
        is written first, so an object that should expire is never visible without it."""
        path = self.path(key)
        if expires_at is not None:
            _write_atomic(self._expiry_path(key), repr(expires_at).encode())
        _write_atomic(path, data)

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    def url(self, key: str, base_url: str, expires_at: float | None = None) -> str:
        return f"{base_url}{self.url_prefix}/{key}"

    def describe(self) -> dict:
        return {"kind": "local", "root": str(self.root)}

    def open_path(self, key: str, now: float | None = None) -> Path | None:
        """The file behind a served key, or None when there is none or it has expired."""
        if any(part.startswith(".") for part in Path(key).parts):
            return None
        try:
            path = self.path(key)
        except ValueError:
            return None
        if not path.is_file():
            return None
        expires_at = self.expires_at(key)
        if expires_at is not None and expires_at <= (now or time.time()):
            return None
        return path

    def expires_at(self, key: str) -> float | None:
        try:
            return float(self._expiry_path(key).read_text())
        except (OSError, ValueError):
            return None

    def remove_expired(self, now: float | None = None) -> tuple[int, int]:
        """Delete every object past its expiry: (objects removed, bytes freed)."""
        now = now or time.time()
        removed = freed = 0
        expiry_root = self.root / EXPIRY_DIR
        for marker in list(expiry_root.rglob("*")) if expiry_root.is_dir() else []:
            if not marker.is_file() or marker.name.startswith(".tmp-"):
                continue
            try:
                expires_at = float(marker.read_text())
            except (OSError, ValueError):
                continue
            if expires_at > now:
                continue
            target = self.root / marker.relative_to(expiry_root)
            if target.is_file():
                freed += target.stat().st_size
                target.unlink()
                removed += 1
            marker.unlink(missing_ok=True)
        return removed, freed

    def _expiry_path(self, key: str) -> Path:
        return self.root / EXPIRY_DIR / self.path(key).relative_to(self.root.resolve())


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
