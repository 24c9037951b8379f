"""The codec's serialized form: one self-describing, versioned, checksummed blob per tensor.

A blob is ``header || payload``; every integer is little-endian.

Header (``44 + 8 * ndim`` bytes)::

    offset size  field
    0      4     magic b"CKPD"
    4      1     format version (1..4, see below)
    5      1     kind: 1 = delta (lossy, needs the reference), 2 = exact (lossless)
    6      1     dtype code (table ``DTYPES`` below; same numbers as the wire ``DType``)
    7      1     ndim (0..64)
    8      1     bits b (delta: 1..8; exact: 0)
    9      1     coder: 1 = zstd, 2 = huffman, 3 = raw (exact blobs, version 3 only)
    10     1     representative: 0 = none (exact), 1 = mean, 2 = midrange
    11     1     flags: bit 0 = byte planes (exact blobs of multi-byte floats);
                 bit 1 = log domain (delta blobs, version >= 2: ``domains``);
                 bit 2 = scaled reference (delta blobs, version >= 4: ``scaled``)
    12     4     chunk_elems: elements per chunk (the last chunk may be shorter)
    16     8     count: number of elements (= product of shape)
    24     8     payload length in bytes
    32     8     xxh3_64 of the payload
    40     8*nd  shape, one u64 per dimension
    40+8nd 4     zlib.crc32 of all header bytes before it

Versions: version 2 added the log domain (flag bit 1). A blob is written with the lowest
version that can hold it: version 1 unless it is a log-domain delta. So every blob a
version-1 reader could read is still written byte for byte as before, and a version-1 reader
refuses a log-domain blob (which it would misread as a linear delta) by its version.
Version 3 added raw exact blobs (coder 3): a base written uncompressed when storage is faster
than the coder (``--base-compression``); older readers refuse them by their version.
Version 4 added the scaled-reference domain (flag bit 2, never with bit 1): a delta against
``alpha * reference``, ``alpha`` a float32 at the start of the payload. This build reads all
four, and writes each blob with the lowest of them that holds it.

The two checksums together cover every byte: a flipped bit anywhere, a truncation or trailing
garbage is reported as ``CodecError`` before any decoding starts.

Delta payload (kind 1)::

    f32                    alpha (scaled-reference blobs only, flag bit 2)
    (2^b - 1) x f32        representatives of symbols 1..2^b-1 (symbol 0 adds -0.0)
    u32 n + n bytes        coder parameters (zstd: 1 byte, the layout: 0 packed, 1 split,
                           2 adaptive; huffman: code lengths + block size)
    u64 m, u64 z + z bytes exceptions: m elements stored verbatim, zstd of
                           (m x u64 flat indices || m raw values in the tensor's dtype)
    nchunks x u32          byte length of each chunk body, nchunks = ceil(count / chunk_elems)
    chunk bodies           the entropy-coded symbols of each chunk, in order: for zstd the
                           layout's streams of packed symbols (``layouts``, ``packing``;
                           adaptive: a mode byte per chunk, then packed or split), for
                           huffman block lengths + bit stream (layout in ``huffman``)

Decoding: element i = reference[i] + representative[symbol[i]] (symbol 0 adds -0.0), computed
as ``kernels`` says for the dtype (log domain: added to the reference's bit pattern, as
``domains`` says; scaled domain: to ``alpha * reference`` as ``scaled`` computes it), then the
exceptions overwrite their elements.

Exact payload (kind 2)::

    nchunks x u32          byte length of each chunk body
    chunk bodies           zstd frames of the chunk's raw bytes (split into byte planes
                           when flag bit 0 is set: all first bytes, then all second bytes, ...)

Raw exact payload (kind 2, coder 3): the tensor's little-endian bytes, nothing else
(``chunk_elems`` = ``count``, or 1 when empty; no chunk table, no flags).

Chunks exist so that encode and decode bound their temporaries and run on several cores;
chunk bodies are independent of each other.

Tensor data is little-endian in blobs (big-endian input is converted); the codec's bit tricks
view little-endian buffers as native words, so it runs on little-endian hosts only (x86-64,
AArch64), which ``ckptd.daemon.codec`` checks at import.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import xxhash

MAGIC = b"CKPD"
VERSION = 4  # the newest this build reads and writes
VERSION_OF_LOG_DOMAIN = 2
VERSION_OF_RAW = 3
VERSION_OF_SCALED = 4
KIND_DELTA = 1
KIND_EXACT = 2
KIND_NAMES = {KIND_DELTA: "delta", KIND_EXACT: "exact"}

FLAG_BYTE_PLANES = 1
FLAG_LOG_DOMAIN = 2
FLAG_SCALED = 4
_DELTA_FLAGS = FLAG_LOG_DOMAIN | FLAG_SCALED
_KNOWN_FLAGS = {  # by version
    1: FLAG_BYTE_PLANES,
    2: FLAG_BYTE_PLANES | FLAG_LOG_DOMAIN,
    3: FLAG_BYTE_PLANES | FLAG_LOG_DOMAIN,
    4: FLAG_BYTE_PLANES | FLAG_LOG_DOMAIN | FLAG_SCALED,
}
# Domain code (``domains``) <-> header flag; linear (0) has none.
_DOMAIN_FLAGS = {0: 0, 1: FLAG_LOG_DOMAIN, 2: FLAG_SCALED}
MAX_NDIM = 64

CODERS = {1: "zstd", 2: "huffman", 3: "raw"}
CODER_IDS = {name: code for code, name in CODERS.items()}
CODER_RAW = CODER_IDS["raw"]
REPRESENTATIVES = {0: "none", 1: "mean", 2: "midrange"}
REPRESENTATIVE_IDS = {name: code for code, name in REPRESENTATIVES.items()}


class CodecError(ValueError):
    """Raised when a blob is truncated, corrupt, of an unknown version, or the input is unusable."""


@dataclass(frozen=True)
class DType:
    """One row of the codec's dtype table: stable code, stable name, numpy holder dtype."""

    code: int
    name: str
    holder: np.dtype

    @property
    def is_float(self) -> bool:
        """Whether the lossy delta path accepts this dtype."""
        return self.name in ("float32", "float16", "bfloat16", "float64")


