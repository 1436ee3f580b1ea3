"""Where outputs go. `LocalStorage` writes files under the data dir that the app serves at
`/files/<key>`; `infra.s3.S3Storage` (boto3) implements the same `put` / `url` / `remove_expired`;
`OutputStorage` is the one the app uses: local, or the bucket update_s3 set.

An object may carry an expiry (`temp: yes` outputs, upload_image uploads): past it the object is
no longer served, and the cache cleaner deletes it. Locally the expiry is a small file under
`.expires/` mirroring the key (never served: hidden paths are not objects).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from infra.storage.base import EXPIRY_DIR, write_atomic

class LocalStorage:
    """Files under `root`. On Modal `root` is on a Volume shared by the web tier and the workers:
    `on_write` (Volume.commit) publishes what a worker wrote, `on_miss` (Volume.reload) lets the
    web tier see files committed by other containers since it started."""

    url_prefix = "/files"

    def __init__(self, root: Path, on_write: Callable[[], None] | None = None, on_miss: Callable[[], None] | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.on_write, self.on_miss = on_write, on_miss

    def put(self, key: str, data: bytes, content_type: str, expires_at: float | None = None) -> None:
        """Write atomically: a reader never sees half a file under an advertised link. The expiry
        is written first, so an object that should expire is never visible without it."""
        path = self.path(key)
        if expires_at is not None:
            write_atomic(self._expiry_path(key), repr(expires_at).encode())
        write_atomic(path, data)
        if self.on_write is not None:
            self.on_write()

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
        if not path.is_file() and self.on_miss is not None:
            self.on_miss()
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


class OutputStorage:
    """Where outputs go now: the local files, or the S3 bucket `update_s3` set. The S3 setting is
    kept in the config store (`infra.storage.config_store`: a 0600 file locally, a modal.Dict on Modal) so
    it survives restarts and every container sees it; `reset_s3` deletes it.

    A job records the storage it was submitted under (`storage_id`): its outputs land there, under
    the links it was given, even when update_s3 switches storage while it is queued. Local files
    stay served after a switch."""

    CONFIG_NAME = "s3-storage"

    def __init__(self, local: LocalStorage, config, default_s3=None):
        """`default_s3`: an S3Config the server starts with (setting `s3_config`), else local files."""
        self.local = local
        self.config = config
        self.default_s3 = default_s3
        self._backends: dict = {"local": local}
        self._current = "local"
        self._lock = threading.Lock()
        saved = config.get(self.CONFIG_NAME)
        if saved:
            from infra.storage.s3 import S3Config

            self._switch(S3Config.from_json(saved))
        elif default_s3 is not None:
            self._switch(default_s3)

    # --- the interface of one storage, on the current backend (or the job's)
    url_prefix = LocalStorage.url_prefix

    @property
    def root(self) -> Path:
        return self.local.root

    @property
    def current_id(self) -> str:
        return self._current

    def backend(self, storage_id: str | None = None):
        """The backend a job was submitted under; the current one for new work (or when the job's
        backend is no longer known to this process, after update_s3 and a restart)."""
        return self._backends.get(storage_id or self._current) or self._backends[self._current]

    def put(self, key: str, data: bytes, content_type: str, expires_at: float | None = None,
            storage_id: str | None = None) -> None:
        self.backend(storage_id).put(key, data, content_type, expires_at=expires_at)

    def url(self, key: str, base_url: str, expires_at: float | None = None, storage_id: str | None = None) -> str:
        return self.backend(storage_id).url(key, base_url, expires_at=expires_at)

    def open_path(self, key: str, now: float | None = None) -> Path | None:
        return self.local.open_path(key, now)

    def remove_expired(self, now: float | None = None) -> tuple[int, int]:
        removed = freed = 0
        for backend in list(self._backends.values()):
            count, size = backend.remove_expired(now)
            removed, freed = removed + count, freed + size
        return removed, freed

    def describe(self) -> dict:
        return self.backend().describe()

    # --- switching
    def use_s3(self, config, allowlist: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Check the bucket with a test write, then send new outputs there and remember it.
        Raises StorageError (nothing changes) when the check fails; returns its warnings."""
        from infra.storage.s3 import S3Storage

        warnings = S3Storage(config).check(allowlist)
        self._switch(config)
        self.config.put(self.CONFIG_NAME, config.to_json())
        return warnings

    def reset(self) -> None:
        """Back to the server's default storage (the `s3_config` bucket, else local files); the
        update_s3 setting is forgotten."""
        self.config.delete(self.CONFIG_NAME)
        if self.default_s3 is not None:
            self._switch(self.default_s3)
        else:
            with self._lock:
                self._current = "local"

    def _switch(self, config) -> None:
        from infra.storage.s3 import S3Storage

        storage_id = f"s3:{config.endpoint_url}/{config.bucket}/{config.image_directory}"
        with self._lock:
            self._backends[storage_id] = S3Storage(config)
            self._current = storage_id


def default_s3(settings):
    """The S3Config of the `s3_config` setting (update_s3's fields as JSON), or None."""
    if not settings.s3_config:
        return None
    import json

    from pydantic import ValidationError

    from infra.storage.s3 import S3Config
    from models.requests import UpdateS3Request

    try:
        fields = UpdateS3Request.model_validate(json.loads(settings.s3_config))
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"SDAPI_S3_CONFIG is not a JSON object with update_s3's fields: {exc}") from None
    return S3Config.from_request(fields, settings.s3_acl)
