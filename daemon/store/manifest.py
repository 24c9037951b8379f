"""The storage layout of a chain and the versioned manifest that commits each step.

Layout (keys relative to the storage root; ``run`` is validated to ``[A-Za-z0-9._-]``)::

    runs/{run}/{rank}/{step:020d}/{i:05d}.blob         tensor i of the table (encoded blob)
    runs/{run}/{rank}/{step:020d}/{i:05d}.{tag}.blob   same, rewritten when a step is rebased
    runs/{run}/{rank}/{step:020d}/manifest.json        written last: the commit point
    runs/{run}/{rank}/{step:020d}/pending              empty; a save or delete is under way
    runs/{run}/{rank}/{step:020d}/hidden               empty; retention dropped the step, a
                                                       kept step still restores through it

The zero-padded step keeps ``list()`` in step order. A step exists exactly when its
manifest exists. The ``pending`` marker is put before a save's first blob and removed
after its manifest, and put again before a deletion removes the manifest: a directory
without a manifest is provably uncommitted only while its marker is there. Start-up
(``ckptd.daemon.store.index.scan``) removes the keys a readable manifest does not name
(a rebase's old blobs, the marker) and every key of a marked directory without a
manifest; a directory whose manifest is missing (and no marker) or unreadable may have
held a committed step and is quarantined, never deleted (``ckptd.daemon.store.quarantine``).
The ``hidden`` marker beside a manifest takes the step out of every listing and restore
(``ckptd.daemon.store.retention``) while its blobs stay for the kept steps restored through
it; it is put once, atomically, and never removed while the manifest stays (a deletion
removes it with the blobs, before ``pending``), so a crash never shows a hidden step again
nor leaves an unmarked directory without a manifest. A ckptd older than the marker deletes
it at start as an unnamed key: the step is listed again until the next retention pass.

Manifest: a UTF-8 JSON object with sorted keys, stored as one zstd frame (``zstdcat``
shows it). Compression matters for small models: the per-tensor entries and the client's
structure metadata repeat in every step, and as plain JSON they were a fifth of a small
CNN's delta (bench/RESULTS.md); zstd takes them to about a sixth of that. Earlier ckptd
versions stored the JSON uncompressed; ``Manifest.from_bytes`` reads both. The file keeps
its name on purpose: an earlier daemon started on a newer store then finds a manifest it
cannot parse and leaves that step alone, where a step with no manifest it knows would be
deleted as an uncommitted leftover. ::

    format            "ckptd.manifest"
    version           1 (another value: ``CorruptCheckpointError``, never a guess)
    run, rank, step   where the step belongs (must match its key)
    kind              "base" (every tensor exact) | "delta" (against parent_step)
    parent_step       the step this delta is encoded against; null for a base
    base_step         the base this step's chain starts at
    chain_depth       deltas applied after that base to restore this step (0 for a base)
    created_unix_s    wall-clock time of the commit (seconds, float)
    metadata          the save's string → string metadata
    metrics           the save's metric name → float (``val_loss``); absent when none, and
                      read as empty from manifests written before it existed
    tensors           [{name, dtype, shape, policy, bits, encoding, blob_key, blob_bytes,
                        blob_xxh3_64, raw_bytes}] in the save's table order; policy/bits are
                       what the save asked for, encoding ("exact"|"delta") what was done
    raw_bytes         sum of the tensors' raw bytes
    stored_bytes      sum of blob_bytes (the manifest's own size is not included)
    checksum          ``tensors_checksum`` of the reconstructed tensors (xxh3_128, hex)
    checksum_algorithm "xxh3_128"
    lease_generation  the chain's writer-lease generation the step was committed under
                      (``ckptd.daemon.store.lease``: a manifest a later generation fenced
                      off is void); absent (read as 0) before leases existed

A save creates its manifest with ``Storage.put_if_absent``: a step's manifest never
overwrites another's, so two writers of one step cannot both commit it. The one rewrite
is a rebase (a deletion or retention making a delta into a base, or renumbering the deltas
after it): the chain's lease holder replaces the manifest with one of the same step and
checksum (``Repository.rewrite``), whose blobs have fresh names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash
import zstandard
from ckptd.daemon.domain import Policy, StepKey, TensorSpec
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.protos import checksum

FORMAT_NAME = "ckptd.manifest"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_128"
MANIFEST_NAME = "manifest.json"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Manifests hold at most max_tensors (100k) entries of a few hundred bytes plus 16 MiB of
# metadata; a frame claiming far more is corrupt, and must not make the reader allocate it.
_MAX_MANIFEST_JSON_BYTES = 256 << 20
_ZSTD_LEVEL = 3
PENDING_NAME = "pending"
HIDDEN_NAME = "hidden"
RUNS_PREFIX = "runs/"
BASE = "base"
DELTA = "delta"
EXACT = "exact"

_KEY_RE = re.compile(
    r"runs/(?P<run>[A-Za-z0-9._-]+)/(?P<rank>[0-9]+)/(?P<step>[0-9]{20})/(?P<name>[^/]+)"
)


def step_prefix(key: StepKey) -> str:
    return f"{RUNS_PREFIX}{key.run}/{key.rank}/{key.step:020d}/"


def manifest_key(key: StepKey) -> str:
    return step_prefix(key) + MANIFEST_NAME


def pending_key(key: StepKey) -> str:
    """Key of the step's ``pending`` marker: while it exists and the manifest does not, the
    step directory holds nothing committed (a save before its commit, or a deletion)."""
    return step_prefix(key) + PENDING_NAME


def hidden_key(key: StepKey) -> str:
    """Key of the step's ``hidden`` marker: retention dropped the step, which stays in
    storage only as a dependency of a kept step (``ckptd.daemon.store.retention``)."""
    return step_prefix(key) + HIDDEN_NAME


def blob_key(key: StepKey, index: int, tag: str = "") -> str:
    """Key of tensor ``index``'s blob; a rebase passes a fresh ``tag`` so that the new blobs
    never overwrite the ones the still-committed old manifest names."""
    suffix = f".{tag}.blob" if tag else ".blob"
    return f"{step_prefix(key)}{index:05d}{suffix}"


def parse_key(key: str) -> tuple[StepKey, str] | None:
    """Splits a layout key into (step, file name); None for a key outside the layout."""
    match = _KEY_RE.fullmatch(key)
    if match is None:
        return None
    step = StepKey(match["run"], int(match["rank"]), int(match["step"]))
    return step, match["name"]


def is_newer_format(data: bytes) -> bool:
    """Whether an unreadable manifest is a readable one of a newer manifest version (left
    alone for the newer ckptd that wrote it) rather than a damaged one."""
    try:
        if data.startswith(_ZSTD_MAGIC):
            data = zstandard.ZstdDecompressor().decompress(
                data, max_output_size=_MAX_MANIFEST_JSON_BYTES)
        obj = json.loads(data)
    except (ValueError, zstandard.ZstdError):
        return False
    if not isinstance(obj, dict):
        return False
    version = obj.get("version")
    return (obj.get("format") == FORMAT_NAME and isinstance(version, int)
            and not isinstance(version, bool) and version > FORMAT_VERSION)


def tensors_checksum(specs: Sequence[TensorSpec], arrays: Sequence[np.ndarray]) -> str:
    """The step checksum (``ckptd.protos.checksum``) of ``arrays`` under the table ``specs``:
    written into the manifest by the pipeline, verified by restore."""
    pairs = zip(specs, arrays, strict=True)
    return checksum.tensors_checksum((s.name, s.dtype, s.shape, a) for s, a in pairs)


def blob_checksum(blob: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(blob)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a manifest: its spec and where and how its blob is stored."""

    spec: TensorSpec
    encoding: str  # "exact" | "delta"
    blob_key: str
    blob_bytes: int
    blob_xxh3_64: str