# Explicit on purpose (never ``str(dtype)``): these codes are written into every blob.
# The numbers match ``ckptd.protos.dtypes`` wire values, which the codec must not import.
DTYPES = (
    DType(1, "float32", np.dtype("<f4")),
    DType(2, "float16", np.dtype("<f2")),
    DType(3, "bfloat16", np.dtype("<u2")),
    DType(4, "float64", np.dtype("<f8")),
    DType(5, "int8", np.dtype("i1")),
    DType(6, "int16", np.dtype("<i2")),
    DType(7, "int32", np.dtype("<i4")),
    DType(8, "int64", np.dtype("<i8")),
    DType(9, "uint8", np.dtype("u1")),
    DType(10, "bool", np.dtype("?")),
    DType(11, "uint16", np.dtype("<u2")),
    DType(12, "uint32", np.dtype("<u4")),
    DType(13, "uint64", np.dtype("<u8")),
)
DTYPE_BY_CODE = {row.code: row for row in DTYPES}
_BY_HOLDER = {row.holder: row for row in DTYPES if row.name != "bfloat16"}
BFLOAT16 = DTYPE_BY_CODE[3]


def dtype_of(array: np.ndarray, *, bfloat16: bool) -> DType:
    """Maps an array's numpy dtype (plus the bfloat16 flag) to its table row.

    Raises:
        CodecError: the dtype is not in the table, or ``bfloat16`` is set on a non-uint16 array.
    """
    holder = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if bfloat16:
        if holder != np.dtype("<u2"):
            raise CodecError(
                f"bfloat16=True expects the raw bfloat16 words as uint16, got dtype {array.dtype}"
            )
        return BFLOAT16
    row = _BY_HOLDER.get(holder)
    if row is None:
        known = ", ".join(r.name for r in DTYPES)
        raise CodecError(f"unsupported dtype {array.dtype}; supported: {known}")
    return row


