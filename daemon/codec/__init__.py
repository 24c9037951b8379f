"""LC-Checkpoint compression of tensors: numpy in, bytes out (Chen et al., arXiv 2009.13003).

A pure library: no gRPC, no asyncio, no storage. The daemon's engine calls it; importing it
never imports the server.

* ``encode_delta(current, reference)`` quantizes ``current - reference`` by exponent bucket
  with priority promotion, entropy-codes the symbols and returns the blob together with the
  reconstruction. Chain deltas against the previous *reconstruction* (not the previous true
  value): the error then never accumulates along the chain.
  With ``domain="log"`` the delta is taken of the values' logarithm (their IEEE-754 bit
  patterns), for tensors that must stay non-negative: the error is relative and the
  reconstruction is never negative (``ckptd.daemon.codec.domains``). With
  ``domain="scaled"`` it is taken against a fitted multiple of the reference, for tensors
  that decay between saves (``ckptd.daemon.codec.scaled``).
* ``decode_delta(blob, reference)`` returns that reconstruction, bit for bit;
  ``apply_deltas(blobs, array)`` applies a chain of them in place, the same bits faster
  (``ckptd.daemon.codec.chain``).
* ``encode_exact`` / ``decode_exact``: lossless, for bases and non-float tensors.
* ``blob_info`` reads a blob's header.
* ``warm_up`` compiles the per-element kernels (``kernels``, numba) ahead of first use.

The serialized form is described in ``ckptd.daemon.codec.format``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import chain, delta, exact, finekeys, kernels
from .chain import ChainError
from .domains import DOMAINS
from .format import CODERS, KIND_NAMES, REPRESENTATIVES, CodecError, unpack_header
from .quantize import AUTO_MAX_ERROR

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("ckptd.daemon.codec supports little-endian hosts only")

__all__ = [
    "AUTO_MAX_ERROR",
    "DEFAULT_BITS",
    "DEFAULT_CODER",
    "DEFAULT_REPRESENTATIVE",
    "BlobInfo",
    "ChainError",
    "CodecError",
    "Coder",
    "Domain",
    "Representative",
    "apply_deltas",
    "blob_info",
    "decode_delta",
    "decode_exact",
    "encode_delta",
    "encode_exact",
    "raw_view",
    "warm_up",
]

Representative = Literal["mean", "midrange"]
# "zstd": symbols packed into bytes, then zstd level 1 (default: smaller and faster on real
# deltas); "huffman": the paper's canonical Huffman code.
Coder = Literal["zstd", "huffman"]
# "linear": the delta of the values; "log": of their logarithm (non-negative tensors);
# "scaled": of the values against a fitted multiple of the reference (decaying tensors).
Domain = Literal["linear", "log", "scaled"]
# What the error budget of bits="auto" is relative to (``encode_delta``).
AutoRelativeTo = Literal["delta", "state"]

DEFAULT_BITS = 3
DEFAULT_CODER: Coder = "zstd"
DEFAULT_REPRESENTATIVE: Representative = "mean"


def encode_delta(current: np.ndarray, reference: np.ndarray, *,
                 bits: int | Literal["auto"] = DEFAULT_BITS,
                 representative: Representative = DEFAULT_REPRESENTATIVE,
                 coder: Coder = DEFAULT_CODER, bfloat16: bool = False,
                 domain: Domain = "linear",
                 auto_max_error: float = AUTO_MAX_ERROR,
                 auto_relative_to: AutoRelativeTo = "delta",
                 buckets_per_octave: int = 1,
                 out: np.ndarray | None = None) -> tuple[bytes, np.ndarray]:
    """Lossy delta of a float tensor against the reconstruction it follows.

    Args:
        current: float32/float16/float64 array, or bfloat16 as raw uint16 words.
        reference: the previous reconstruction; same shape and dtype as ``current``.
        bits: symbol width b in 1..8; ``2^b - 1`` exponent buckets are kept. ``"auto"``:
            the smallest b whose dropped buckets hold at most ``auto_max_error`` of the
            delta's L2 norm, chosen per call from the bucket statistics (no second
            encode); the blob's header records the b chosen (``blob_info(blob).bits``).
        representative: value of a kept bucket: its mean (least squared error) or its
            midrange (the paper's figure).
        coder: entropy coder of the symbols.
        bfloat16: ``current``/``reference`` hold bfloat16 words in uint16 arrays.
        domain: ``"linear"`` quantizes ``current - reference`` (absolute error);
            ``"log"`` quantizes the step between their logarithms (relative error, a
            reconstruction never negative, exact zeros kept): for tensors that must stay
            non-negative, such as Adam's second moment. Its blobs are format version 2.
            ``"scaled"`` quantizes ``current - alpha * reference`` with one least-squares
            float32 ``alpha`` per call, stored in the blob: for tensors that decay between
            saves, such as Adam's first moment (``domains``). Its blobs are version 4.
        auto_max_error: the error budget of ``bits="auto"`` in [0, 1): the relative L2
            error the dropped buckets may add to the reconstructed change (a dropped
            element is restored as no change; the kept buckets' own error, ~20 % of the
            change, is the same at every b). Ignored for a fixed ``bits``.
        auto_relative_to: what that budget is relative to: ``"delta"`` (the change, as
            above) or ``"state"`` (the reference the change is added to: the dropped
            buckets' L2 norm at most ``auto_max_error`` of the reference's, so a small
            change between frequent saves gets fewer bits than a large one; in the log
            domain the dropped log-steps' RMS at most ``auto_max_error``: the same relative
            error of the state). Only the width chosen differs; the blob format is the same.
        buckets_per_octave: 1 (LC-Checkpoint's exponent buckets), 2 or 4: the buckets also
            split each octave by the delta's top 1 or 2 mantissa bits, so a kept element is
            restored within a half or a quarter octave of its change instead of a whole
            one, and the ``2^b - 1`` largest of these finer buckets are kept (fewer octaves
            at one width). Linear and scaled domains only. Encode-side only: the blob
            format, and so decode, is the same (``bench/README.md``, "Finer buckets for
            the weights").
        out: where the reconstruction is written (None: a new array): a writeable,
            C-contiguous array of ``current``'s holder dtype and element count, sharing no
            memory with ``current`` or ``reference``; its contents are ignored. The daemon
            passes a replaced chain head's memory, already mapped, instead of faulting in
            a fresh tensor-sized array. The blob is the same either way.

    Returns:
        ``(blob, reconstruction)``: the reconstruction has ``current``'s shape and dtype and is
        exactly what ``decode_delta(blob, reference)`` returns. Elements whose delta is
        dropped keep the reference value; NaN/Inf elements (and the rare reconstruction that
        would overflow; in the log domain also negative elements and ``-0.0``, of
        ``current`` or ``reference``) are stored verbatim.

    Raises:
        CodecError: unsupported dtype, mismatched reference, or an invalid option.
    """
    return delta.encode_delta(current, reference, bits=bits, representative=representative,
                              coder=coder, bfloat16=bfloat16, domain=domain,
                              auto_max_error=auto_max_error,
                              auto_relative_to=auto_relative_to,
                              buckets_per_octave=buckets_per_octave, out=out)


def decode_delta(blob: bytes | memoryview, reference: np.ndarray, *,
                 in_place: bool = False) -> np.ndarray:
    """Reconstruction from a delta blob and the reference it was encoded against.

    ``in_place=True`` writes the reconstruction over ``reference`` (which must then be a
    writeable, C-contiguous array of the blob's holder dtype) and returns it: a chain of
    deltas decodes into one buffer instead of faulting in a fresh tensor-sized one per
    delta. The values are the same either way. On error ``reference`` may be partly
    overwritten.

    Raises:
        CodecError: the blob is truncated, corrupt, of an unknown version, not a delta blob, or
            ``reference`` does not have the blob's shape and dtype (or, in place, is not a
            writeable C-contiguous array).
    """
    return delta.decode_delta(blob, reference, in_place=in_place)


def apply_deltas(blobs: Sequence[bytes | memoryview], reference: np.ndarray, *,
                 in_place: bool = False, verified: bool = False,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Reconstruction from a chain of delta blobs, applied in turn to ``reference``.

    The result is bit for bit ``decode_delta`` called for each blob in order, computed
    chunk by chunk across the whole chain (each chunk stays in the CPU's cache while every
    delta is applied to it, starting from a copy of the reference's chunk) on several
    threads.

    Args:
        blobs: delta blobs, the first encoded against ``reference``, each next one against
            the reconstruction of the one before.
        reference: the chain's start (a decoded base), of the blobs' holder dtype and shape;
            read-only unless ``in_place``.
        in_place: write the result over ``reference`` (then a writeable, C-contiguous
            array, partly overwritten on error) instead of into a new array.
        verified: the caller has already checked every byte of each blob (a restore
            compares each blob's xxh3_64 with its manifest): the payload checksums are
            then not computed again. The headers' checksums and the payloads' structure
            are checked either way.
        out: write the result into this array (writeable, C-contiguous, of the holder
            dtype and the reference's size, not overlapping it; a restore reuses one
            across tensors instead of faulting fresh pages in) instead of a new array;
            ignored with ``in_place``.

    Raises:
        ChainError: a ``CodecError`` naming the delta (its ``position`` in ``blobs``) that
            is truncated, corrupt, of an unknown version or not a delta, or that
            ``reference`` does not match.
    """
    return chain.apply_deltas(blobs, reference, in_place=in_place, verified=verified, out=out)


def warm_up() -> None:
    """Compiles the delta codec's kernels, or loads them from numba's on-disk cache.

    The first delta encode or decode of a process does this by itself (seconds of CPU
    uncached, a fraction of a second from the cache: bench/README.md); a daemon calls it
    at start, off the request path. Safe to call from any thread, any number of times.
    """
    kernels.warm_up()
    finekeys.warm_up()


def encode_exact(array: np.ndarray, *, bfloat16: bool = False, compress: bool = True) -> bytes:
    """Lossless blob of any table dtype (floats, ints, uints, bool), any shape, 0-d and empty.

    ``compress=False`` writes the bytes raw (format version 3): no byte planes, no zstd, for
    storage faster than the coder; ``decode_exact`` reads both.

    Raises:
        CodecError: the dtype is not in the codec's table (complex, object, strings, ...).
    """
    return exact.encode_exact(array, bfloat16=bfloat16, compress=compress)


def decode_exact(blob: bytes | memoryview) -> np.ndarray:
    """The array an exact blob holds (bfloat16 comes back as uint16 words).

    Raises:
        CodecError: the blob is truncated, corrupt, of an unknown version, or a delta blob.
    """
    return exact.decode_exact(blob)


def raw_view(blob: bytes | memoryview) -> np.ndarray | None:
    """The array of a raw exact blob (``encode_exact(compress=False)``) as a read-only view
    of the blob's bytes, no copy; None for any other blob.

    Only the header is checked (its checksum, the payload's length), not the payload's
    checksum: this is for a caller that has verified the whole blob already (a restore
    checks every blob's xxh3_64 against its manifest) and would otherwise hash it twice.

    Raises:
        CodecError: the header is truncated, corrupt or of an unknown version.
    """
    return exact.raw_view(blob)


@dataclass(frozen=True)
class BlobInfo:
    """What a blob's header says.

    ``bits`` is 0 and ``representative`` is ``"none"`` for exact blobs; ``nbytes`` is the size
    of the decoded array in bytes (``len(blob)`` is the stored size); ``domain`` is the
    delta's domain (``"linear"`` for exact blobs).
    """

    kind: Literal["delta", "exact"]
    dtype: str
    shape: tuple[int, ...]
    bits: int
    coder: str
    representative: str
    nbytes: int
    domain: str = "linear"


def blob_info(blob: bytes | memoryview) -> BlobInfo:
    """Reads the header of a complete blob: magic, version, header checksum and length.

    The payload checksum is not verified here (decode does that).

    Raises:
        CodecError: the blob is truncated, not a ckptd codec blob, or of an unknown version.
    """
    header = unpack_header(memoryview(blob).cast("B"))
    kind: Literal["delta", "exact"] = "delta" if KIND_NAMES[header.kind] == "delta" else "exact"
    return BlobInfo(kind, header.dtype.name, header.shape, header.bits, CODERS[header.coder],
                    REPRESENTATIVES[header.representative],
                    header.count * header.dtype.holder.itemsize, DOMAINS[header.domain])
