"""S3Storage against a real S3 endpoint on loopback: moto's server (ThreadedMotoServer) in this
process, spoken to over HTTP by boto3 exactly as a customer's bucket would be.

What moto checks and what it does not: by default it accepts any credentials and any signature
(presigned URLs download, but their signature and expiry are not verified), while anonymous reads
(public_url links) do go through the object's ACL. Switched to IAM mode (`/moto-api/reset-auth`, the `iam_mode` fixture) it
really computes SigV4 signatures against the secrets of IAM users it created and evaluates their
policies: unknown access key, wrong secret and a missing permission are tested there. Bucket
policies, ACL-disabled buckets (AccessControlListNotSupported) and region redirects are not
emulated and not tested. A missing bucket, a closed port and a silent endpoint are real.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from urllib.parse import parse_qs, urlparse

import boto3
import httpx
import pytest

from infra.storage.s3 import PRESIGN_MAX_SECONDS, S3Config, S3Storage, StorageError, resolve_bucket
from models.errors import BadInput
from models.requests import UpdateS3Request
from tests.conftest import free_port

LOOPBACK = ("127.0.0.1", "localhost")  # moto and the test servers live there; the fetcher refuses it otherwise
SECRET = f"sk-{uuid.uuid4().hex}"  # a secret no message may ever contain
ADMIN_CREDS = {"region_name": "us-east-1", "aws_access_key_id": "admin", "aws_secret_access_key": "admin-secret"}


@pytest.fixture(scope="module")
def endpoint(moto_endpoint):
    return moto_endpoint


@pytest.fixture(scope="module")
def admin(endpoint):
    """A plain boto3 client for setting up buckets and looking at what S3Storage wrote."""
    return boto3.client("s3", endpoint_url=endpoint, **ADMIN_CREDS)


@pytest.fixture
def bucket(admin) -> str:
    name = f"out-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    return name


def storage_for(endpoint: str, bucket: str, **overrides) -> S3Storage:
    fields = {
        "endpoint_url": endpoint,
        "region_name": "us-east-1",
        "bucket": bucket,
        "access_key_id": "AKIAEXAMPLE",
        "secret_access_key": SECRET,
        "public_url": f"{endpoint}/{bucket}/",  # moto serves objects anonymously, path-style
        "image_directory": "generations",
    }
    return S3Storage(S3Config(**{**fields, **overrides}))


def keys(admin, bucket: str) -> set[str]:
    pages = admin.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def assert_no_secret(text: str):
    assert SECRET not in text


# --------------------------------------------------------------------------- objects and links


def test_put_stores_the_object_under_image_directory(endpoint, admin, bucket):
    storage = storage_for(endpoint, bucket, image_directory="/generations/2026/")
    storage.put("abc-0.png", b"\x89PNG fake", "image/png")

    got = admin.get_object(Bucket=bucket, Key="generations/2026/abc-0.png")
    assert got["ContentType"] == "image/png"
    assert got["Body"].read() == b"\x89PNG fake"
    assert got["Metadata"] == {}  # permanent: no expiry metadata...
    assert keys(admin, bucket) == {"generations/2026/abc-0.png"}  # ...and no marker


def test_an_empty_image_directory_puts_objects_at_the_bucket_root(endpoint, admin, bucket):
    storage = storage_for(endpoint, bucket, image_directory="", public_url="https://cdn.example")
    storage.put("abc-0.jpg", b"jpeg", "image/jpeg")
    assert keys(admin, bucket) == {"abc-0.jpg"}
    assert storage.url("abc-0.jpg", "http://ignored") == "https://cdn.example/abc-0.jpg"


def test_keys_that_climb_out_of_image_directory_are_refused(endpoint, bucket):
    storage = storage_for(endpoint, bucket)
    for key in ("../other/x.png", "a/./b.png", "/abs.png"):
        with pytest.raises(ValueError):
            storage.put(key, b"x", "image/png")


def test_the_public_link_is_public_url_plus_the_object_key(endpoint, bucket):
    for public_url in ("https://cdn.example", "https://cdn.example/", "https://cdn.example//"):
        storage = storage_for(endpoint, bucket, public_url=public_url)
        assert storage.url("abc-0.png", "http://app") == "https://cdn.example/generations/abc-0.png"
    storage = storage_for(endpoint, bucket, public_url="https://cdn.example/media/")
    assert storage.url("sub dir/a+b.png", "") == "https://cdn.example/media/generations/sub%20dir/a%2Bb.png"


def test_a_public_url_naming_the_directory_as_the_docs_example_does_links_outputs_that_open(endpoint, bucket):
    """update_s3's example sends `public_url` ending in `generations/` with image_directory
    `generations`: the URL of the directory. A stored output opens through its link, and the check
    warns of nothing."""
    storage = storage_for(endpoint, bucket, public_url=f"{endpoint}/{bucket}/generations/", image_directory="generations",
                          acl="public-read")
    assert storage.check(LOOPBACK) == []
    storage.put("generations/abc-0.png", b"image bytes", "image/png")  # an output's key, as jobs store it
    link = storage.url("generations/abc-0.png", "")
    assert link == f"{endpoint}/{bucket}/generations/generations/abc-0.png"  # the object's own address
    answer = httpx.get(link)
    assert answer.status_code == 200 and answer.content == b"image bytes"


def test_the_public_link_downloads_the_object_the_acl_makes_public(endpoint, bucket):
    storage = storage_for(endpoint, bucket, acl="public-read")
    storage.put("abc-0.png", b"image bytes", "image/png")
    answer = httpx.get(storage.url("abc-0.png", "http://app"))
    assert answer.status_code == 200
    assert answer.content == b"image bytes"
    assert answer.headers["content-type"] == "image/png"

    storage_for(endpoint, bucket).put("private.png", b"x", "image/png")  # moto applies ACLs to anonymous reads
    assert httpx.get(storage.url("private.png", "http://app")).status_code == 403


def test_the_configured_acl_is_set_on_every_object(endpoint, admin, bucket):
    all_users = "http://acs.amazonaws.com/groups/global/AllUsers"

    def public_grants(key):
        grants = admin.get_object_acl(Bucket=bucket, Key=key)["Grants"]
        return [g["Permission"] for g in grants if g["Grantee"].get("URI") == all_users]

    storage_for(endpoint, bucket, acl="public-read").put("public.png", b"x", "image/png")
    storage_for(endpoint, bucket).put("private.png", b"x", "image/png")
    assert public_grants("generations/public.png") == ["READ"]
    assert public_grants("generations/private.png") == []


def test_a_temp_object_gets_a_presigned_link_that_downloads_it_and_expires(endpoint, admin, bucket):
    storage = storage_for(endpoint, bucket, public_url="https://cdn.example/")
    expires_at = time.time() + 3600
    storage.put("temp-0.png", b"temp bytes", "image/png", expires_at=expires_at)

    link = storage.url("temp-0.png", "http://app", expires_at=expires_at)
    parsed = urlparse(link)
    query = parse_qs(parsed.query)
    assert f"{parsed.scheme}://{parsed.netloc}" == endpoint  # on the S3 endpoint, not public_url
    assert parsed.path == f"/{bucket}/generations/temp-0.png"
    assert 3590 <= int(query["X-Amz-Expires"][0]) <= 3600
    assert query["X-Amz-Signature"][0] and query["X-Amz-Credential"][0].startswith("AKIAEXAMPLE/")
    assert_no_secret(link)
    answer = httpx.get(link)
    assert answer.status_code == 200 and answer.content == b"temp bytes"

    head = admin.head_object(Bucket=bucket, Key="generations/temp-0.png")
    assert head["Metadata"] == {"expires-at": str(int(expires_at) + 1)}
    assert storage.expires_at("temp-0.png") == int(expires_at) + 1
    assert storage.expires_at("missing.png") is None
    assert keys(admin, bucket) == {"generations/temp-0.png", f"generations/.expires/{int(expires_at) + 1}/temp-0.png"}


def test_a_presigned_link_lives_at_most_seven_days(endpoint, bucket):
    storage = storage_for(endpoint, bucket)
    link = storage.url("a.png", "", expires_at=time.time() + 30 * 24 * 3600)
    assert parse_qs(urlparse(link).query)["X-Amz-Expires"] == [str(PRESIGN_MAX_SECONDS)]
    past = storage.url("a.png", "", expires_at=time.time() - 60)
    assert parse_qs(urlparse(past).query)["X-Amz-Expires"] == ["1"]


def test_presigning_does_not_touch_the_network(monkeypatch):
    """An endpoint nothing listens on and an AWS host name: both presign with every socket
    connection refused by the test. The AWS endpoint is addressed virtual-hosted, others path-style."""
    dead = storage_for(f"http://127.0.0.1:{free_port()}", "bkt")

    def no_network(*args, **kwargs):
        raise AssertionError("presigning opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    link = dead.url("a.png", "", expires_at=time.time() + 60)
    assert urlparse(link).path == "/bkt/generations/a.png"

    aws = S3Storage(S3Config.from_request(update_s3("https://my-out.s3.eu-west-1.amazonaws.com"), None))
    link = aws.url("a.png", "", expires_at=time.time() + 60)
    assert link.startswith("https://my-out.s3.eu-west-1.amazonaws.com/generations/a.png?")
    assert "eu-west-1%2Fs3%2Faws4_request" in link


def test_open_path_never_serves_s3_objects(endpoint, bucket):
    storage = storage_for(endpoint, bucket)
    storage.put("abc-0.png", b"x", "image/png")
    assert storage.open_path("abc-0.png") is None


# --------------------------------------------------------------------------- expiry


def test_remove_expired_deletes_expired_objects_and_markers_and_keeps_the_rest(endpoint, admin, bucket):
    storage = storage_for(endpoint, bucket)
    storage.list_page_size = 2  # several pages of markers...
    storage.delete_batch_size = 2  # ...and several DeleteObjects batches
    now = time.time()
    for i in range(3):
        storage.put(f"old-{i}.png", b"x" * (10 + i), "image/png", expires_at=now + 10)
    storage.put("fresh.png", b"fresh", "image/png", expires_at=now + 1000)
    storage.put("permanent.png", b"kept", "image/png")
    storage.put("gone.png", b"gone", "image/png", expires_at=now + 10)
    admin.delete_object(Bucket=bucket, Key="generations/gone.png")  # deleted by hand: its marker stays
    admin.put_object(Bucket=bucket, Key="generations/.expires/not-a-stamp", Body=b"")  # foreign: left alone

    assert storage.remove_expired(now=now) == (0, 0)  # nothing has expired yet
    assert storage.remove_expired(now=now + 100) == (3, 10 + 11 + 12)
    assert keys(admin, bucket) == {
        "generations/fresh.png",
        f"generations/.expires/{int(now + 1000) + 1}/fresh.png",
        "generations/permanent.png",
        "generations/.expires/not-a-stamp",
    }
    assert storage.remove_expired(now=now + 100) == (0, 0)
    assert storage.remove_expired(now=now + 2000) == (1, 5)
    assert keys(admin, bucket) == {"generations/permanent.png", "generations/.expires/not-a-stamp"}


def test_remove_expired_only_looks_under_its_own_image_directory(endpoint, admin, bucket):
    now = time.time()
    storage_for(endpoint, bucket, image_directory="a").put("x.png", b"x", "image/png", expires_at=now)
    assert storage_for(endpoint, bucket, image_directory="b").remove_expired(now=now + 10) == (0, 0)
    assert "a/x.png" in keys(admin, bucket)


# --------------------------------------------------------------------------- the check and failures


def test_check_passes_on_a_working_bucket_and_leaves_nothing_behind(endpoint, admin, bucket):
    storage = storage_for(endpoint, bucket, acl="public-read")
    assert storage.check(LOOPBACK) == []
    assert keys(admin, bucket) == set()


def test_check_warns_when_public_url_does_not_serve_the_objects(endpoint, admin, bucket):
    wrong = storage_for(endpoint, bucket, public_url=f"{endpoint}/{bucket}/media/")  # not where the bucket is served
    [warning] = wrong.check(LOOPBACK)
    assert "public_url does not serve the objects" in warning and "HTTP 404" in warning
    dead = storage_for(endpoint, bucket, public_url=f"http://127.0.0.1:{free_port()}/")
    [warning] = dead.check(LOOPBACK)
    assert "ConnectError" in warning
    assert keys(admin, bucket) == set()


def test_check_names_a_missing_bucket(endpoint):
    storage = storage_for(endpoint, "no-such-bucket-here")
    with pytest.raises(StorageError) as caught:
        storage.check(LOOPBACK)
    message = str(caught.value)
    assert "NoSuchBucket (the bucket does not exist)" in message
    assert f"in bucket no-such-bucket-here at {endpoint}" in message
    assert_no_secret(message)


def test_check_fails_fast_on_an_unreachable_endpoint():
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError) as caught:
        storage_for(endpoint, "bkt").check(LOOPBACK)
    assert f"in bucket bkt at {endpoint}: endpoint unreachable (connection refused)" in str(caught.value)
    assert_no_secret(str(caught.value))


def test_check_gives_up_on_an_endpoint_that_never_answers(monkeypatch):
    """A port that accepts connections and never replies: the check's read timeout, one attempt."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    monkeypatch.setattr(S3Storage, "check_timeout", 0.5)  # + botocore's 1 s wait for `100 Continue`
    try:
        with pytest.raises(StorageError) as caught:
            storage_for(f"http://127.0.0.1:{server.getsockname()[1]}", "bkt").check(LOOPBACK)
        assert "the endpoint did not answer (read timed out)" in str(caught.value)
    finally:
        server.close()
        for conn, _ in held:
            conn.close()


