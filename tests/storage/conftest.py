"""Fixtures of the storage tests: one moto S3 server per session, and a ``storage``
fixture parametrized over every backend so that one contract suite checks them all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ckptd.daemon.storage import LocalStorage, Storage, open_storage
from s3server import TEST_BUCKET, MotoS3Server, use_dummy_aws_env


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        server.create_bucket(TEST_BUCKET)
        yield server


@pytest.fixture
def s3_url(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh prefix in the test bucket, with dummy credentials in the environment."""
    use_dummy_aws_env(monkeypatch)
    return s3_server.url(TEST_BUCKET)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        opened: Storage = LocalStorage(tmp_path / "store")
    else:
        opened = open_storage(request.getfixturevalue("s3_url"))
    with opened:
        yield opened