@dataclass(frozen=True)
class Manifest:
    """A committed step, as stored in its step's ``manifest.json``."""

    key: StepKey
    kind: str
    parent_step: int | None
    base_step: int
    chain_depth: int
    created_unix_s: float
    metadata: Mapping[str, str]
    tensors: tuple[TensorEntry, ...]
    checksum: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    lease_generation: int = 0
    world_size: int = 0  # ranks of the run's world when saved; 0: no world

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return tuple(entry.spec for entry in self.tensors)

    @property
    def raw_bytes(self) -> int:
        return sum(entry.spec.nbytes for entry in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(entry.blob_bytes for entry in self.tensors)

    def to_json(self) -> bytes:
        return json.dumps(_manifest_obj(self), sort_keys=True, separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        """What storage holds: the JSON as one zstd frame with its content size and checksum."""
        compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
        return compressor.compress(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parses a stored manifest, compressed or (from earlier ckptd versions) plain JSON;
        ``where`` is named in every error."""
        if not data.startswith(_ZSTD_MAGIC):
            return cls.from_json(data, where)
        try:
            size = zstandard.frame_content_size(data)
            if not 0 <= size <= _MAX_MANIFEST_JSON_BYTES:
                raise zstandard.ZstdError(f"frame content size {size} is not in "
                                          f"0..{_MAX_MANIFEST_JSON_BYTES}")
            text = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CorruptCheckpointError(
                f"manifest {where} is not a valid zstd frame ({len(data)} bytes): {exc}"
            ) from exc
        return cls.from_json(text, where)

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parses and checks a manifest; ``where`` (its key) is named in every error."""
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise TypeError(f"top level is {type(obj).__name__}, not an object")
        except (ValueError, TypeError) as exc:
            raise CorruptCheckpointError(f"manifest {where} is not valid JSON: {exc}") from exc
        if obj.get("format") != FORMAT_NAME or obj.get("version") != FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"manifest {where} has format {obj.get('format')!r} version "
                f"{obj.get('version')!r}; this daemon reads {FORMAT_NAME!r} version "
                f"{FORMAT_VERSION} (upgrade ckptd to read newer checkpoints)"
            )
        try:
            manifest = _manifest_from_obj(obj)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"manifest {where} is malformed: {exc!r}") from exc
        _check_totals(manifest, obj, where)
        return manifest


def _manifest_obj(m: Manifest) -> dict[str, Any]:
    # An optional key, so that manifests without metrics keep their exact bytes and an
    # earlier daemon (which ignores unknown keys) still reads those with them.
    optional: dict[str, Any] = {"metrics": dict(m.metrics)} if m.metrics else {}
    if m.lease_generation:
        optional["lease_generation"] = m.lease_generation
    if m.world_size:
        optional["world_size"] = m.world_size
    return {
        **optional,
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "run": m.key.run,
        "rank": m.key.rank,
        "step": m.key.step,
        "kind": m.kind,
        "parent_step": m.parent_step,
        "base_step": m.base_step,
        "chain_depth": m.chain_depth,
        "created_unix_s": m.created_unix_s,
        "metadata": dict(m.metadata),
        "tensors": [_entry_obj(entry) for entry in m.tensors],
        "raw_bytes": m.raw_bytes,
        "stored_bytes": m.stored_bytes,
        "checksum": m.checksum,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
    }


def _entry_obj(entry: TensorEntry) -> dict[str, Any]:
    spec = entry.spec
    return {
        "name": spec.name,
        "dtype": spec.dtype,
        "shape": list(spec.shape),
        "policy": spec.policy.value,
        "bits": spec.bits,
        "encoding": entry.encoding,
        "blob_key": entry.blob_key,
        "blob_bytes": entry.blob_bytes,
        "blob_xxh3_64": entry.blob_xxh3_64,
        "raw_bytes": spec.nbytes,
    }


def _manifest_from_obj(obj: dict[str, Any]) -> Manifest:
    kind = _one_of(obj["kind"], (BASE, DELTA), "kind")
    parent = obj["parent_step"]
    if (kind == BASE) != (parent is None):
        raise ValueError(f"kind {kind!r} with parent_step {parent!r}")
    if obj["checksum_algorithm"] != CHECKSUM_ALGORITHM:
        raise ValueError(f"checksum_algorithm {obj['checksum_algorithm']!r}")
    metadata = obj["metadata"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map strings to strings")
    metrics = obj.get("metrics", {})
    if not all(isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
               for k, v in metrics.items()):
        raise TypeError("metrics must map strings to numbers")
    return Manifest(
        key=StepKey(_text(obj["run"]), _count(obj["rank"]), _count(obj["step"])),
        kind=kind,
        parent_step=None if parent is None else _count(parent),
        base_step=_count(obj["base_step"]),
        chain_depth=_count(obj["chain_depth"]),
        created_unix_s=float(obj["created_unix_s"]),
        metadata=dict(metadata),
        tensors=tuple(_entry_from_obj(item) for item in obj["tensors"]),
        checksum=_text(obj["checksum"]),
        metrics={k: float(v) for k, v in metrics.items()},
        lease_generation=_count(obj.get("lease_generation", 0)),
        world_size=_count(obj.get("world_size", 0)),
    )


def _entry_from_obj(item: dict[str, Any]) -> TensorEntry:
    spec = TensorSpec(
        name=_text(item["name"]),
        dtype=_text(item["dtype"]),
        shape=tuple(_count(dim) for dim in item["shape"]),
        policy=Policy(item["policy"]),
        bits=_count(item["bits"]),
    )
    spec.dtype_info  # noqa: B018 - raises ValueError for a dtype outside the table
    if _count(item["raw_bytes"]) != spec.nbytes:
        raise ValueError(f"tensor {spec.name!r} raw_bytes {item['raw_bytes']} != {spec.nbytes}")
    return TensorEntry(
        spec=spec,
        encoding=_one_of(item["encoding"], (EXACT, DELTA), "encoding"),
        blob_key=_text(item["blob_key"]),
        blob_bytes=_count(item["blob_bytes"]),
        blob_xxh3_64=_text(item["blob_xxh3_64"]),
    )


def _check_totals(m: Manifest, obj: dict[str, Any], where: str) -> None:
    if obj.get("raw_bytes") != m.raw_bytes or obj.get("stored_bytes") != m.stored_bytes:
        raise CorruptCheckpointError(
            f"manifest {where} totals (raw {obj.get('raw_bytes')}, stored "
            f"{obj.get('stored_bytes')}) disagree with its tensor table "
            f"(raw {m.raw_bytes}, stored {m.stored_bytes})"
        )
    if m.kind == BASE and any(entry.encoding != EXACT for entry in m.tensors):
        raise CorruptCheckpointError(f"manifest {where} is a base with a delta-encoded tensor")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value


def _one_of(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {allowed}")
    return str(value)