def test_put_to_a_stopped_endpoint_raises_storage_error():
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError) as caught:
        storage_for(endpoint, "bkt").put("abc-0.png", b"x", "image/png", expires_at=time.time() + 60)
    message = str(caught.value)
    assert message == (
        f"could not store generations/abc-0.png in bucket bkt at {endpoint}: endpoint unreachable (connection refused)"
    )
    assert_no_secret(message)


def test_put_to_a_missing_bucket_raises_storage_error(endpoint):
    with pytest.raises(StorageError) as caught:
        storage_for(endpoint, "no-such-bucket-here").put("abc-0.png", b"x", "image/png")
    assert str(caught.value) == (
        f"could not store generations/abc-0.png in bucket no-such-bucket-here at {endpoint}: "
        "NoSuchBucket (the bucket does not exist)"
    )


@pytest.fixture
def iam_mode(endpoint, bucket):
    """moto with IAM authentication on: returns make_user(actions) -> (access key id, secret).
    Users are created (and the bucket exists) before authentication is switched on."""
    iam = boto3.client("iam", endpoint_url=endpoint, **ADMIN_CREDS)

    def make_user(actions: list[str]) -> tuple[str, str]:
        name = f"u-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": actions,
                    "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                }
            ],
        }
        iam.put_user_policy(UserName=name, PolicyName="outputs", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    users = {
        "full": make_user(["s3:*"]),
        "read-only": make_user(["s3:GetObject", "s3:ListBucket"]),
        # the policy ModelsLab's update_s3 page asks for: no s3:DeleteObject
        "modelslab": make_user(["s3:ListBucket", "s3:PutObject", "s3:GetObject", "s3:PutObjectAcl"]),
    }
    httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        yield users
    finally:
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"inf").raise_for_status()


