"""One conformance suite for the `OutputBackend` protocol (infra/storage/outputs.py), run against both
implementations: `LocalStorage` (files under a tmp folder) and `S3Storage` on a real S3 endpoint (moto's
server on loopback, a fresh bucket per test). Every test runs on both, so a behaviour difference between
local files and S3 is a failing test.

What the backends are held to, as a client of the app sees it:

- what `put` stored is what the key's link (`url`) downloads, whole: locally the app's file route
  (`url_prefix`/<key>) serves the file `open_path` gives; on S3 `open_path` is None by contract and the
  link itself downloads the object (`public_url` for a permanent one, a presigned GET for an expiring one);
- a second `put` of a key replaces its bytes entirely, and a reader sees the old object or the new one,
  never a mix;
- `expires_at` reports the expiry an object was put with (to the second, never earlier: S3 rounds it up
  to a whole second), None for a permanent or missing object;
- `remove_expired(now)` deletes exactly the objects whose expiry is at or before `now`, returns
  (objects removed, bytes freed), leaves the rest served, and a second pass removes nothing;
- a permanent object's link is stable, names the key, and does not depend on the object existing yet;
- `describe()` is a JSON-able dict that never holds the secret access key.

Found by this suite and fixed: a key put again with a later expiry, or with none, now keeps the
object until its new expiry (or for good) on both backends; before, S3 deleted it at its first
expiry and both deleted a permanent object at the expiry it once had.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import boto3
import httpx
import pytest

from infra.storage.outputs import LocalStorage, OutputBackend
from infra.storage.s3 import S3Config, S3Storage

BASE_URL = "http://app.test"  # the app's own address, as a request carries it
SECRET = f"sk-{uuid.uuid4().hex}"  # a secret describe() must never contain
IMAGE_DIRECTORY = "generations"
ADMIN_CREDS = {"region_name": "us-east-1", "aws_access_key_id": "admin", "aws_secret_access_key": "admin-secret"}
PNG = "image/png"


@dataclass
class Backend:
    """One backend under test, with the way a client gets an object back through its link."""

    name: str
    storage: OutputBackend
    serves_files: bool  # the app serves the file open_path gives (local) or never (S3)
    read_link: Callable[[str], bytes | None]  # the bytes a client downloads from a link; None: not served
    stored: Callable[[], set[str]]  # the keys of the objects the backend holds (expiry bookkeeping aside)
    root: Path | None = None

    def fetch(self, key: str, expires_at: float | None = None) -> bytes | None:
        """Download `key` the way a client does: through the link `url` hands out for it."""
        return self.read_link(self.storage.url(key, BASE_URL, expires_at=expires_at))


def local_backend(root: Path) -> Backend:
    storage = LocalStorage(root)

    def read_link(link: str) -> bytes | None:
        # what the app's route `url_prefix/{key:path}` does with the link: open_path(key), then the file
        prefix = f"{BASE_URL}{storage.url_prefix}/"
        assert link.startswith(prefix), link
        path = storage.open_path(unquote(link.removeprefix(prefix)))
        return None if path is None else path.read_bytes()

    def stored() -> set[str]:
        files = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
        return {p.as_posix() for p in files if not any(part.startswith(".") for part in p.parts)}

    return Backend("local", storage, True, read_link, stored, root=root)


def s3_backend(endpoint: str) -> Backend:
    admin = boto3.client("s3", endpoint_url=endpoint, **ADMIN_CREDS)
    bucket = f"conf-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=bucket)
    storage = S3Storage(
        S3Config(
            endpoint_url=endpoint,
            region_name="us-east-1",
            bucket=bucket,
            access_key_id="AKIAEXAMPLE",
            secret_access_key=SECRET,
            public_url=f"{endpoint}/{bucket}/",  # moto serves objects anonymously, path-style...
            image_directory=IMAGE_DIRECTORY,
            acl="public-read",  # ...when their ACL makes them readable, as the customer's setup does
        )
    )

    def read_link(link: str) -> bytes | None:
        answer = httpx.get(link, timeout=10)
        if answer.status_code in (403, 404):
            return None
        assert answer.status_code == 200, (link, answer.status_code, answer.text[:200])
        return answer.content

    def stored() -> set[str]:
        prefix = f"{IMAGE_DIRECTORY}/"
        pages = admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        names = (item["Key"].removeprefix(prefix) for page in pages for item in page.get("Contents", []))
        return {name for name in names if not name.startswith(".")}

    return Backend("s3", storage, False, read_link, stored)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        return local_backend(tmp_path / "outputs")
    return s3_backend(request.getfixturevalue("moto_endpoint"))


def whole_second_ahead() -> float:
    """A whole-second unix time an hour ahead: an expiry both backends can report exactly."""
    return float(math.floor(time.time()) + 3600)


# --------------------------------------------------------------------------- put and read back


def test_put_then_the_link_downloads_the_same_bytes(backend):
    data = bytes(range(256)) * 40  # binary, every byte value
    backend.storage.put("generations/k-0.png", data, PNG)

    assert backend.fetch("generations/k-0.png") == data
    served = backend.storage.open_path("generations/k-0.png")
    if backend.serves_files:  # local: the app serves this file under the link
        assert served is not None and served.is_relative_to(backend.root.resolve())
        assert served.read_bytes() == data
    else:  # S3: never a local file, the link goes to the bucket
        assert served is None
    assert backend.stored() == {"generations/k-0.png"}


def test_an_expiring_object_is_downloadable_from_its_link_until_it_expires(backend):
    expires_at = time.time() + 3600
    backend.storage.put("uploads/tmp.png", b"temporary bytes", PNG, expires_at=expires_at)

    assert backend.fetch("uploads/tmp.png", expires_at=expires_at) == b"temporary bytes"
    assert backend.stored() == {"uploads/tmp.png"}  # the expiry bookkeeping is not an object


def test_a_missing_key_is_not_served(backend):
    assert backend.fetch("generations/never-put.png") is None
    assert backend.storage.open_path("generations/never-put.png") is None
    assert backend.storage.expires_at("generations/never-put.png") is None


# --------------------------------------------------------------------------- overwriting


def test_put_overwrites_the_key_with_the_new_bytes_whole(backend):
    key = "generations/k-0.png"
    backend.storage.put(key, b"a" * 5000, PNG)
    backend.storage.put(key, b"bbb", PNG)  # shorter: nothing of the old object may remain

    assert backend.fetch(key) == b"bbb"
    backend.storage.put(key, b"c" * 7000, PNG)  # longer
    assert backend.fetch(key) == b"c" * 7000
    assert backend.stored() == {key}


def test_a_reader_sees_the_old_object_or_the_new_one_never_a_mix(backend):
    key = "generations/k-0.png"
    versions = [b"x" * 64 * 1024, b"y" * 100]
    backend.storage.put(key, versions[0], PNG)
    reads: list[bytes | None] = []

    def writer():
        for i in range(30):
            backend.storage.put(key, versions[i % 2], PNG)

    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(writer)
        while not writing.done() or len(reads) < 5:
            reads.append(backend.fetch(key))
        writing.result()  # a failed put fails the test

    assert all(read in versions for read in reads), {len(read or b"") for read in reads}
    assert backend.fetch(key) == versions[1]  # the writer's last put


def test_a_retried_put_with_the_same_expiry_leaves_one_object_removed_once(backend):
    """A job run again (a worker lost mid-job) stores the same keys with the same expiry."""
    expires_at = whole_second_ahead()
    backend.storage.put("generations/k-0.png", b"first run", PNG, expires_at=expires_at)
    backend.storage.put("generations/k-0.png", b"second run!", PNG, expires_at=expires_at)

    assert backend.storage.expires_at("generations/k-0.png") == expires_at
    assert backend.fetch("generations/k-0.png", expires_at=expires_at) == b"second run!"
    assert backend.storage.remove_expired(now=expires_at) == (1, len(b"second run!"))
    assert backend.storage.remove_expired(now=expires_at) == (0, 0)
    assert backend.stored() == set()


def test_a_put_with_a_later_expiry_keeps_the_object_until_then(backend):
    first = whole_second_ahead()
    later = first + 1000
    backend.storage.put("generations/k-0.png", b"short-lived", PNG, expires_at=first)
    backend.storage.put("generations/k-0.png", b"kept longer", PNG, expires_at=later)

    assert backend.storage.expires_at("generations/k-0.png") == later
    assert backend.storage.remove_expired(now=first + 5) == (0, 0)
    assert backend.fetch("generations/k-0.png", expires_at=later) == b"kept longer"
    assert backend.storage.remove_expired(now=later) == (1, len(b"kept longer"))


def test_a_permanent_put_over_an_expiring_object_makes_it_permanent(backend):
    expires_at = whole_second_ahead()
    backend.storage.put("generations/k-0.png", b"temporary", PNG, expires_at=expires_at)
    backend.storage.put("generations/k-0.png", b"permanent", PNG)

    assert backend.storage.expires_at("generations/k-0.png") is None
    assert backend.storage.remove_expired(now=expires_at + 5) == (0, 0)
    assert backend.fetch("generations/k-0.png") == b"permanent"


# --------------------------------------------------------------------------- expiry


def test_expires_at_reports_the_expiry_an_object_was_put_with(backend):
    whole = whole_second_ahead()
    fraction = whole + 100.25  # time.time() + temp_output_seconds, as the app computes it
    backend.storage.put("generations/whole.png", b"1", PNG, expires_at=whole)
    backend.storage.put("generations/fraction.png", b"2", PNG, expires_at=fraction)
    backend.storage.put("generations/permanent.png", b"3", PNG)

    assert backend.storage.expires_at("generations/whole.png") == whole
    reported = backend.storage.expires_at("generations/fraction.png")
    assert reported is not None and fraction <= reported < fraction + 1  # to the second, never earlier
    assert backend.storage.expires_at("generations/permanent.png") is None


def test_remove_expired_deletes_exactly_the_expired_objects(backend):
    t = whole_second_ahead()
    storage = backend.storage
    storage.put("generations/old-0.png", b"x" * 10, PNG, expires_at=t)
    storage.put("uploads/old-1.png", b"x" * 11, PNG, expires_at=t + 5)  # expires exactly at `now` below
    storage.put("generations/old-2.png", b"x" * 12, PNG, expires_at=t + 2)
    storage.put("generations/fresh.png", b"fresh", PNG, expires_at=t + 1000)
    storage.put("generations/permanent.png", b"kept", PNG)
    everything = backend.stored()

    assert storage.remove_expired(now=t - 1) == (0, 0)  # nothing has expired yet
    assert backend.stored() == everything

    assert storage.remove_expired(now=t + 5) == (3, 10 + 11 + 12)
    assert backend.stored() == {"generations/fresh.png", "generations/permanent.png"}
    for key, expires_at in (("generations/old-0.png", t), ("uploads/old-1.png", t + 5), ("generations/old-2.png", t + 2)):
        assert backend.fetch(key, expires_at=expires_at) is None
        assert storage.expires_at(key) is None
    assert backend.fetch("generations/fresh.png", expires_at=t + 1000) == b"fresh"
    assert storage.expires_at("generations/fresh.png") == t + 1000
    assert backend.fetch("generations/permanent.png") == b"kept"

    assert storage.remove_expired(now=t + 5) == (0, 0)  # a second pass finds nothing more
    assert storage.remove_expired(now=t + 1000) == (1, len(b"fresh"))
    assert backend.stored() == {"generations/permanent.png"}
    assert storage.remove_expired(now=t + 10**6) == (0, 0)  # a permanent object never expires
    assert backend.fetch("generations/permanent.png") == b"kept"


def test_remove_expired_on_an_empty_backend_removes_nothing(backend):
    assert backend.storage.remove_expired(now=time.time() + 10**6) == (0, 0)


# --------------------------------------------------------------------------- links and description


def test_a_permanent_link_is_stable_and_names_the_key(backend):
    key = "generations/abc-0.png"
    before = backend.storage.url(key, BASE_URL)  # links are handed out before the job stores the object
    backend.storage.put(key, b"png", PNG)
    after = backend.storage.url(key, BASE_URL)

    assert before == after == backend.storage.url(key, BASE_URL)
    assert after.endswith(f"/{key}")
    assert after.startswith(("http://", "https://"))
    assert backend.storage.url("generations/abc-1.png", BASE_URL) != after
    backend.storage.put(key, b"png, again", PNG)
    assert backend.storage.url(key, BASE_URL) == after  # an overwrite keeps the link
    assert backend.read_link(after) == b"png, again"


def test_describe_is_a_dict_without_the_secret(backend):
    backend.storage.put("generations/k-0.png", b"x", PNG)
    described = backend.storage.describe()

    assert isinstance(described, dict) and described
    text = json.dumps(described)  # what system_details and update_s3 answer with
    assert SECRET not in text
    assert SECRET not in repr(backend.storage)
