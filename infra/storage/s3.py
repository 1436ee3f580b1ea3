"""Outputs in the customer's S3-compatible bucket (update_s3): AWS S3, Cloudflare R2, DigitalOcean
Spaces, MinIO, GCS interoperability... `S3Storage` has `LocalStorage`'s interface (`put` / `url` /
`open_path` / `expires_at` / `remove_expired`), plus `check()`, the test write update_s3 runs before
it accepts credentials, and `describe()`, the configuration without its secret.

Layout inside the bucket (`<dir>` is `image_directory`, the ModelsLab key prefix; may be empty):

    <dir>/<key>                           the object: its ContentType, the ACL when one is configured
                                          (setting `s3_acl`), and for expiring objects the metadata
                                          `expires-at` (unix seconds)
    <dir>/.expires/<expires-at>/<key>     an empty expiry marker per expiring object

The expiry sits in the marker's *name* (ten digits, zero-padded, so markers also sort by expiry):
`remove_expired` learns every expiry from one listing (1000 markers a request) instead of reading
each marker, and reads only the expired objects (HeadObject, for their size) before deleting them.

Links: permanent objects are linked under `public_url` (the customer makes that prefix readable:
a public bucket, a CDN, an ACL); expiring ones get a presigned GET URL on the S3 endpoint itself,
valid until the object expires (S3 caps a presigned URL at 7 days), so a temp output never needs
to be public. Presigning is a local computation: it never calls the network.

The secret access key is persisted by `S3Config.to_json` (the caller writes that file 0600) and
nowhere else: `repr`, `str`, `redacted()` and every `StorageError` message leave it out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlparse

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from infra.net import fetcher
from infra.storage.base import EXPIRY_DIR, StorageError
from models.errors import BadInput

log = logging.getLogger(__name__)

__all__ = ["S3Config", "S3Storage", "StorageError", "resolve_bucket"]

CHECK_PREFIX = ".sdapi-check-"
PRESIGN_MAX_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
SECRET_MASK = "****"

# Hosts that carry the bucket as their first label (virtual-hosted style): the bucket, and the
# provider's endpoint once the bucket is taken off. AWS also has legacy `s3-<region>` and dualstack forms.
VIRTUAL_HOSTS = (
    re.compile(r"^(?P<bucket>.+?)\.(?P<endpoint>s3(?:[.-][a-z0-9-]+)*\.amazonaws\.com(?:\.cn)?)$"),
    re.compile(r"^(?P<bucket>[^.]+)\.(?P<endpoint>[a-z0-9-]+\.digitaloceanspaces\.com)$"),
    re.compile(r"^(?P<bucket>[^.]+)\.(?P<endpoint>[0-9a-f]{32}(?:\.[a-z]+)?\.r2\.cloudflarestorage\.com)$"),
    re.compile(r"^(?P<bucket>.+?)\.(?P<endpoint>storage\.googleapis\.com)$"),
    re.compile(r"^(?P<bucket>[^.]+)\.(?P<endpoint>s3(?:\.[a-z0-9-]+)?\.wasabisys\.com)$"),
    re.compile(r"^(?P<bucket>[^.]+)\.(?P<endpoint>s3\.[a-z0-9-]+\.backblazeb2\.com)$"),
)
BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")

# What an S3 error code means for the customer who set the credentials.
ERROR_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied: the key lacks a permission on the bucket; it needs s3:PutObject, s3:GetObject, "
    "s3:DeleteObject, s3:ListBucket, and s3:PutObjectAcl when an ACL is set",
    "AllAccessDisabled": "access to the bucket is disabled",
    "InvalidAccessKeyId": "invalid access key: the endpoint does not know this aws_access_key_id",
    "SignatureDoesNotMatch": "signature mismatch: wrong aws_secret_access_key (or region_name)",
    "AuthorizationHeaderMalformed": "wrong region_name for this bucket",
    "PermanentRedirect": "the bucket lives in another region: use that region's endpoint_url",
    "AccessControlListNotSupported": "the bucket has ACLs disabled: unset the s3_acl setting",
    "InvalidBucketName": "invalid bucket name",
    "RequestTimeTooSkewed": "this server's clock is too far off the endpoint's",
    "NoSuchKey": "the object does not exist",
    "404": "not found",
    "403": "access denied (HTTP 403)",
}


def _is_aws(endpoint_url: str) -> bool:
    host = urlparse(endpoint_url).hostname or ""
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


@dataclass(frozen=True)
class S3Config:
    """Where outputs go. `endpoint_url` is the service endpoint without the bucket; `addressing_style`
    is how requests name the bucket: `virtual` (in the host name) or `path` (first path segment)."""

    endpoint_url: str
    region_name: str
    bucket: str
    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    public_url: str = ""
    image_directory: str = ""
    acl: str | None = None
    addressing_style: str = ""  # empty: virtual on AWS (path for dotted bucket names), path elsewhere

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise in place once, at construction
        set_(self, "endpoint_url", self.endpoint_url.strip().rstrip("/"))
        set_(self, "image_directory", "/".join(p for p in self.image_directory.strip().split("/") if p))
        set_(self, "acl", self.acl or None)
        if not self.addressing_style:
            virtual = _is_aws(self.endpoint_url) and "." not in self.bucket  # dotted names break TLS wildcards
            set_(self, "addressing_style", "virtual" if virtual else "path")
        if self.addressing_style not in ("virtual", "path"):
            raise ValueError(f"addressing_style must be virtual or path, not {self.addressing_style!r}")

    @classmethod
    def from_request(cls, req, acl: str | None = None) -> S3Config:
        """From an `UpdateS3Request`; the bucket is `req.bucket`, or read from `endpoint_url`
        (see `resolve_bucket`). Raises BadInput when it cannot be found or a URL is unusable."""
        public_url = req.public_url.strip()
        if urlparse(public_url).scheme not in ("http", "https") or not urlparse(public_url).hostname:
            raise BadInput(f"public_url must be an http(s) URL, got {public_url!r}")
        bucket, endpoint_url, style = resolve_bucket(req.endpoint_url, req.bucket)
        return cls(
            endpoint_url=endpoint_url,
            region_name=req.region_name.strip() or "us-east-1",
            bucket=bucket,
            access_key_id=req.aws_access_key_id.strip(),
            secret_access_key=req.aws_secret_access_key.strip(),
            public_url=public_url,
            image_directory=req.image_directory,
            acl=acl,
            addressing_style=style,
        )

    def redacted(self) -> dict:
        """Every field, the secret replaced by `****`: for logs and API responses."""
        return {**dataclasses.asdict(self), "secret_access_key": SECRET_MASK}

    def to_json(self) -> str:
        """Every field, the secret included: for the settings file (the caller writes it 0600)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> S3Config:
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def resolve_bucket(endpoint_url: str, bucket: str | None = None) -> tuple[str, str, str]:
    """(bucket, endpoint without the bucket, addressing style) from update_s3's endpoint_url.

    - `bucket` given: used as is; a virtual-hosted host or a path naming that same bucket is
      taken off the endpoint (other paths stay: an S3 gateway may live under a path); a host
      naming another bucket is refused.
    - a known virtual-hosted host (`<bucket>.s3[.<region>].amazonaws.com`,
      `<bucket>.<region>.digitaloceanspaces.com`, R2, GCS, Wasabi, Backblaze): its first label.
    - otherwise the one path segment (`https://<acct>.r2.cloudflarestorage.com/<bucket>`,
      `http://127.0.0.1:9000/<bucket>`).
    Nothing found, or a URL that is not http(s) -> BadInput.
    """
    url = urlparse(endpoint_url.strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        raise BadInput(f"endpoint_url must be an http(s) URL, got {endpoint_url.strip()!r}")
    if url.username or url.password or url.query or url.fragment:
        raise BadInput("endpoint_url must not carry credentials, a query or a fragment")
    try:
        port = f":{url.port}" if url.port else ""
    except ValueError:
        raise BadInput(f"endpoint_url has an invalid port: {endpoint_url.strip()!r}") from None
    host, origin = url.hostname, f"{url.scheme}://{url.netloc}"
    segments = [s for s in url.path.split("/") if s]
    bucket = (bucket or "").strip() or None

    virtual = next((m for m in (p.match(host) for p in VIRTUAL_HOSTS) if m), None)
    if virtual and bucket not in (None, virtual["bucket"]):
        raise BadInput(f"endpoint_url names bucket {virtual['bucket']!r} but `bucket` is {bucket!r}")
    if virtual:
        found, endpoint, style = virtual["bucket"], f"{url.scheme}://{virtual['endpoint']}{port}", "virtual"
        if "." in found and url.scheme == "https":
            style = "path"  # a dotted bucket name does not match the provider's wildcard certificate
        if segments:
            raise BadInput(f"endpoint_url names bucket {found!r} in its host and also has a path: drop the path")
    elif bucket is not None:
        if segments == [bucket]:
            segments = []
        found, endpoint, style = bucket, origin + "".join(f"/{s}" for s in segments), ""
    elif len(segments) == 1:
        found, endpoint, style = segments[0], origin, ""
    elif segments:
        raise BadInput(
            f"endpoint_url path {url.path!r} has more than the bucket: put the bucket alone in the path "
            "(or send `bucket`) and the folder in image_directory"
        )
    else:
        raise BadInput(
            f"no bucket in endpoint_url {endpoint_url.strip()!r}: send `bucket`, or use an endpoint_url that names "
            "it (https://<bucket>.s3.<region>.amazonaws.com or https://<host>/<bucket>)"
        )
    if not BUCKET_NAME.match(found):
        raise BadInput(f"invalid bucket name {found!r}")
    return found, endpoint, style


class S3Storage:
    """Outputs as objects in one bucket under `image_directory`. Thread-safe (boto3 clients are)."""

    url_prefix = "/files"  # like LocalStorage, for the app's file route; `open_path` gives it nothing to serve
    list_page_size = 1000  # markers a ListObjectsV2 request returns (S3's maximum)
    delete_batch_size = 1000  # keys a DeleteObjects request takes (S3's maximum)
    check_timeout = 5.0  # seconds per network step of `check()`

    def __init__(self, config: S3Config):
        self.config = config
        self.client = self._client(max_attempts=2, connect_timeout=5, read_timeout=30)

    @functools.cached_property
    def _check_client(self):
        """`check()` runs while a customer waits on update_s3: one attempt, so an unreachable
        endpoint fails within ~`check_timeout` instead of twice that plus a backoff."""
        return self._client(max_attempts=1, connect_timeout=self.check_timeout, read_timeout=self.check_timeout)

    def _client(self, max_attempts: int, connect_timeout: float, read_timeout: float):
        c = self.config
        config = Config(
            signature_version="s3v4",
            # `total_max_attempts` counts the first try; botocore's `max_attempts` counts retries only
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": c.addressing_style},
            # botocore >= 1.36 adds CRC checksums to every upload by default, which several
            # S3-compatible services reject; checksums only where the S3 API requires them
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # a session of its own: boto3's shared default session is not safe to create clients from in
        # several threads; endpoint, region and credentials are explicit, whatever ~/.aws or AWS_* hold
        return boto3.session.Session().client(
            "s3",
            endpoint_url=c.endpoint_url,
            region_name=c.region_name,
            aws_access_key_id=c.access_key_id,
            aws_secret_access_key=c.secret_access_key,
            config=config,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.config!r})"

    def describe(self) -> dict:
        return self.config.redacted()

    # ----------------------------------------------------------------------------- keys and links

    def object_key(self, key: str) -> str:
        """The object's key in the bucket: `image_directory/key` (just `key` without a directory)."""
        if any(part in (".", "..") for part in key.split("/")) or key.startswith("/"):
            raise ValueError(f"storage key escapes image_directory: {key!r}")
        return f"{self.config.image_directory}/{key}" if self.config.image_directory else key

    def _marker_key(self, key: str, expires_at: float) -> str:
        return self.object_key(f"{EXPIRY_DIR}/{math.ceil(expires_at):010d}/{key}")

    def url(self, key: str, base_url: str = "", expires_at: float | None = None) -> str:
        """The link handed to clients. Permanent: `public_url` + object key. Expiring: a presigned
        GET on the endpoint, valid until `expires_at` (at most 7 days). `base_url` (the app's own
        address) is unused: S3 objects are not served by the app."""
        object_key = self.object_key(key)
        if expires_at is None:
            return f"{self.public_base()}/{quote(self._linked_key(key, object_key))}"
        seconds = min(PRESIGN_MAX_SECONDS, max(1, math.ceil(expires_at - time.time())))
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": object_key}, ExpiresIn=seconds
        )

    def public_base(self) -> str:
        return self.config.public_url.rstrip("/")

    def _linked_key(self, key: str, object_key: str) -> str:
        """What follows `public_url` in a link. `public_url` is the prefix the bucket is readable
        under, so the object key (image_directory included) follows it; but when `public_url` already
        ends with image_directory, it is that directory's own URL (as ModelsLab's update_s3 example
        means it: `.../generations/` with image_directory `generations`), and the key follows it."""
        directory = self.config.image_directory
        if directory and urlparse(self.public_base()).path.endswith("/" + directory):
            return key
        return object_key

    def open_path(self, key: str, now: float | None = None) -> None:
        """Never a local file: S3 objects are not served by the app."""
        return None

    # ----------------------------------------------------------------------------- objects

    def put(self, key: str, data: bytes, content_type: str, expires_at: float | None = None) -> None:
        """Store one object. The expiry marker is written first, so an object that should expire
        is never in the bucket without one. Any failure -> StorageError."""
        c = self.config
        object_key = self.object_key(key)
        extra: dict = {}
        if c.acl:
            extra["ACL"] = c.acl
        try:
            if expires_at is not None:
                stamp = str(math.ceil(expires_at))
                self.client.put_object(
                    Bucket=c.bucket, Key=self._marker_key(key, expires_at), Body=b"", Metadata={"expires-at": stamp}
                )
                extra["Metadata"] = {"expires-at": stamp}
            self.client.put_object(Bucket=c.bucket, Key=object_key, Body=data, ContentType=content_type, **extra)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"could not store {object_key}", exc) from None

    def expires_at(self, key: str) -> float | None:
        """The object's expiry (its `expires-at` metadata); None for a permanent or missing object."""
        try:
            head = self.client.head_object(Bucket=self.config.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(f"could not read {self.object_key(key)}", exc) from None
        except BotoCoreError as exc:
            raise self._error(f"could not read {self.object_key(key)}", exc) from None
        stamp = head.get("Metadata", {}).get("expires-at")
        return float(stamp) if stamp else None

    def remove_expired(self, now: float | None = None) -> tuple[int, int]:
        """Delete every object past its expiry, and its marker: (objects removed, bytes freed).
        A listing failure raises StorageError (the cleaner logs it and tries again next pass);
        an object that cannot be read or deleted keeps its marker for the next pass."""
        now = time.time() if now is None else now
        c = self.config
        prefix = self.object_key(f"{EXPIRY_DIR}/")
        expired: list[tuple[str, str]] = []  # (marker key, object key)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=c.bucket, Prefix=prefix, PaginationConfig={"PageSize": self.list_page_size}
            )
            for page in pages:
                for item in page.get("Contents", []):
                    stamp, _, key = item["Key"][len(prefix) :].partition("/")
                    if stamp.isdigit() and key and int(stamp) <= now:
                        expired.append((item["Key"], self.object_key(key)))
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"could not list the expiry markers under {prefix}", exc) from None

        sizes: dict[str, int] = {}  # object key -> bytes, for the objects that still exist
        settled: list[tuple[str, str]] = []  # (marker, object) where the object exists or is known gone
        stale: list[str] = []  # markers of an expiry the object no longer has (put again since)
        for marker, object_key in expired:
            try:
                head = self.client.head_object(Bucket=c.bucket, Key=object_key)
                stamp = head.get("Metadata", {}).get("expires-at")
                if not stamp or not stamp.isdigit() or int(stamp) > now:  # permanent now, or expiring later
                    stale.append(marker)
                    continue
                sizes[object_key] = head["ContentLength"]
            except ClientError as exc:
                if _error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
                    log.warning("expired %s not removed: %s", object_key, _reason(exc))
                    continue
            except BotoCoreError as exc:
                log.warning("expired %s not removed: %s", object_key, _reason(exc))
                continue
            settled.append((marker, object_key))

        # objects first, then the markers of the objects that are gone: a marker never goes before its object
        failed = self._delete(list(sizes))
        self._delete([marker for marker, object_key in settled if object_key not in failed] + stale)
        removed = [k for k in sizes if k not in failed]
        return len(removed), sum(sizes[k] for k in removed)

    def _delete(self, keys: list[str]) -> set[str]:
        """DeleteObjects in batches; the keys that could not be deleted. A service that refuses
        DeleteObjects itself (some S3-compatibles want Content-MD5, not the CRC botocore sends) gets
        one DeleteObject per key instead."""
        failed: set[str] = set()
        for start in range(0, len(keys), self.delete_batch_size):
            batch = keys[start : start + self.delete_batch_size]
            try:
                answer = self.client.delete_objects(
                    Bucket=self.config.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except ClientError as exc:
                log.info("DeleteObjects refused (%s): deleting one by one", _reason(exc))
                failed |= self._delete_each(batch)
                continue
            except BotoCoreError as exc:
                log.warning("could not delete %d expired objects: %s", len(batch), _reason(exc))
                failed |= set(batch)
                continue
            for error in answer.get("Errors", []):
                log.warning("could not delete %s: %s", error.get("Key"), error.get("Code"))
                failed.add(error.get("Key"))
        return failed

    def _delete_each(self, keys: list[str]) -> set[str]:
        failed = set()
        for key in keys:
            try:
                self.client.delete_object(Bucket=self.config.bucket, Key=key)
            except (BotoCoreError, ClientError) as exc:
                log.warning("could not delete %s: %s", key, _reason(exc))
                failed.add(key)
        return failed

    # ----------------------------------------------------------------------------- the check

    def check(self, allowlist: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The test update_s3 runs before accepting credentials: write a small object
        `<image_directory>/.sdapi-check-<uuid>` (with the ACL, when one is set), read it back,
        fetch it under `public_url` (through the SSRF-safe fetcher: a private address only when
        in `allowlist`), delete it. A failed write or read -> StorageError naming what
        failed. What does not stop outputs from being stored comes back as warnings: `public_url`
        not serving the object (links would not open), and a refused delete (the ModelsLab policy
        grants no s3:DeleteObject: the check object stays, expired temp outputs cannot be removed).
        """
        c = self.config
        name = f"{CHECK_PREFIX}{uuid.uuid4().hex}"
        object_key = self.object_key(name)
        body = f"sd-enterprise-api storage check {object_key}\n".encode()
        extra = {"ACL": c.acl} if c.acl else {}
        warnings = []
        try:
            self._check_client.put_object(Bucket=c.bucket, Key=object_key, Body=body, ContentType="text/plain", **extra)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"S3 check failed: could not write the test object {object_key}", exc) from None
        try:
            try:
                read = self._check_client.get_object(Bucket=c.bucket, Key=object_key)["Body"].read()
            except (BotoCoreError, ClientError) as exc:
                raise self._error(f"S3 check failed: could not read back the test object {object_key}", exc) from None
            if read != body:
                raise StorageError(
                    f"S3 check failed: the test object {object_key} read back from bucket {c.bucket} "
                    f"at {c.endpoint_url} differs from what was written"
                )
            if warning := self._check_public_url(name, body, allowlist):
                warnings.append(warning)
        finally:
            try:
                self._check_client.delete_object(Bucket=c.bucket, Key=object_key)
            except (BotoCoreError, ClientError) as exc:
                warnings.append(
                    f"could not delete the test object {object_key} ({_reason(exc)}): it stays in the bucket, "
                    "and expired temp outputs cannot be removed without s3:DeleteObject"
                )
        for warning in warnings:
            log.warning("S3 check of bucket %s: %s", c.bucket, warning)
        return warnings

    def _check_public_url(self, key: str, body: bytes, allowlist) -> str | None:
        """A warning when the object `key` cannot be read under public_url, else None."""
        link = self.url(key)
        try:
            with fetcher.stream("GET", link, allowlist=allowlist, timeout=self.check_timeout) as answer:
                status = answer.status_code
                content = b"".join(fetcher.iter_capped(answer, len(body) + 1)) if status == 200 else b""
        except fetcher.Blocked as exc:
            return f"public_url does not serve the objects: {exc.message}"
        except (httpx.HTTPError, fetcher.TooLarge) as exc:
            return f"public_url does not serve the objects: fetching {link} failed ({type(exc).__name__})"
        if status != 200 or content != body:
            return (
                f"public_url does not serve the objects: {link} answered HTTP {status}"
                + (" with other content" if status == 200 else "")
                + "; links handed to clients will not open (public_url must be the prefix the bucket is readable"
                " under, image_directory is appended to it; or the URL of image_directory itself)"
            )
        return None

    # ----------------------------------------------------------------------------- errors

    def _error(self, what: str, exc: Exception) -> StorageError:
        """`<what> in bucket <b> at <endpoint>: <reason>`, never with the secret in it."""
        c = self.config
        message = f"{what} in bucket {c.bucket} at {c.endpoint_url}: {_reason(exc)}"
        if len(c.secret_access_key) >= 8:  # belt and braces: no S3 error message quotes the secret
            message = message.replace(c.secret_access_key, SECRET_MASK)
        return StorageError(message)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _reason(exc: Exception) -> str:
    """An S3 / connection error in words a customer can act on."""
    if isinstance(exc, ClientError):
        code = _error_code(exc) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        hint = ERROR_HINTS.get(code)
        message = str(exc.response.get("Error", {}).get("Message") or "")[:200]
        if hint:
            return f"{code} ({hint})"
        return f"{code}: {message}" if message else code
    if isinstance(exc, ConnectTimeoutError):
        return "endpoint unreachable (connect timed out)"
    if isinstance(exc, ReadTimeoutError):
        return "the endpoint did not answer (read timed out)"
    if isinstance(exc, EndpointConnectionError):
        cause = str(exc.kwargs.get("error", ""))
        if "refused" in cause.lower():
            return "endpoint unreachable (connection refused)"
        if "Name or service not known" in cause or "nodename nor servname" in cause or "getaddrinfo" in cause:
            return "endpoint unreachable (unknown host name)"
        return "endpoint unreachable"
    return f"{type(exc).__name__}: {exc}"
