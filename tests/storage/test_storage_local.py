"""What only the local backend promises: temp-file commit protocol, crash leftovers, dirs."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ckptd.daemon.errors import StorageInUseError
from ckptd.daemon.storage import KeyNotFoundError, LocalStorage, StorageError, open_storage
from ckptd.daemon.storage import local as local_module


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_crash_leftover_is_hidden_and_cleaned_up(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("runs/r1/m", b"committed")
    leftover = tmp_path / "runs" / "r1" / ".tmp-0123abcd-m2"
    leftover.write_bytes(b"half a manifest")
    orphan_dir = tmp_path / "runs" / "r2"
    orphan_dir.mkdir()
    (orphan_dir / ".tmp-feed-blob").write_bytes(b"partial")

    assert storage.list() == ["runs/r1/m"]
    assert storage.list("runs/r1/") == ["runs/r1/m"]
    assert storage.cleanup_temporaries() == 2
    assert _all_files(tmp_path) == ["runs/r1/m"]
    assert not orphan_dir.exists()  # emptied by the cleanup, so pruned
    assert storage.get("runs/r1/m") == b"committed"


def test_cleanup_spares_young_temporaries(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    young = tmp_path / ".tmp-young-a"
    old = tmp_path / ".tmp-old-b"
    young.write_bytes(b"")
    old.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert storage.cleanup_temporaries(min_age_s=600) == 1
    assert young.exists()
    assert not old.exists()


@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_failed_put_keeps_old_content_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("d/manifest", b"old version")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_module.os, failing, fail)
    with pytest.raises(StorageError, match=r"put 'd/manifest' \(11 bytes\).*No space left"):
        storage.put("d/manifest", b"new version")
    monkeypatch.undo()
    assert storage.get("d/manifest") == b"old version"
    assert _all_files(tmp_path) == ["d/manifest"]


def test_put_replaces_file_by_rename(tmp_path: Path) -> None:
    # A reader holding the old file keeps reading the old bytes: the new version is a new
    # inode renamed over the name, never an in-place rewrite.
    storage = LocalStorage(tmp_path)
    storage.put("m", b"version 1")
    with open(tmp_path / "m", "rb") as reader:
        storage.put("m", b"version 2")
        assert reader.read() == b"version 1"
    assert storage.get("m") == b"version 2"


def test_delete_prunes_emptied_directories_but_not_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    storage = LocalStorage(root)
    storage.put("runs/r1/rank0/a", b"x")
    storage.put("runs/r1/rank0/b", b"x")
    storage.put("runs/r2/rank0/a", b"x")
    storage.delete(["runs/r1/rank0/a"])
    assert (root / "runs" / "r1" / "rank0").is_dir()
    storage.delete(["runs/r1/rank0/b"])
    assert not (root / "runs" / "r1").exists()
    assert (root / "runs" / "r2" / "rank0" / "a").is_file()
    storage.delete(["runs/r2/rank0/a"])
    assert root.is_dir()
    assert list(root.iterdir()) == []


def test_key_under_an_existing_object_fails_cleanly(tmp_path: Path) -> None:
    # On a file system "a" cannot be both a file and a directory (S3 allows it).
    storage = LocalStorage(tmp_path)
    storage.put("a", b"file")
    with pytest.raises(StorageError, match="'a/b'"):
        storage.put("a/b", b"x")
    assert storage.list() == ["a"]


def test_concurrent_put_and_delete_in_one_directory(tmp_path: Path) -> None:
    # Deletes prune the directory that puts are about to write into; every put must still
    # land, and nothing but committed keys may remain.
    storage = LocalStorage(tmp_path)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            storage.put("shared/churn", b"c")
            storage.delete(["shared/churn"])

    def put(i: int) -> None:
        storage.put(f"shared/k{i:03d}", b"v")
        storage.delete([f"shared/k{i:03d}"])
        storage.put(f"shared/k{i:03d}", b"final")

    with ThreadPoolExecutor(max_workers=4) as pool:
        churner = pool.submit(churn)
        try:
            list(pool.map(put, range(60)))
        finally:
            stop.set()
        churner.result()
    assert storage.list() == [f"shared/k{i:03d}" for i in range(60)]
    assert storage.get("shared/k059") == b"final"


def test_root_is_created_and_url_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage("nested/store")
    assert isinstance(storage, LocalStorage)
    assert storage.url == f"file://{tmp_path}/nested/store"
    assert (tmp_path / "nested" / "store").is_dir()


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="file"):
        LocalStorage(blocker)


def test_one_claim_at_a_time_released_on_close(tmp_path: Path) -> None:
    first = LocalStorage(tmp_path)
    first.claim("ckptd serve (pid 1 on a)")
    first.put("runs/k", b"v")
    second = LocalStorage(tmp_path)
    with pytest.raises(StorageInUseError, match=r"in use by ckptd serve \(pid 1 on a\)"):
        second.claim("ckptd rm (pid 2 on a)")
    assert second.list() == ["runs/k"]  # the lock file is not a key; reading needs no claim
    first.close()
    second.claim("ckptd rm (pid 2 on a)")
    with pytest.raises(StorageInUseError, match=r"ckptd rm \(pid 2 on a\)"):
        LocalStorage(tmp_path).claim("third")
    second.close()


def _modes(root: Path) -> tuple[set[int], set[int]]:
    """The permission bits of every file and every directory under ``root`` (root too)."""
    files, dirs = set(), {root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        (dirs if path.is_dir() else files).add(path.stat().st_mode & 0o777)
    return files, dirs


@pytest.mark.parametrize(("file_mode", "expected"), [
    (None, (0o600, 0o700)),  # the default: the daemon's user only
    (0o640, (0o640, 0o750)),  # widened for a group of readers
])
def test_files_and_directories_get_their_mode_whatever_the_umask(
    tmp_path: Path, file_mode: int | None, expected: tuple[int, int]
) -> None:
    old = os.umask(0)  # the widest umask: every mode below comes from the backend
    try:
        storage = open_storage(tmp_path / "store", file_mode=file_mode)
        storage.claim("test")
        storage.put("runs/a/0/00000000000000000001/00000.blob", b"x")
        storage.move("runs/a/0/00000000000000000001/00000.blob", "quarantine/a/00000.blob")
        storage.put("runs/a/0/00000000000000000002/manifest.json", b"{}")
        storage.close()
    finally:
        os.umask(old)
    assert _modes(tmp_path / "store") == ({expected[0]}, {expected[1]})


def test_storage_mode_setting_parses_presets_and_octal_modes() -> None:
    from ckptd.daemon.config import DaemonConfig, parse_storage_mode

    assert parse_storage_mode("private") == 0o600 and parse_storage_mode("group") == 0o640
    assert parse_storage_mode("0644") == 0o644
    for bad in ("0755", "0400", "abc", "7777"):
        with pytest.raises(ValueError, match="octal file mode"):
            parse_storage_mode(bad)
    config = DaemonConfig.from_settings({"storage": "/x", "storage_mode": "group"})
    assert config.storage_mode == 0o640
    with pytest.raises(ValueError, match="storage_mode"):
        DaemonConfig.from_settings({"storage": "/x", "storage_mode": "0777"})


def test_batched_puts_skip_fsync_until_one_sync_per_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    keys = ["s/1/a.blob", "s/1/b.blob", "s/2/c.blob"]
    storage.put("s/1/pending", b"")  # the directories exist, as the pending marker makes them
    storage.put("s/2/pending", b"")
    monkeypatch.setattr(local_module.os, "fsync", fsync)
    for key in keys:
        storage.put_batched(key, key.encode())
    assert synced == []  # nothing durable yet: the batch pays once, in sync
    storage.sync(keys)
    files, dirs = synced[:3], synced[3:]
    assert files == [str(tmp_path / key) for key in keys]
    assert dirs == [str(tmp_path / "s" / "1"), str(tmp_path / "s" / "2")]
    assert [storage.get(key) for key in keys] == [key.encode() for key in keys]


def test_sync_of_a_vanished_or_failing_key_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path)
    storage.put_batched("s/a.blob", b"x")
    storage.delete(["s/a.blob"])
    with pytest.raises(KeyNotFoundError, match=r"sync of 's/a.blob' in file://.*: it is gone "
                       r"\(deleted before it was durable\)"):
        storage.sync(["s/a.blob"])
    storage.put_batched("s/b.blob", b"y")

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(local_module.os, "fsync", fail)
    with pytest.raises(StorageError, match=r"sync of 1 keys in file://.*Input/output error"):
        storage.sync(["s/b.blob"])


def test_put_if_absent_race_has_exactly_one_winner(tmp_path: Path) -> None:
    # Local only: on S3 the atomicity of If-None-Match is the server's (AWS guarantees it),
    # and moto, the loopback stand-in, checks and writes without a lock, so a race there
    # would test moto. The contract suite checks the sequential semantics on every backend.
    storage = LocalStorage(tmp_path)
    # Each round, two threads race for a fresh key; every round has one winner, whose
    # bytes are the object's.
    rounds = 20
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i in range(rounds):
            key = f"leases/race/{i:03d}"
            results = list(pool.map(lambda who, key=key: storage.put_if_absent(
                key, f"writer-{who}".encode()), range(2)))
            assert sorted(results) == [False, True], (key, results)
            assert storage.get(key) == f"writer-{results.index(True)}".encode()
    assert len(storage.list("leases/race/")) == rounds
