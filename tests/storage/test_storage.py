"""Output storage through the app: update_s3 switches outputs to a bucket on a real S3 endpoint
on loopback (moto's server), after a test write; the switch survives a restart; reset_s3 goes
back; temp outputs get presigned links; a storage that fails makes the job fail cleanly."""

from __future__ import annotations

import uuid

import boto3
import httpx
import pytest

from tests.conftest import KEY, free_port, start_moto

API = "/api/v1/enterprise"
SECRET = f"sk-{uuid.uuid4().hex}"


def post(client, endpoint: str, **body):
    return client.post(f"{API}/{endpoint}", json={"key": KEY, **body})


def t2i(**fields) -> dict:
    return {"prompt": "x", "width": 64, "height": 64, "steps": 2, **fields}


@pytest.fixture
def bucket(moto_endpoint) -> tuple[str, object]:
    admin = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    name = f"out-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    return name, admin


def s3_body(endpoint: str, bucket: str, **overrides) -> dict:
    return {"public_url": f"{endpoint}/{bucket}/", "region_name": "us-east-1", "endpoint_url": f"{endpoint}/{bucket}",
            "aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": SECRET, "image_directory": "generations",
            **overrides}


def test_update_s3_sends_outputs_to_the_bucket_and_survives_a_restart(make_client, moto_endpoint, bucket, tmp_path):
    name, admin = bucket
    client = make_client(data_dir=tmp_path / "data", s3_acl="public-read")
    response = post(client, "update_s3", **s3_body(moto_endpoint, name))
    assert response.status_code == 200, response.text
    assert SECRET not in response.text and response.json()["storage"]["bucket"] == name

    result = post(client, "text2img", **t2i()).json()
    assert result["status"] == "success"
    link = result["output"][0]
    key = link.removeprefix(f"{moto_endpoint}/{name}/")
    assert key.startswith("generations/generations/") and key.endswith(".png")  # image_directory + our key
    head = admin.head_object(Bucket=name, Key=key)
    assert head["ContentType"] == "image/png"
    assert httpx.get(link).content[:8] == b"\x89PNG\r\n\x1a\n"  # public: the ACL made it readable

    details = post(client, "system_details")
    assert details.json()["storage"]["bucket"] == name and SECRET not in details.text
    saved = tmp_path / "data" / "config" / "s3-storage"
    assert saved.stat().st_mode & 0o077 == 0  # the secret is on disk for the owner only
    client.__exit__(None, None, None)

    again = make_client(data_dir=tmp_path / "data")
    assert post(again, "system_details").json()["storage"]["bucket"] == name
    second = post(again, "text2img", **t2i()).json()
    assert second["output"][0].startswith(f"{moto_endpoint}/{name}/generations/")

    reset = post(again, "reset_s3").json()
    assert reset["status"] == "success" and reset["storage"]["kind"] == "local"
    local = post(again, "text2img", **t2i()).json()
    assert "/files/generations/" in local["output"][0] and again.get(local["output"][0]).status_code == 200
    assert not saved.exists()


def test_temp_outputs_on_s3_get_presigned_links(make_client, moto_endpoint, bucket):
    name, admin = bucket
    client = make_client()
    assert post(client, "update_s3", **s3_body(moto_endpoint, name)).status_code == 200
    result = post(client, "text2img", **t2i(temp="yes")).json()
    link = result["output"][0]
    assert "X-Amz-Expires=" in link and "X-Amz-Signature=" in link
    assert httpx.get(link).content[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_s3_refuses_a_bucket_it_cannot_write(make_client, moto_endpoint):
    client = make_client()
    response = post(client, "update_s3", **s3_body(moto_endpoint, "no-such-bucket"))
    assert response.status_code == 400 and "no-such-bucket" in response.json()["message"]
    assert SECRET not in response.text
    assert post(client, "system_details").json()["storage"]["kind"] == "local"  # nothing changed
    unreachable = post(client, "update_s3", **s3_body(f"http://127.0.0.1:{free_port()}", "b"))
    assert unreachable.status_code == 400 and SECRET not in unreachable.text


def test_a_storage_that_fails_fails_the_job_with_a_message(make_client, moto_endpoint, bucket):
    name, admin = bucket
    client = make_client()
    assert post(client, "update_s3", **s3_body(moto_endpoint, name)).status_code == 200
    admin.delete_bucket(Bucket=name)  # the bucket goes away after the switch
    result = post(client, "text2img", **t2i()).json()
    assert result["status"] == "failed" and "could not be stored" in result["message"]
    assert SECRET not in str(result)
    assert post(client, "reset_s3").status_code == 200
    assert post(client, "text2img", **t2i()).json()["status"] == "success"


def test_clear_cache_reports_a_bucket_that_refuses_listing_instead_of_failing(make_client, moto_endpoint, bucket):
    """A bucket used since start that refuses the cleaner's listing (here: it was deleted) is named
    in clear_cache's answer, before and after reset_s3; never a 500."""
    name, admin = bucket
    client = make_client()
    assert post(client, "update_s3", **s3_body(moto_endpoint, name)).status_code == 200
    admin.delete_bucket(Bucket=name)
    for _ in ("before", "after reset_s3"):
        answer = post(client, "clear_cache")
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", body
        assert any(name in error and "list" in error for error in body["storage_errors"]), body
        assert SECRET not in str(body)
        assert post(client, "reset_s3").status_code == 200


def test_a_stopped_s3_endpoint_fails_jobs_cleanly(make_client):
    """The S3 server itself goes away after update_s3: jobs end `failed` saying so, promptly."""
    server, endpoint = start_moto()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="a",
                 aws_secret_access_key="a").create_bucket(Bucket="out")
    client = make_client()
    assert post(client, "update_s3", **s3_body(endpoint, "out")).status_code == 200
    server.stop()
    result = post(client, "text2img", **t2i()).json()
    assert result["status"] == "failed" and "could not be stored" in result["message"]
    assert SECRET not in str(result)


