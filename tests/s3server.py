"""A real S3-compatible server for tests: moto's HTTP server on 127.0.0.1, port 0.

Plain module (no fixtures), importable from any test directory because the root conftest
puts ``tests/`` on ``sys.path``; ``tests/storage/conftest.py`` wraps it in fixtures::

    from s3server import MotoS3Server, use_dummy_aws_env

    with MotoS3Server() as server:
        server.create_bucket("ckptd-test")
        ...  # in a test: use_dummy_aws_env(monkeypatch); open_storage(server.url("ckptd-test"))

The server keeps its state in moto's in-process backend, so one server per session is
enough; give each test its own bucket or prefix.
"""

from __future__ import annotations

import logging
import uuid
from types import TracebackType
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
# The bucket the storage fixtures create once per session.
TEST_BUCKET = "ckptd-test"
DUMMY_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class MotoS3Server:
    """Starts moto's threaded server on a free loopback port; ``stop`` joins its thread."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""
        self._werkzeug_level = logging.NOTSET

    def start(self) -> MotoS3Server:
        # One INFO line per request would bury test output; restored on stop.
        werkzeug = logging.getLogger("werkzeug")
        self._werkzeug_level = werkzeug.level
        werkzeug.setLevel(logging.WARNING)
        self._server.start()  # returns once the socket is bound and listening
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()
        logging.getLogger("werkzeug").setLevel(self._werkzeug_level)

    def client(self) -> Any:
        """A boto3 client with explicit dummy credentials (independent of the environment)."""
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION, **DUMMY_CREDENTIALS
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def url(self, bucket: str, prefix: str | None = None) -> str:
        """``s3://bucket/<prefix>?endpoint_url=...``; a fresh unique prefix by default."""
        prefix = f"t-{uuid.uuid4().hex[:12]}" if prefix is None else prefix
        return f"s3://{bucket}/{prefix}?endpoint_url={self.endpoint_url}"

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def use_dummy_aws_env(monkeypatch: pytest.MonkeyPatch, endpoint_url: str | None = None) -> None:
    """Points boto3's default chain at dummy credentials for one test, hiding the host's
    AWS configuration (profiles, config files, instance metadata, endpoint overrides)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/ckptd-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/ckptd-test-aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    if endpoint_url is not None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint_url)