_FIXED = struct.Struct("<4sBBBBBBBBIQQQ")
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class Header:
    """The decoded fixed header of a blob (see the module docstring for the layout)."""

    kind: int
    dtype: DType
    shape: tuple[int, ...]
    bits: int
    coder: int
    representative: int
    flags: int
    chunk_elems: int
    count: int
    payload_len: int = 0  # filled in by ``build_blob``
    payload_hash: int = 0

    @property
    def size(self) -> int:
        """Length of the serialized header in bytes."""
        return _FIXED.size + 8 * len(self.shape) + _CRC.size

    @property
    def domain(self) -> int:
        """Domain code of a delta (``domains.LINEAR``, ``LOG`` or ``SCALED``)."""
        if self.flags & FLAG_SCALED:
            return 2
        return 1 if self.flags & FLAG_LOG_DOMAIN else 0

    @property
    def version(self) -> int:
        """The lowest format version that holds this blob (see the module docstring)."""
        if self.flags & FLAG_SCALED:
            return VERSION_OF_SCALED
        if self.coder == CODER_RAW:
            return VERSION_OF_RAW
        return VERSION_OF_LOG_DOMAIN if self.flags & FLAG_LOG_DOMAIN else 1

    @property
    def nchunks(self) -> int:
        """Number of chunk bodies in the payload."""
        return -(-self.count // self.chunk_elems)


def domain_flags(domain: int) -> int:
    """Header flags recording a delta's domain code."""
    return _DOMAIN_FLAGS[domain]


def payload_hash(payload: bytes | bytearray | memoryview) -> int:
    """The payload checksum recorded in the header (xxh3_64: ~25 GB/s, so free next to zstd)."""
    return xxhash.xxh3_64_intdigest(payload)


def build_blob(header: Header, parts: Sequence[bytes | memoryview]) -> bytes:
    """``header || parts``, with the header's payload length and checksum filled in.

    Joins once: a base's payload is as large as the tensor, so no intermediate copy.
    """
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    sealed = replace(header, payload_len=sum(len(p) for p in parts),
                     payload_hash=digest.intdigest())
    return b"".join([pack_header(sealed), *parts])


def pack_header(header: Header) -> bytes:
    """Serializes ``header``; the trailing CRC32 covers every header byte before it."""
    fixed = _FIXED.pack(
        MAGIC, header.version, header.kind, header.dtype.code, len(header.shape), header.bits,
        header.coder, header.representative, header.flags, header.chunk_elems, header.count,
        header.payload_len, header.payload_hash,
    )
    body = fixed + struct.pack(f"<{len(header.shape)}Q", *header.shape)
    return body + _CRC.pack(zlib.crc32(body))


def unpack_header(blob: memoryview) -> Header:
    """Parses and validates the header of a complete blob.

    Checks magic, version, header CRC, the field values and that the blob is exactly header
    plus payload long. The payload checksum is checked by ``verify_payload``.

    Raises:
        CodecError: naming what is wrong (truncated, not a ckptd blob, unknown version, ...).
    """
    if len(blob) < _FIXED.size + _CRC.size:
        raise CodecError(f"blob truncated: {len(blob)} bytes, a header needs at least "
                         f"{_FIXED.size + _CRC.size}")
    (magic, version, kind, dtype_code, ndim, bits, coder, rep, flags, chunk_elems, count,
     payload_len, p_hash) = _FIXED.unpack_from(blob)
    if magic != MAGIC:
        raise CodecError(f"not a ckptd codec blob: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if not 1 <= version <= VERSION:
        raise CodecError(f"unsupported codec format version {version}; this build reads "
                         f"versions 1..{VERSION} (a newer ckptd wrote this blob?)")
    end = _FIXED.size + 8 * ndim
    if ndim > MAX_NDIM or len(blob) < end + _CRC.size:
        raise CodecError(f"blob truncated or corrupt: ndim {ndim}, {len(blob)} bytes")
    (crc,) = _CRC.unpack_from(blob, end)
    if crc != zlib.crc32(blob[:end]):
        raise CodecError("blob header checksum mismatch: the blob is corrupt")
    shape = struct.unpack_from(f"<{ndim}Q", blob, _FIXED.size)
    header = Header(kind, _lookup(DTYPE_BY_CODE, dtype_code, "dtype"), tuple(shape), bits,
                    coder, rep, flags, chunk_elems, count, payload_len, p_hash)
    _check_fields(header)
    domain_flags_set = header.flags & _DELTA_FLAGS
    if header.flags & ~_KNOWN_FLAGS[version] or (domain_flags_set and (
            header.kind != KIND_DELTA or domain_flags_set == _DELTA_FLAGS)):
        raise CodecError(f"corrupt blob: flags {header.flags:#04x} in a version {version} "
                         f"{KIND_NAMES[header.kind]} blob")
    if header.coder == CODER_RAW and version < VERSION_OF_RAW:
        raise CodecError(f"corrupt blob: raw coder in a version {version} blob")
    if len(blob) != header.size + payload_len:
        raise CodecError(f"blob length {len(blob)} does not match its header "
                         f"({header.size} header + {payload_len} payload bytes): truncated?")
    return header


def _lookup(table: dict, code: int, what: str):  # type: ignore[no-untyped-def]
    try:
        return table[code]
    except KeyError:
        raise CodecError(f"corrupt blob: unknown {what} code {code}") from None


def _check_fields(h: Header) -> None:
    _lookup(KIND_NAMES, h.kind, "kind")
    _lookup(CODERS, h.coder, "coder")
    _lookup(REPRESENTATIVES, h.representative, "representative")
    if math.prod(h.shape) != h.count:
        raise CodecError(f"corrupt blob: shape {h.shape} does not hold {h.count} elements")
    if h.chunk_elems < 1:
        raise CodecError(f"corrupt blob: chunk_elems {h.chunk_elems}")
    if h.coder == CODER_RAW and (h.kind != KIND_EXACT or h.flags):
        raise CodecError(f"corrupt blob: the raw coder needs an exact blob without flags, "
                         f"got a {KIND_NAMES[h.kind]} blob with flags {h.flags:#04x}")
    if h.kind == KIND_DELTA and not (1 <= h.bits <= 8 and h.dtype.is_float
                                     and h.representative != 0):
        raise CodecError(f"corrupt blob: delta of {h.dtype.name} with bits {h.bits}")


def verify_payload(blob: memoryview, header: Header) -> memoryview:
    """Returns the payload after checking it against the header's checksum."""
    payload = blob[header.size:]
    if payload_hash(payload) != header.payload_hash:
        raise CodecError("blob payload checksum mismatch: the blob is corrupt")
    return payload


class Reader:
    """A bounds-checked cursor over a payload: reading past the end raises ``CodecError``."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes; ``what`` names them in the error message."""
        if n < 0 or self.pos + n > len(self._data):
            raise CodecError(f"corrupt blob: {what} needs {n} bytes at offset {self.pos}, "
                             f"payload has {len(self._data)}")
        view = self._data[self.pos:self.pos + n]
        self.pos += n
        return view

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little")

    def array(self, dtype: np.dtype, n: int, what: str) -> np.ndarray:
        """``n`` elements of ``dtype`` (a read-only view, no copy)."""
        return np.frombuffer(self.take(n * dtype.itemsize, what), dtype=dtype)

    def at_end(self) -> None:
        """Raises unless the whole payload was consumed (trailing bytes mean corruption)."""
        if self.pos != len(self._data):
            raise CodecError(f"corrupt blob: {len(self._data) - self.pos} unexpected trailing "
                             f"payload bytes")


def read_chunks(reader: Reader, nchunks: int) -> list[memoryview]:
    """Reads a chunk table and the chunk bodies it describes."""
    lengths = reader.array(np.dtype("<u4"), nchunks, "chunk table")
    return [reader.take(int(n), f"chunk {i}") for i, n in enumerate(lengths)]


def write_chunks(bodies: list[bytes]) -> list[bytes]:
    """The chunk table followed by the bodies, ready to join into a payload."""
    lengths = np.array([len(b) for b in bodies], dtype="<u4")
    return [lengths.tobytes(), *bodies]
