"""``open_storage``: backends chosen by URL scheme, lazy optional imports, extension."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import ckptd.daemon.storage as storage_pkg
import pytest
from ckptd.daemon.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    known_schemes,
    open_storage,
    register_backend,
)


def test_plain_path_and_pathlike_open_local_storage(tmp_path: Path) -> None:
    for url in (str(tmp_path / "a" / "b"), tmp_path / "c"):
        with open_storage(url) as storage:
            assert isinstance(storage, LocalStorage)
            assert Path(storage.url.removeprefix("file://")).is_dir()


@pytest.mark.parametrize("spelling", ["file://{path}", "FILE://{path}", "file://localhost{path}"])
def test_file_url_opens_local_storage(tmp_path: Path, spelling: str) -> None:
    with open_storage(spelling.format(path=tmp_path / "store")) as storage:
        assert isinstance(storage, LocalStorage)
        assert storage.url == f"file://{tmp_path / 'store'}"
        storage.put("k", b"v")
    assert (tmp_path / "store" / "k").read_bytes() == b"v"


def test_s3_url_opens_s3_storage(s3_url: str) -> None:
    with open_storage(s3_url) as storage:
        assert isinstance(storage, S3Storage)
        assert storage.url == s3_url


@pytest.mark.parametrize("url", ["gs://bucket/prefix", "hdfs://namenode/x"])
def test_unknown_scheme_names_it_and_the_known_ones(url: str) -> None:
    scheme = url.split(":", maxsplit=1)[0]
    with pytest.raises(ValueError, match=rf"unknown storage scheme '{scheme}'.*file, s3"):
        open_storage(url)


def test_empty_url_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        open_storage("")


def test_local_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="colour"):
        open_storage(tmp_path, colour="blue")


def test_register_backend_adds_a_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_pkg, "_BACKENDS", dict(storage_pkg._BACKENDS))
    calls: list[tuple[str, dict[str, Any]]] = []

    def factory(url: str, **options: Any) -> Storage:
        calls.append((url, options))
        return LocalStorage(tmp_path / "mem")

    register_backend("Mem", factory)
    assert known_schemes() == ["file", "mem", "s3"]
    storage = open_storage("mem://anything", depth=3)
    assert isinstance(storage, LocalStorage)
    assert calls == [("mem://anything", {"depth": 3})]
    with pytest.raises(ValueError, match="'mem' is already registered"):
        register_backend("mem", factory)
    register_backend("mem", factory, replace=True)
    with pytest.raises(ValueError, match="invalid URL scheme"):
        register_backend("no spaces", factory)


def test_missing_boto3_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ckptd.daemon.storage.s3", raising=False)
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes "import boto3" fail
    with pytest.raises(ImportError, match=r"pip install 'ckptd\[s3\]'"):
        open_storage("s3://bucket/prefix")


def test_local_storage_does_not_import_boto3(tmp_path: Path) -> None:
    # A fresh interpreter: this one imported boto3 long ago for the S3 tests.
    code = (
        "import sys, ckptd.daemon.storage as s; "
        "s.open_storage(sys.argv[1]).put('k', b'v'); "
        "sys.exit(3 if 'boto3' in sys.modules else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k").read_bytes() == b"v"
