"""The serialized contract of the store: manifest, key layout, checksum, restore plans."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import zstandard
from ckptd.daemon.domain import Policy, StepKey, TensorSpec
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.daemon.store.index import IndexEntry, StepIndex
from ckptd.daemon.store.manifest import (
    Manifest,
    TensorEntry,
    blob_key,
    manifest_key,
    parse_key,
    tensors_checksum,
)

KEY = StepKey("run-a", 2, 7)
SPECS = (
    TensorSpec("w", "float32", (2, 2), Policy.LOSSY, 4),
    TensorSpec("n", "int64", ()),
)
ARRAYS = (np.array([[1.0, -2.0], [0.5, 0.0]], np.float32), np.array(42, np.int64))

# Pinned: changing how the checksum is computed breaks every stored checkpoint.
GOLDEN_CHECKSUM = "38fb7f6d2e3a2da3c018a19ab0981abd"


def _manifest(kind: str = "delta", parent: int | None = 6) -> Manifest:
    entries = tuple(
        TensorEntry(spec, "delta" if kind == "delta" and i == 0 else "exact",
                    blob_key(KEY, i), 10 + i, f"{i:016x}")
        for i, spec in enumerate(SPECS)
    )
    return Manifest(KEY, kind, parent, 3, 4, 1700000000.5, {"epoch": "3"}, entries,
                    tensors_checksum(SPECS, ARRAYS))


GOLDEN_MANIFEST = (
    '{"base_step":3,"chain_depth":4,"checksum":"' + GOLDEN_CHECKSUM + '",'
    '"checksum_algorithm":"xxh3_128","created_unix_s":1700000000.5,"format":"ckptd.manifest",'
    '"kind":"delta","metadata":{"epoch":"3"},"parent_step":6,"rank":2,"raw_bytes":24,'
    '"run":"run-a","step":7,"stored_bytes":21,"tensors":['
    '{"bits":4,"blob_bytes":10,"blob_key":"runs/run-a/2/00000000000000000007/00000.blob",'
    '"blob_xxh3_64":"0000000000000000","dtype":"float32","encoding":"delta","name":"w",'
    '"policy":"lossy","raw_bytes":16,"shape":[2,2]},'
    '{"bits":0,"blob_bytes":11,"blob_key":"runs/run-a/2/00000000000000000007/00001.blob",'
    '"blob_xxh3_64":"0000000000000001","dtype":"int64","encoding":"exact","name":"n",'
    '"policy":"auto","raw_bytes":8,"shape":[]}],"version":1}'
)


def test_manifest_golden_bytes_and_round_trip() -> None:
    manifest = _manifest()
    assert manifest.to_json().decode() == GOLDEN_MANIFEST
    assert Manifest.from_json(GOLDEN_MANIFEST.encode(), "golden") == manifest


def test_checksum_covers_names_dtypes_shapes_and_bytes() -> None:
    assert tensors_checksum(SPECS, ARRAYS) == GOLDEN_CHECKSUM
    renamed = (dataclasses.replace(SPECS[0], name="v"), SPECS[1])
    reshaped = (dataclasses.replace(SPECS[0], shape=(4,)), SPECS[1])
    changed = (ARRAYS[0] + np.float32(1e-7), ARRAYS[1])
    others = {tensors_checksum(renamed, ARRAYS), tensors_checksum(reshaped, ARRAYS),
              tensors_checksum(SPECS, changed)}
    assert GOLDEN_CHECKSUM not in others and len(others) == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, r"version 2; this daemon reads 'ckptd.manifest' version 1"),
        ({"format": "other"}, "has format 'other'"),
        ({"kind": "base"}, "kind 'base' with parent_step 6"),
        ({"stored_bytes": 5}, "totals .* disagree"),
        ({"rank": -1}, "malformed"),
    ],
)
def test_manifest_rejects_unknown_or_inconsistent_content(
    change: dict[str, object], message: str
) -> None:
    obj = json.loads(GOLDEN_MANIFEST)
    obj.update(change)
    with pytest.raises(CorruptCheckpointError, match=message):
        Manifest.from_json(json.dumps(obj).encode(), "runs/x/manifest.json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        Manifest.from_json(b"{", "m")


def test_stored_manifest_is_a_checked_zstd_frame_of_the_json() -> None:
    manifest = Manifest.from_json(GOLDEN_MANIFEST.encode(), "golden")
    stored = manifest.to_bytes()
    assert zstandard.ZstdDecompressor().decompress(stored) == GOLDEN_MANIFEST.encode()
    assert Manifest.from_bytes(stored, "m") == manifest
    # Earlier versions stored the JSON as it is: still read.
    assert Manifest.from_bytes(GOLDEN_MANIFEST.encode(), "m") == manifest
    flipped = bytearray(stored)
    flipped[len(stored) // 2] ^= 0x40
    for data in (stored[:-5], bytes(flipped), stored[:4]):
        with pytest.raises(CorruptCheckpointError, match="manifest runs/x is not a valid zstd"):
            Manifest.from_bytes(data, "runs/x")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        Manifest.from_bytes(b"", "runs/x")
    # A frame that claims a huge content size is refused before anything is allocated.
    huge = zstandard.ZstdCompressor(level=1).compress(b" " * (300 << 20))
    with pytest.raises(CorruptCheckpointError, match="content size"):
        Manifest.from_bytes(huge, "runs/x")


def test_layout_keys_parse_back() -> None:
    assert manifest_key(KEY) == "runs/run-a/2/00000000000000000007/manifest.json"
    assert parse_key(blob_key(KEY, 3, "r1f")) == (KEY, "00003.r1f.blob")
    assert parse_key("runs/run-a/2/7/manifest.json") is None
    assert parse_key("elsewhere/file") is None


def test_plan_follows_parent_pointers_to_the_nearest_base() -> None:
    index = StepIndex()
    for step, parent in ((1, None), (2, 1), (4, 2), (5, None), (6, 5)):
        key = StepKey("r", 0, step)
        kind = "base" if parent is None else "delta"
        manifest = dataclasses.replace(_manifest(kind, parent), key=key)
        index.add(IndexEntry(manifest, 100))
    assert [m.key.step for m in index.plan(StepKey("r", 0, 4))] == [1, 2, 4]
    assert [m.key.step for m in index.plan(StepKey("r", 0, 6))] == [5, 6]
    assert index.child(StepKey("r", 0, 2)) is index.get(StepKey("r", 0, 4))
    assert index.child(StepKey("r", 0, 4)) is None  # 5 is a base
    index.remove(StepKey("r", 0, 2))
    with pytest.raises(CorruptCheckpointError, match="needs step 2 of its chain"):
        index.plan(StepKey("r", 0, 4))