def test_check_names_bad_credentials_and_missing_permissions(endpoint, bucket, iam_mode):
    def check(access_key_id, secret):
        storage = storage_for(endpoint, bucket, access_key_id=access_key_id, secret_access_key=secret)
        return storage.check(LOOPBACK)

    def failure(access_key_id, secret) -> str:
        with pytest.raises(StorageError) as caught:
            check(access_key_id, secret)
        assert secret not in str(caught.value)
        return str(caught.value)

    # with authentication on, anonymous reads are refused: the public_url warning is moto being private
    [warning] = check(*iam_mode["full"])
    assert "HTTP 403" in warning

    full_key = iam_mode["full"][0]
    assert "SignatureDoesNotMatch (signature mismatch: wrong aws_secret_access_key" in failure(full_key, SECRET)
    assert "InvalidAccessKeyId (invalid access key" in failure("AKIAUNKNOWN000000000", SECRET)
    message = failure(*iam_mode["read-only"])
    assert "could not write the test object" in message and "AccessDenied (access denied" in message

    warnings = check(*iam_mode["modelslab"])  # stores fine; cannot delete: a warning, not a refusal
    assert any("could not delete the test object" in w and "s3:DeleteObject" in w for w in warnings)


# --------------------------------------------------------------------------- configuration


