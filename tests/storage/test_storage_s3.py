"""What only the S3 backend promises: multipart, URL handling, error mapping, leftovers."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from ckptd.daemon.storage import KeyNotFoundError, S3Storage, StorageError, open_storage
from s3server import TEST_BUCKET as BUCKET
from s3server import MotoS3Server, use_dummy_aws_env

MiB = 1 << 20


def _open(url: str, **options: Any) -> S3Storage:
    storage = open_storage(url, **options)
    assert isinstance(storage, S3Storage)
    return storage


def test_large_put_is_a_multipart_upload(s3_server: MotoS3Server, s3_url: str) -> None:
    with _open(s3_url) as storage:
        storage.put("big", memoryview(bytes(12 * MiB)))
        storage.put("small", b"x" * 1000)
        client = s3_server.client()
        head_big = client.head_object(Bucket=BUCKET, Key=f"{storage.prefix}/big")
        head_small = client.head_object(Bucket=BUCKET, Key=f"{storage.prefix}/small")
        client.close()
    # A multipart object's ETag is "<md5 of part md5s>-<number of parts>".
    assert head_big["ETag"].strip('"').endswith("-2")
    assert "-" not in head_small["ETag"]


def test_keys_live_under_the_prefix(s3_server: MotoS3Server, s3_url: str) -> None:
    with _open(s3_url) as storage, _open(s3_url.replace("/t-", "/other-t-")) as neighbour:
        storage.put("runs/a", b"1")
        neighbour.put("runs/b", b"2")
        assert storage.list() == ["runs/a"]
        assert neighbour.list() == ["runs/b"]
        client = s3_server.client()
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{storage.prefix}/")
        client.close()
    assert [item["Key"] for item in listed["Contents"]] == [f"{storage.prefix}/runs/a"]


def test_list_skips_foreign_objects_that_are_not_keys(s3_server: MotoS3Server, s3_url: str) -> None:
    with _open(s3_url) as storage:
        storage.put("runs/a", b"1")
        client = s3_server.client()
        for foreign in ("runs/", "runs//double", "runs/.tmp-x"):
            client.put_object(Bucket=BUCKET, Key=f"{storage.prefix}/{foreign}", Body=b"")
        client.close()
        assert storage.list() == ["runs/a"]


def test_cleanup_aborts_multipart_uploads_under_the_prefix_only(
    s3_server: MotoS3Server, s3_url: str
) -> None:
    client = s3_server.client()
    with _open(s3_url) as storage:
        mine = client.create_multipart_upload(Bucket=BUCKET, Key=f"{storage.prefix}/crashed")
        theirs = client.create_multipart_upload(Bucket=BUCKET, Key=f"x{storage.prefix}/crashed")
        assert storage.cleanup_temporaries() == 1
        assert storage.cleanup_temporaries() == 0
    remaining = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    ids = {upload["UploadId"] for upload in remaining}
    assert theirs["UploadId"] in ids
    assert mine["UploadId"] not in ids
    client.abort_multipart_upload(
        Bucket=BUCKET, Key=f"x{storage.prefix}/crashed", UploadId=theirs["UploadId"]
    )
    client.close()


def test_delete_sends_batches_of_at_most_1000(s3_url: str) -> None:
    with _open(s3_url) as storage:
        kept_and_deleted = ["k/0000", "k/1000", "k/2400"]
        for key in [*kept_and_deleted, "survivor"]:
            storage.put(key, b"x")
        batch_sizes: list[int] = []

        def record(params: dict[str, Any], **_: Any) -> None:
            batch_sizes.append(len(params["Delete"]["Objects"]))

        # The only way to observe the requests themselves (moto accepts any batch size).
        storage._client.meta.events.register("provide-client-params.s3.DeleteObjects", record)
        storage.delete(f"k/{i:04d}" for i in range(2500))
        assert batch_sizes == [1000, 1000, 500]
        assert storage.list() == ["survivor"]


def test_url_is_normalized_and_keeps_the_endpoint(s3_server: MotoS3Server, s3_url: str) -> None:
    endpoint = s3_server.endpoint_url
    with _open(f"s3://{BUCKET}/a/b/?endpoint_url={endpoint}") as storage:
        assert storage.url == f"s3://{BUCKET}/a/b?endpoint_url={endpoint}"
        assert storage.prefix == "a/b"
    with _open(f"s3://{BUCKET}", endpoint_url=endpoint) as storage:
        assert storage.url == f"s3://{BUCKET}?endpoint_url={endpoint}"
        assert storage.prefix == ""


def test_endpoint_from_standard_environment(
    s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_dummy_aws_env(monkeypatch, endpoint_url=s3_server.endpoint_url)
    with _open(f"s3://{BUCKET}/from-env") as storage:
        assert storage.url == f"s3://{BUCKET}/from-env"
        storage.put("k", b"v")
        assert storage.get("k") == b"v"
        storage.delete(["k"])


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3:///prefix", "expected s3://bucket"),
        ("s3://bucket/a//b", "invalid storage key 'a//b'"),
        ("s3://bucket/p?color=red", "unknown query parameter 'color'.*endpoint_url"),
        ("s3://user@bucket/p", "invalid S3 bucket name"),
    ],
)
def test_malformed_urls_are_refused(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        open_storage(url)


def test_option_repeating_a_query_parameter_is_refused(s3_server: MotoS3Server) -> None:
    url = f"s3://{BUCKET}/p?endpoint_url={s3_server.endpoint_url}"
    with pytest.raises(ValueError, match="'endpoint_url' is given both"):
        open_storage(url, endpoint_url=s3_server.endpoint_url)


def test_missing_bucket_fails_at_open(s3_server: MotoS3Server, s3_url: str) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as info:
        open_storage(f"s3://no-such-bucket/p?endpoint_url={s3_server.endpoint_url}")
    assert not isinstance(info.value, KeyNotFoundError)


def test_missing_bucket_is_a_storage_error_not_a_missing_key(
    s3_server: MotoS3Server, s3_url: str
) -> None:
    url = f"s3://no-such-bucket/p?endpoint_url={s3_server.endpoint_url}"
    with _open(url, check_bucket=False) as storage:
        with pytest.raises(StorageError, match="NoSuchBucket") as info:
            storage.get("k")
        assert not isinstance(info.value, KeyNotFoundError)
        with pytest.raises(StorageError, match=r"s3 put \(1 bytes\) of s3://no-such-bucket/p/k"):
            storage.put("k", b"x")


def test_unreachable_endpoint_is_a_storage_error(s3_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now: the connect is refused at once.
    with pytest.raises(StorageError, match=rf"127\.0\.0\.1:{port}"):
        open_storage(f"s3://{BUCKET}/p?endpoint_url=http://127.0.0.1:{port}", max_attempts=1)


def test_too_small_multipart_chunk_is_refused(s3_url: str) -> None:
    with pytest.raises(ValueError, match="multipart_chunk_bytes must be >= 5242880"):
        open_storage(s3_url, multipart_chunk_bytes=MiB)
