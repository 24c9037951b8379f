"""The storage contract, run against every backend (``storage`` is parametrized in conftest)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ckptd.daemon.storage import KeyNotFoundError, Storage, StorageError, open_storage

MiB = 1 << 20


def test_put_get_round_trip(storage: Storage) -> None:
    objects = {
        "top.bin": b"\x00\x01\xff" * 100,
        "runs/r1/rank0/00000001.manifest": b'{"step": 1}',
        "runs/r1/rank0/blobs/a.bin": bytes(range(256)),
        "empty": b"",
        "unicode/\u00fc/\u03b2.bin": "\u00e9t\u00e9".encode(),
    }
    for key, data in objects.items():
        storage.put(key, data)
    for key, data in objects.items():
        assert storage.get(key) == data
        assert storage.size(key) == len(data)


def test_batched_puts_read_back_and_list_like_puts_once_synced(storage: Storage) -> None:
    objects = {f"runs/r/0/step/{i:05d}.blob": bytes([i]) * (i * 1000) for i in range(4)}
    objects["runs/r/0/other/a.blob"] = b"elsewhere"
    for key, data in objects.items():
        storage.put_batched(key, memoryview(data))
    storage.sync(list(objects))
    storage.put_batched("runs/r/0/step/00000000.blob", b"replaced")  # overwrites, like put
    storage.sync(["runs/r/0/step/00000000.blob"])
    objects["runs/r/0/step/00000000.blob"] = b"replaced"
    assert storage.list("runs/") == sorted(objects)
    for key, data in objects.items():
        assert storage.get(key) == data


# Each test loops over its cases: opening an S3 client costs far more than the checks.
RANGES = [(0, None), (10, 20), (0, 1), (1023, None), (1023, 1024), (0, 1024), (0, 5000),
          (1020, 1030), (1024, None), (2000, None), (2000, 3000), (7, 7), (1024, 1024)]


def test_get_byte_range_is_clipped_like_a_slice(storage: Storage) -> None:
    data = bytes(range(256)) * 4
    storage.put("blob", data)
    for start, end in RANGES:
        assert storage.get("blob", start=start, end=end) == data[start:end], (start, end)


def test_get_range_of_empty_object(storage: Storage) -> None:
    storage.put("empty", b"")
    for start, end in [(0, None), (0, 0), (0, 10), (3, None)]:
        assert storage.get("empty", start=start, end=end) == b"", (start, end)


def test_invalid_range_raises_value_error(storage: Storage) -> None:
    storage.put("blob", b"0123456789")
    for start, end in [(-1, None), (5, 4), (-3, -1)]:
        with pytest.raises(ValueError, match=rf"\[{start}, {end}\)"):
            storage.get("blob", start=start, end=end)


def test_read_into_fills_a_buffer_and_counts_the_bytes(storage: Storage) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: a local read returns it in several pieces
    storage.put("blob", data)
    storage.put("empty", b"")
    buffer = bytearray(b"\xee" * (len(data) + 10))
    # One byte more than expected tells a longer object apart; the rest stays untouched.
    assert storage.read_into("blob", memoryview(buffer)[: len(data) + 1]) == len(data)
    assert buffer[: len(data)] == data and buffer[len(data) :] == b"\xee" * 10
    assert storage.read_into("blob", memoryview(buffer)[:100]) == 100
    assert storage.read_into("empty", memoryview(buffer)) == 0
    with pytest.raises(KeyNotFoundError, match="absent"):
        storage.read_into("absent", memoryview(buffer))


def test_overwrite_replaces_whole_object(storage: Storage) -> None:
    storage.put("k", b"a much longer first version")
    storage.put("k", b"short")
    assert storage.get("k") == b"short"
    assert storage.size("k") == 5
    assert storage.list() == ["k"]


def test_missing_key_raises_key_not_found(storage: Storage) -> None:
    storage.put("dir/present", b"x")
    for key in ("absent", "dir/absent", "dir", "dir/present/below"):
        with pytest.raises(KeyNotFoundError, match=repr(key)) as info:
            storage.get(key)
        assert isinstance(info.value, FileNotFoundError)
        assert isinstance(info.value, StorageError)
        with pytest.raises(KeyNotFoundError):
            storage.get(key, start=1, end=2)
        with pytest.raises(KeyNotFoundError):
            storage.get(key, start=0, end=0)
        with pytest.raises(KeyNotFoundError):
            storage.size(key)


def test_list_is_sorted_and_scoped_to_directory_prefix(storage: Storage) -> None:
    keys = [
        "runs/r1/rank0/00000002.manifest",
        "runs/r1/rank0/00000001.manifest",
        "runs/r1/rank1/00000001.manifest",
        "runs/r10/rank0/00000001.manifest",
        "runs/r1.txt",
        "other/x",
        "z",
    ]
    for key in random.Random(0).sample(keys, len(keys)):
        storage.put(key, key.encode())
    assert storage.list() == sorted(keys)
    assert storage.list("runs/r1/") == sorted(k for k in keys if k.startswith("runs/r1/"))
    assert storage.list("runs/r1/rank0/") == [
        "runs/r1/rank0/00000001.manifest",
        "runs/r1/rank0/00000002.manifest",
    ]
    assert storage.list("missing/") == []
    assert storage.list("z/") == []


def test_list_rejects_malformed_prefix(storage: Storage) -> None:
    for prefix in ["runs", "/runs/", "runs//", "../", "a\\b/", ".tmp-x/"]:
        with pytest.raises(ValueError, match="invalid storage prefix") as info:
            storage.list(prefix)
        assert repr(prefix) in str(info.value)


def test_delete_is_idempotent(storage: Storage) -> None:
    for key in ("a/1", "a/2", "b/1"):
        storage.put(key, b"x")
    storage.delete(["a/1", "never/existed", "a/1"])
    assert storage.list() == ["a/2", "b/1"]
    storage.delete(["a/1"])
    storage.delete([])
    storage.delete(iter(["a/2", "b/1"]))
    assert storage.list() == []
    with pytest.raises(KeyNotFoundError):
        storage.get("a/2")


def test_memoryview_input_of_any_format(storage: Storage) -> None:
    array = np.arange(1000, dtype=np.float32)
    buffer = bytearray(b"0123456789" * 10)
    storage.put("floats", array.data)
    storage.put("sliced", memoryview(buffer)[10:-10])
    storage.put("matrix", np.ones((3, 4), dtype=np.int64).data)
    assert storage.get("floats") == array.tobytes()
    assert storage.get("sliced") == bytes(buffer[10:-10])
    assert storage.size("matrix") == 3 * 4 * 8


def test_large_object_round_trip(storage: Storage) -> None:
    # 12 MiB: above the S3 backend's 8 MiB multipart threshold, so it takes that path.
    data = np.random.default_rng(0).bytes(12 * MiB)
    storage.put("large/blob", memoryview(data))
    assert storage.size("large/blob") == len(data)
    assert storage.get("large/blob") == data
    boundary = 8 * MiB
    assert storage.get("large/blob", start=boundary - 5, end=boundary + 5) == data[
        boundary - 5 : boundary + 5
    ]


BAD_KEYS = [
    "", "/abs", "a/../b", "..", ".", "./a", "a//b", "a/", "a\\b", "a\x00b",
    ".tmp-1234-x", "d/.tmp-abc-manifest", "x" * 256, "\udcff",
]


def test_invalid_keys_raise_value_error_naming_the_key(storage: Storage) -> None:
    storage.put("fine", b"kept")
    for key in BAD_KEYS:
        calls = [
            lambda key=key: storage.put(key, b"x"),
            lambda key=key: storage.get(key),
            lambda key=key: storage.size(key),
            lambda key=key: storage.delete(["fine", key]),
        ]
        for call in calls:
            with pytest.raises(ValueError, match="invalid storage key") as info:
                call()
            assert repr(key) in str(info.value)
    assert storage.list() == ["fine"]  # a delete with one bad key deletes nothing


def test_key_length_limit(storage: Storage) -> None:
    ok = "/".join(["s" * 200] * 5)  # 1004 bytes
    storage.put(ok, b"x")
    assert storage.list() == [ok]
    with pytest.raises(ValueError, match="limit is 1024"):
        storage.put(ok + "/" + "t" * 30, b"x")


def test_concurrent_puts_from_threads(storage: Storage) -> None:
    keys = [f"runs/r{i % 3}/rank{i % 2}/blob-{i:03d}" for i in range(48)]

    def put(key: str) -> None:
        storage.put(key, key.encode() * 100)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, keys))
    assert storage.list() == sorted(keys)
    for key in keys:
        assert storage.get(key) == key.encode() * 100


def test_url_reopens_the_same_storage(storage: Storage) -> None:
    storage.put("runs/r1/m", b"committed")
    with open_storage(storage.url) as again:
        assert again.url == storage.url
        assert again.list() == ["runs/r1/m"]
        assert again.get("runs/r1/m") == b"committed"


def test_cleanup_temporaries_leaves_committed_objects(storage: Storage) -> None:
    storage.put("a/b", b"x")
    assert storage.cleanup_temporaries() == 0
    assert storage.list() == ["a/b"]


def test_move_renames_an_object_and_replaces_the_target(storage: Storage) -> None:
    storage.put("runs/a/1/blob", b"payload")
    storage.put("quarantine/a/1/blob", b"older")
    storage.move("runs/a/1/blob", "quarantine/a/1/blob")
    assert storage.get("quarantine/a/1/blob") == b"payload"
    assert storage.list() == ["quarantine/a/1/blob"]
    with pytest.raises(KeyNotFoundError, match="runs/a/1/blob"):
        storage.move("runs/a/1/blob", "elsewhere")


def test_free_bytes_is_a_count_or_unknown(storage: Storage) -> None:
    free = storage.free_bytes()
    assert free is None or free > 0


def test_put_if_absent_creates_once_and_never_overwrites(storage: Storage) -> None:
    assert storage.put_if_absent("runs/r1/0/m.json", b"first") is True
    assert storage.put_if_absent("runs/r1/0/m.json", b"second, longer") is False
    assert storage.get("runs/r1/0/m.json") == b"first"
    assert storage.list() == ["runs/r1/0/m.json"]  # the loser leaves no temporary behind
    storage.delete(["runs/r1/0/m.json"])
    assert storage.put_if_absent("runs/r1/0/m.json", memoryview(b"again")) is True
    assert storage.get("runs/r1/0/m.json") == b"again"


def test_put_if_absent_refuses_a_key_made_by_put(storage: Storage) -> None:
    storage.put("leases/r1/0", b"held")
    assert storage.put_if_absent("leases/r1/0", b"mine") is False
    assert storage.get("leases/r1/0") == b"held"
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put_if_absent("a/../b", b"x")