def update_s3(endpoint_url: str, bucket: str | None = None, **fields) -> UpdateS3Request:
    body = {
        "key": "k",
        "public_url": "https://cdn.example/",
        "region_name": "eu-west-1",
        "endpoint_url": endpoint_url,
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": SECRET,
        "image_directory": "generations",
        "bucket": bucket,
        **fields,
    }
    return UpdateS3Request.model_validate(body)


@pytest.mark.parametrize(
    "endpoint_url, bucket, expected",
    [
        ("https://my-out.s3.amazonaws.com", None, ("my-out", "https://s3.amazonaws.com", "virtual")),
        (
            "https://my-out.s3.eu-west-1.amazonaws.com/",
            None,
            ("my-out", "https://s3.eu-west-1.amazonaws.com", "virtual"),
        ),
        (
            "https://my-out.s3-eu-west-1.amazonaws.com",
            None,
            ("my-out", "https://s3-eu-west-1.amazonaws.com", "virtual"),
        ),
        ("https://my.dotted.out.s3.amazonaws.com", None, ("my.dotted.out", "https://s3.amazonaws.com", "path")),
        (
            "https://space1.nyc3.digitaloceanspaces.com",
            None,
            ("space1", "https://nyc3.digitaloceanspaces.com", "virtual"),
        ),
        (
            "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com/outputs",
            None,
            ("outputs", "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com", "path"),
        ),
        ("http://127.0.0.1:5000/outputs/", None, ("outputs", "http://127.0.0.1:5000", "path")),
        ("https://my-out.storage.googleapis.com", None, ("my-out", "https://storage.googleapis.com", "virtual")),
        ("https://storage.googleapis.com", "my-out", ("my-out", "https://storage.googleapis.com", "path")),
        ("https://s3.eu-west-1.amazonaws.com", "my-out", ("my-out", "https://s3.eu-west-1.amazonaws.com", "virtual")),
        # the bucket sent and also named by the endpoint: taken off the endpoint once
        ("https://my-out.s3.amazonaws.com", "my-out", ("my-out", "https://s3.amazonaws.com", "virtual")),
        ("http://minio.lan:9000/outputs", "outputs", ("outputs", "http://minio.lan:9000", "path")),
        # a gateway under a path keeps it when the bucket is sent
        ("https://gw.example/s3", "outputs", ("outputs", "https://gw.example/s3", "path")),
    ],
)
def test_from_request_finds_the_bucket(endpoint_url, bucket, expected):
    config = S3Config.from_request(update_s3(endpoint_url, bucket), acl="public-read")
    assert (config.bucket, config.endpoint_url, config.addressing_style) == expected
    assert (config.region_name, config.image_directory, config.acl) == ("eu-west-1", "generations", "public-read")
    assert (config.access_key_id, config.secret_access_key) == ("AKIAEXAMPLE", SECRET)


