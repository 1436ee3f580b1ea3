"""Where outputs go. `LocalStorage` writes files under the data dir that the app serves at
`/files/<key>`; the S3 side (boto3) implements the same `put` / `url`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class LocalStorage:
    url_prefix = "/files"

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write atomically: a reader never sees half a file under an advertised link."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    def url(self, key: str, base_url: str) -> str:
        return f"{base_url}{self.url_prefix}/{key}"
