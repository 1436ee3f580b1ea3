"""Where outputs go. `OutputBackend` is one place objects are written to and linked from;
`LocalStorage` writes files under the data dir that the app serves at `/files/<key>`,
`infra.storage.s3.S3Storage` (boto3) is the other implementation; `OutputStorage` is the one the
app uses: local files, or the bucket update_s3 (or the setting s3_config) set.

An object may carry an expiry (`temp: yes` outputs, upload_image uploads): past it the object is
no longer served, and the cache cleaner deletes it. Locally the expiry is a small file under
`.expires/` mirroring the key (never served: hidden paths are not objects).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from infra.storage.base import EXPIRY_DIR, LOCAL, StorageError, reload_volume, write_atomic
from infra.storage.config_store import ConfigStore
from models.errors import ApiError

log = logging.getLogger(__name__)


class OutputBackend(Protocol):
    """One place outputs are written to and linked from: `LocalStorage` here, `infra.storage.s3.S3Storage`
    (tests/storage/test_backend_conformance.py holds both to the same behaviour). An object may carry
    an expiry: past it, it is no longer served or linked, and `remove_expired` deletes it."""

    url_prefix: str

    def put(self, key: str, data: bytes, content_type: str, expires_at: float | None = None) -> None:
        """Store `data` under `key`, whole or not at all (raises StorageError)."""

    def url(self, key: str, base_url: str, expires_at: float | None = None) -> str:
        """The link a client downloads `key` from."""

    def open_path(self, key: str, now: float | None = None) -> Path | None:
        """The local file behind `key` for the app to serve, or None (expired, missing, not local)."""

    def expires_at(self, key: str) -> float | None: ...

    def remove_expired(self, now: float | None = None) -> tuple[int, int]:
        """Delete every object past its expiry: (objects removed, bytes freed)."""

    def describe(self) -> dict:
        """What and where, without secrets."""


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
        else:  # put again without an expiry: permanent from now on
            self._expiry_path(key).unlink(missing_ok=True)
        write_atomic(path, data)
        if self.on_write is not None:
            self.on_write()

    def path(self, key: str) -> Path:
        path, root = (self.root / key).resolve(), self.root.resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return self.root / path.relative_to(root)  # under the root as given (a mount path stays the mount path)

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
        if not path.is_file() and self.on_miss is not None and not reload_volume(self.on_miss):
            raise ApiError("This file is not visible on this server yet (its storage is busy); try again in a few "
                           "seconds", status_code=503)
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
        return self.root / EXPIRY_DIR / self.path(key).relative_to(self.root)


# Modal's guide on v1 Volumes: best under 50,000 files, a hard cap of 500,000 (one output per image)
VOLUME_WARNING = (
    "Outputs are on a Modal Volume, which is best under 50,000 files and stops at 500,000 (one file per image: "
    "about 35 images an hour for two months). Set an S3-compatible bucket for production: SDAPI_S3_CONFIG in the "
    "secret, or update_s3."
)


class OutputStorage:
    """Where outputs go now: the local files, the S3 bucket `update_s3` set, or else the default
    bucket of the setting `s3_config`. The update_s3 bucket is kept in the config store
    (`infra.storage.config_store`: a 0600 file locally, a modal.Dict on Modal) so it survives
    restarts and every container sees it; `reset_s3` deletes it. The settings `s3_config` and
    `s3_acl` are read live (update_server applies them at once): every S3 object gets the ACL the
    setting names now.

    A job records the storage it was submitted under (`storage_id`): its outputs land there, under
    the links it was given, even when update_s3 switches storage while it is queued. Local files
    stay served after a switch."""

    CONFIG_NAME = "s3-storage"
    url_prefix = LocalStorage.url_prefix

    def __init__(self, local: LocalStorage, config: ConfigStore, settings, on_modal_volume: bool = False):
        """`on_modal_volume`: the local files are a Modal Volume, which holds a limited number of
        files (`describe` says so while no bucket is set)."""
        self.on_modal_volume = on_modal_volume
        self.local = local
        self.config = config
        self.settings = settings
        self._backends: dict[str, OutputBackend] = {LOCAL: local}
        self._lock = threading.Lock()
        saved = config.get(self.CONFIG_NAME)
        self._saved = _s3_config_from_json(saved) if saved else None  # the update_s3 bucket
        self._default_text, self._default = None, None
        self.cleanup_errors: list[str] = []  # what the last remove_expired could not clean, per bucket
        self.current_id  # a broken s3_config setting fails the start, not the first job

    # --- the interface of one storage, on the current backend (or the job's)
    @property
    def root(self) -> Path:
        return self.local.root

    @property
    def current_id(self) -> str:
        """The storage new outputs go to (a job keeps it as its `storage_id`)."""
        config = self._saved or self._default_s3()
        if config is None:
            return LOCAL
        from infra.storage.s3 import S3Storage

        config = dataclasses.replace(config, acl=self.settings.s3_acl)
        storage_id = f"s3:{config.endpoint_url}/{config.bucket}/{config.image_directory}"
        with self._lock:
            backend = self._backends.get(storage_id)
            if backend is None or backend.config != config:
                self._backends[storage_id] = S3Storage(config)
        return storage_id

    def backend(self, storage_id: str | None = None) -> OutputBackend:
        """The backend a job was submitted under; the current one for new work (or when the job's
        backend is no longer known to this process, after update_s3 and a restart)."""
        current = self.current_id
        return self._backends.get(storage_id or current) or self._backends[current]

    def put(self, key: str, data: bytes, content_type: str, expires_at: float | None = None,
            storage_id: str | None = None) -> None:
        self.backend(storage_id).put(key, data, content_type, expires_at=expires_at)

    def url(self, key: str, base_url: str, expires_at: float | None = None, storage_id: str | None = None) -> str:
        return self.backend(storage_id).url(key, base_url, expires_at=expires_at)

    def open_path(self, key: str, now: float | None = None) -> Path | None:
        return self.local.open_path(key, now)

    def remove_expired(self, now: float | None = None) -> tuple[int, int]:
        """Every backend used since start, each on its own: a bucket that refuses (listing, deleting)
        is reported in `cleanup_errors` (what clear_cache answers) and tried again next pass."""
        removed = freed = 0
        errors = []
        for backend in list(self._backends.values()):
            try:
                count, size = backend.remove_expired(now)
            except StorageError as exc:
                log.warning("expired outputs not removed: %s", exc)
                errors.append(str(exc))
                continue
            removed, freed = removed + count, freed + size
        self.cleanup_errors = errors
        return removed, freed

    def describe(self) -> dict:
        described = self.backend().describe()
        if self.on_modal_volume and self.current_id == LOCAL:
            described["warning"] = VOLUME_WARNING
        return described

    # --- switching
    def use_s3(self, config, allowlist: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Check the bucket with a test write, then send new outputs there and remember it.
        Raises StorageError (nothing changes) when the check fails; returns its warnings."""
        from infra.storage.s3 import S3Storage

        warnings = S3Storage(config).check(allowlist)
        self.config.put(self.CONFIG_NAME, config.to_json())
        self._saved = config
        return warnings

    def reset(self) -> None:
        """Back to the server's default storage (the `s3_config` bucket, else local files); the
        update_s3 setting is forgotten."""
        self.config.delete(self.CONFIG_NAME)
        self._saved = None

    def _default_s3(self):
        """The bucket of the `s3_config` setting, parsed again only when the setting changed."""
        text = self.settings.s3_config
        if text != self._default_text:
            self._default, self._default_text = parse_s3_config(text), text
        return self._default


def parse_s3_config(text: str | None):
    """The S3Config of an `s3_config` setting (update_s3's fields as JSON), or None; a ValueError
    that says what is wrong with it."""
    if not text:
        return None
    import json

    from pydantic import ValidationError

    from infra.storage.s3 import S3Config
    from models.requests import UpdateS3Request

    try:
        fields = UpdateS3Request.model_validate(json.loads(text))
        return S3Config.from_request(fields)
    except (ValueError, ValidationError, ApiError) as exc:
        message = exc.message if isinstance(exc, ApiError) else exc
        raise ValueError(f"SDAPI_S3_CONFIG is not a JSON object with update_s3's fields: {message}") from None


def _s3_config_from_json(text: str):
    from infra.storage.s3 import S3Config

    return S3Config.from_json(text)