@pytest.mark.parametrize(
    "endpoint_url, says",
    [
        ("https://s3.amazonaws.com", "send `bucket`"),
        ("https://storage.googleapis.com/", "send `bucket`"),
        ("https://acct.r2.cloudflarestorage.com/outputs/generations", "the folder in image_directory"),
        ("ftp://files.example/outputs", "must be an http(s) URL"),
        ("https://key:secret@minio.lan/outputs", "must not carry credentials"),
        ("https://minio.lan/Bad_Bucket!", "invalid bucket name"),
    ],
)
def test_from_request_refuses_endpoints_without_a_usable_bucket(endpoint_url, says):
    with pytest.raises(BadInput) as caught:
        S3Config.from_request(update_s3(endpoint_url))
    assert says in str(caught.value)
    assert_no_secret(str(caught.value))


def test_resolve_bucket_refuses_two_different_buckets():
    with pytest.raises(BadInput, match="names bucket 'other' but `bucket` is 'mine'"):
        resolve_bucket("https://other.s3.amazonaws.com", "mine")


def test_the_secret_is_never_shown_but_is_persisted(endpoint, bucket):
    config = S3Config.from_request(update_s3("http://127.0.0.1:5000/outputs", image_directory="/a//b/"), acl=None)
    storage = S3Storage(config)
    for shown in (str(config), repr(config), repr(storage), json.dumps(storage.describe())):
        assert_no_secret(shown)
    assert storage.describe() == {
        "endpoint_url": "http://127.0.0.1:5000",
        "region_name": "eu-west-1",
        "bucket": "outputs",
        "access_key_id": "AKIAEXAMPLE",
        "secret_access_key": "****",
        "public_url": "https://cdn.example/",
        "image_directory": "a/b",
        "acl": None,
        "addressing_style": "path",
    }
    saved = config.to_json()
    assert json.loads(saved)["secret_access_key"] == SECRET
    assert S3Config.from_json(saved) == config