def test_a_default_bucket_from_the_settings_is_where_reset_s3_returns(make_client, moto_endpoint, bucket, tmp_path):
    """SDAPI_S3_CONFIG (e.g. from the Modal secret) is the server's default storage: outputs go
    there from the start, update_s3 overrides it, reset_s3 comes back to it."""
    import json

    name, admin = bucket
    other = f"other-{uuid.uuid4().hex[:8]}"
    admin.create_bucket(Bucket=other)
    client = make_client(s3_config=json.dumps(s3_body(moto_endpoint, name)))
    assert post(client, "text2img", **t2i()).json()["output"][0].startswith(f"{moto_endpoint}/{name}/")
    assert post(client, "update_s3", **s3_body(moto_endpoint, other)).status_code == 200
    assert post(client, "text2img", **t2i()).json()["output"][0].startswith(f"{moto_endpoint}/{other}/")
    assert post(client, "reset_s3").json()["storage"]["bucket"] == name
    assert post(client, "text2img", **t2i()).json()["output"][0].startswith(f"{moto_endpoint}/{name}/")


def test_update_server_applies_a_new_default_bucket_and_acl_at_once(make_client, moto_endpoint, bucket, monkeypatch):
    """SDAPI_S3_CONFIG and SDAPI_S3_ACL changed in the environment: after update_server the very
    next job's outputs go to that bucket with that ACL (the services read the settings live), and a
    broken SDAPI_S3_CONFIG is refused whole, changing nothing."""
    import json

    name, admin = bucket
    client = make_client()
    assert "/files/" in post(client, "text2img", **t2i()).json()["output"][0]
    monkeypatch.setenv("SDAPI_FETCH_ALLOWLIST", "127.0.0.1,localhost")  # what the test client was built with
    monkeypatch.setenv("SDAPI_S3_CONFIG", "{not json")
    refused = post(client, "update_server")
    assert refused.status_code == 400 and "SDAPI_S3_CONFIG" in refused.json()["message"]
    assert "/files/" in post(client, "text2img", **t2i()).json()["output"][0]

    monkeypatch.setenv("SDAPI_S3_CONFIG", json.dumps(s3_body(moto_endpoint, name)))
    monkeypatch.setenv("SDAPI_S3_ACL", "public-read")
    changed = post(client, "update_server").json()["settings_changed"]
    assert {"s3_config", "s3_acl"} <= set(changed)
    link = post(client, "text2img", **t2i()).json()["output"][0]
    assert link.startswith(f"{moto_endpoint}/{name}/")
    grants = admin.get_object_acl(Bucket=name, Key=link.removeprefix(f"{moto_endpoint}/{name}/"))["Grants"]
    assert any(g["Grantee"].get("URI", "").endswith("AllUsers") and g["Permission"] == "READ" for g in grants)

    monkeypatch.delenv("SDAPI_S3_ACL")
    assert "s3_acl" in post(client, "update_server").json()["settings_changed"]
    private = post(client, "text2img", **t2i()).json()["output"][0]
    grants = admin.get_object_acl(Bucket=name, Key=private.removeprefix(f"{moto_endpoint}/{name}/"))["Grants"]
    assert not any(g["Grantee"].get("URI", "").endswith("AllUsers") for g in grants)
