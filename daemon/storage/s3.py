"""S3-compatible object-store backend (AWS S3, MinIO, Ceph RGW, ...), on boto3.

Keys live under ``s3://bucket/prefix/``. Atomicity is the store's: a ``PutObject`` or a
completed multipart upload becomes visible whole or not at all, and is durable when the
call returns, so ``put`` needs no temporary name. ``put_if_absent`` is S3's conditional
write (``If-None-Match: *``, AWS S3 since 2024, MinIO, moto), decided by the store.
A crash in the middle of a multipart upload leaves invisible parts that cost storage until
``cleanup_temporaries`` aborts them.

Credentials and the endpoint follow boto3's usual chain (environment, config files,
instance roles; ``AWS_ENDPOINT_URL``), unless the URL or the options name an endpoint.
One boto3 client is shared by all threads: clients are thread-safe, sessions are not, so
the session is used only here, in the constructor.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from ckptd.daemon.storage.base import (
    KeyNotFoundError,
    Storage,
    StorageError,
    check_range,
    is_valid_key,
    validate_key,
    validate_prefix,
)

MiB = 1 << 20
# S3 caps DeleteObjects at this many keys per request.
_DELETE_BATCH = 1000
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# What a conditional write that lost answers: the key exists, or a concurrent one is racing.
_CONDITION_FAILED_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
# Query parameters an s3:// URL may carry, mapped to constructor options.
_QUERY_OPTIONS = {"endpoint_url": "endpoint_url", "region": "region_name"}
_BOTO_ERRORS = (botocore.exceptions.BotoCoreError, boto3.exceptions.Boto3Error)


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``; ``put`` is a single PutObject below
    ``multipart_threshold_bytes`` and a multipart upload above it."""

    shared = True  # every host's daemon may write the same bucket and prefix

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        multipart_threshold_bytes: int = 8 * MiB,
        multipart_chunk_bytes: int = 8 * MiB,
        upload_concurrency: int = 4,
        max_pool_connections: int = 32,
        max_attempts: int = 5,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        check_bucket: bool = True,
    ) -> None:
        """Creates the client and, if ``check_bucket``, fails fast when the bucket is unreachable.

        Args:
            bucket: Bucket name; it must exist.
            prefix: Key prefix without slashes at either end (``""``: the bucket's root).
            endpoint_url: S3-compatible endpoint; None lets boto3 choose (``AWS_ENDPOINT_URL``
                or AWS itself).
            region_name: Region; None lets boto3 choose.
            multipart_threshold_bytes: Puts of at least this size use a multipart upload.
            multipart_chunk_bytes: Part size of multipart uploads (S3 minimum: 5 MiB).
            upload_concurrency: Parts of one multipart upload sent in parallel.
            max_pool_connections: HTTP connections shared by all threads.
            max_attempts: Attempts per request, retries of throttling and 5xx included.
            connect_timeout_s: Timeout of a TCP connect.
            read_timeout_s: Timeout of a socket read.
            check_bucket: Issue a HeadBucket now, so a wrong URL fails at start.

        Raises:
            ValueError: the bucket name or prefix is malformed, or a size is not positive.
            StorageError: ``check_bucket`` and the bucket is missing, forbidden or unreachable.
        """
        if not bucket or any(c in bucket for c in "/@:?#"):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if prefix:
            validate_key(prefix)
        if multipart_chunk_bytes < 5 * MiB or multipart_threshold_bytes < 1:
            raise ValueError(
                f"multipart_chunk_bytes must be >= {5 * MiB} (S3's minimum part size) and "
                f"multipart_threshold_bytes >= 1, got {multipart_chunk_bytes}, "
                f"{multipart_threshold_bytes}"
            )
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self._base = f"{prefix}/" if prefix else ""
        self.url = _format_url(bucket, prefix, endpoint_url=endpoint_url, region=region_name)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold_bytes,
            multipart_chunksize=multipart_chunk_bytes,
            max_concurrency=upload_concurrency,
            preferred_transfer_client="classic",
        )
        config = botocore.config.Config(
            max_pool_connections=max_pool_connections,
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
        )
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region_name, config=config
        )
        if check_bucket:
            self._check_bucket()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Storage:
        """Opens ``s3://bucket[/prefix][?endpoint_url=...&region=...]``; ``options`` are
        the constructor's keyword arguments and may not repeat a query parameter."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
        for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if name not in _QUERY_OPTIONS:
                raise ValueError(
                    f"unknown query parameter {name!r} in {url!r}; known: {sorted(_QUERY_OPTIONS)}"
                )
            option = _QUERY_OPTIONS[name]
            if option in options:
                raise ValueError(f"{option!r} is given both in {url!r} and as an option")
            options[option] = value
        return cls(parts.netloc, parts.path.strip("/"), **options)

    def put(self, key: str, data: bytes | memoryview) -> None:
        obj = self._object_key(key)
        view = memoryview(data).cast("B")
        try:
            if len(view) < self._transfer.multipart_threshold:
                body = data if isinstance(data, bytes) else _ViewReader(view)
                self._client.put_object(Bucket=self.bucket, Key=obj, Body=body)
            else:
                self._client.upload_fileobj(
                    _ViewReader(view), self.bucket, obj, Config=self._transfer
                )
        except (botocore.exceptions.ClientError, *_BOTO_ERRORS) as exc:
            raise self._error(f"put ({len(view)} bytes)", obj, exc) from exc

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """One PutObject with ``If-None-Match: *`` (whatever the size: the objects it is for
        are small, and one request is one decision). S3 answers 412 PreconditionFailed when
        the key exists and 409 ConditionalRequestConflict when another conditional write of
        it is in flight: both mean this call did not create it.

        A request retried by botocore after a lost response may find its own first attempt
        and report False; callers write content that names them, so they can tell."""
        obj = self._object_key(key)
        view = memoryview(data).cast("B")
        body = data if isinstance(data, bytes) else _ViewReader(view)
        try:
            self._client.put_object(Bucket=self.bucket, Key=obj, Body=body, IfNoneMatch="*")
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _CONDITION_FAILED_CODES:
                return False
            raise self._error(f"put_if_absent ({len(view)} bytes)", obj, exc) from exc
        except _BOTO_ERRORS as exc:
            raise self._error(f"put_if_absent ({len(view)} bytes)", obj, exc) from exc
        return True

    def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        obj = self._object_key(key)
        check_range(start, end)
        if end == start:
            self.size(key)  # an empty range cannot be requested, but absence must still raise
            return b""
        extra = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=obj, **extra)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "InvalidRange":
                return b""  # the range starts at or after the end: clipped like a slice
            raise self._error("get", obj, exc) from exc
        except _BOTO_ERRORS as exc:
            raise self._error("get", obj, exc) from exc

    def size(self, key: str) -> int:
        obj = self._object_key(key)
        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=obj)["ContentLength"])
        except (botocore.exceptions.ClientError, *_BOTO_ERRORS) as exc:
            raise self._error("size", obj, exc) from exc

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        keys: list[str] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._base + prefix):
                keys.extend(item["Key"][len(self._base) :] for item in page.get("Contents", ()))
        except (botocore.exceptions.ClientError, *_BOTO_ERRORS) as exc:
            raise self._error("list", self._base + prefix, exc) from exc
        # Objects written by other tools may not be valid keys (e.g. "dir/" markers).
        return sorted(key for key in keys if is_valid_key(key))

    def delete(self, keys: Iterable[str]) -> None:
        objs = [self._object_key(key) for key in keys]
        for i in range(0, len(objs), _DELETE_BATCH):
            batch = objs[i : i + _DELETE_BATCH]
            request = {"Objects": [{"Key": obj} for obj in batch], "Quiet": True}
            try:
                response = self._client.delete_objects(Bucket=self.bucket, Delete=request)
            except (botocore.exceptions.ClientError, *_BOTO_ERRORS) as exc:
                raise self._error(f"delete ({len(batch)} keys)", batch[0], exc) from exc
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"s3 delete of s3://{self.bucket}/{first.get('Key')} failed: "
                    f"{first.get('Code')}: {first.get('Message')} ({len(errors)} keys failed)"
                )

    def move(self, key: str, new_key: str) -> None:
        """A server-side copy (multipart above the transfer threshold), then a delete: S3
        has no rename, but the copy is atomic like a put, so a crash in between leaves the
        object under both keys."""
        obj, new_obj = self._object_key(key), self._object_key(new_key)
        try:
            self._client.copy({"Bucket": self.bucket, "Key": obj}, self.bucket, new_obj,
                              Config=self._transfer)
        except (botocore.exceptions.ClientError, *_BOTO_ERRORS) as exc:
            raise self._error(f"copy to {new_obj}", obj, exc) from exc
        self.delete([key])

    def cleanup_temporaries(self, *, min_age_s: float = 0.0) -> int:
        """Aborts multipart uploads under the prefix started more than ``min_age_s`` ago."""
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=min_age_s)
        aborted = 0
        try:
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._base):
                for upload in page.get("Uploads", ()):
                    if upload["Initiated"] <= cutoff:
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        except (botocore.exceptions.ClientError, *_BOTO_ERRORS) as exc:
            raise self._error("cleanup of multipart uploads", self._base, exc) from exc
        return aborted

    def close(self) -> None:
        self._client.close()

    def _object_key(self, key: str) -> str:
        return self._base + validate_key(key)

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            where = f"at {self.endpoint_url}" if self.endpoint_url else "(default endpoint)"
            if _code(exc) in _NOT_FOUND_CODES:
                raise StorageError(f"S3 bucket {self.bucket!r} does not exist {where}") from exc
            raise self._error("open", "", exc) from exc
        except _BOTO_ERRORS as exc:
            raise self._error("open", "", exc) from exc

    def _error(self, operation: str, obj: str, exc: Exception) -> StorageError:
        """The one place botocore errors become ckptd errors (``KeyNotFoundError`` for 404)."""
        where = f"s3://{self.bucket}/{obj}"
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _code(exc)
            if code in _NOT_FOUND_CODES:
                return KeyNotFoundError(f"key {obj[len(self._base):]!r} not found in {self.url}")
            message = exc.response.get("Error", {}).get("Message", "")
            return StorageError(f"s3 {operation} of {where} failed: {code}: {message}")
        return StorageError(f"s3 {operation} of {where} failed: {type(exc).__name__}: {exc}")


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _format_url(bucket: str, prefix: str, *, endpoint_url: str | None, region: str | None) -> str:
    """The normalized URL; it keeps an explicit endpoint so that it reopens the same store."""
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    query = {name: value for name, value in (("endpoint_url", endpoint_url), ("region", region))
             if value}
    return f"{url}?{urlencode(query, safe=':/')}" if query else url


class _ViewReader(io.RawIOBase):
    """A seekable read-only file over a memoryview, so boto3 can stream (and rewind, on a
    retry) a large blob without a whole copy; botocore refuses a bare memoryview."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        stop = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = bytes(self._view[self._pos : stop])
        self._pos += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)
