"""The lossless path: bases, integer/bool buffers, tiny tensors, anything marked exact.

Multi-byte float tensors are split into byte planes before zstd: the sign/exponent bytes of
neighbouring weights are nearly constant and compress well once they sit together, while the
low mantissa bytes stay noise; interleaved, zstd finds neither. Integers and bools go to zstd
as they are (their redundancy is already byte-aligned).
"""

from __future__ import annotations

import numpy as np

from . import chunks, entropy
from .format import (
    CODER_IDS,
    CODER_RAW,
    FLAG_BYTE_PLANES,
    KIND_EXACT,
    KIND_NAMES,
    CodecError,
    Header,
    Reader,
    build_blob,
    dtype_of,
    read_chunks,
    unpack_header,
    verify_payload,
    write_chunks,
)


def encode_exact(array: np.ndarray, *, bfloat16: bool, compress: bool = True) -> bytes:
    """See ``ckptd.daemon.codec.encode_exact``."""
    array = np.asarray(array)
    dtype = dtype_of(array, bfloat16=bfloat16)
    flat = np.ascontiguousarray(array, dtype=dtype.holder).reshape(-1)
    if not compress:
        header = Header(KIND_EXACT, dtype, tuple(array.shape), 0, CODER_RAW, 0, 0,
                        max(flat.size, 1), flat.size)
        return build_blob(header, [flat.view(np.uint8).data])
    planes = dtype.is_float and dtype.holder.itemsize > 1
    parts = chunks.bounds(flat.size, chunks.CHUNK_ELEMS)
    pool = chunks.ScratchPool()
    with chunks.mapper(len(parts)) as run:
        bodies = run(lambda s: _encode_chunk(flat[s], planes, pool.get()), parts)
    header = Header(KIND_EXACT, dtype, tuple(array.shape), 0, CODER_IDS["zstd"], 0,
                    FLAG_BYTE_PLANES if planes else 0, chunks.CHUNK_ELEMS, flat.size)
    return build_blob(header, write_chunks(bodies))


def decode_exact(blob: bytes | memoryview) -> np.ndarray:
    """See ``ckptd.daemon.codec.decode_exact``."""
    view = memoryview(blob).cast("B")
    header = unpack_header(view)
    if header.kind != KIND_EXACT:
        raise CodecError(f"decode_exact got a {KIND_NAMES[header.kind]} blob; use decode_delta "
                         f"with its reference")
    if header.flags & ~FLAG_BYTE_PLANES:
        raise CodecError(f"corrupt blob: unknown flags {header.flags:#x}")
    payload = verify_payload(view, header)
    if header.coder == CODER_RAW:
        return _decode_raw(payload, header)
    reader = Reader(payload)
    bodies = read_chunks(reader, header.nchunks)
    reader.at_end()
    parts = chunks.bounds(header.count, header.chunk_elems)
    itemsize = header.dtype.holder.itemsize
    for body, part in zip(bodies, parts, strict=True):
        entropy.check_zstd_size(body, (part.stop - part.start) * itemsize)
    out = chunks.empty_output(header.count, header.dtype.holder)
    planes = bool(header.flags & FLAG_BYTE_PLANES)
    pool = chunks.ScratchPool()
    with chunks.mapper(len(parts)) as run:
        run(lambda i: _decode_chunk(bodies[i], out[parts[i]], planes, pool.get()),
            range(len(parts)))
    return out.reshape(header.shape)


def raw_view(blob: bytes | memoryview) -> np.ndarray | None:
    """See ``ckptd.daemon.codec.raw_view``."""
    view = memoryview(blob).cast("B")
    header = unpack_header(view)
    if header.kind != KIND_EXACT or header.coder != CODER_RAW:
        return None
    array = np.frombuffer(_raw_payload(view[header.size:], header), header.dtype.holder)
    array.flags.writeable = False
    return array.reshape(header.shape)


def _decode_raw(payload: memoryview, header: Header) -> np.ndarray:
    """A raw blob's tensor: one copy out of the blob, so the array owns writable memory."""
    out = chunks.empty_output(header.count, header.dtype.holder)
    out.view(np.uint8)[...] = np.frombuffer(_raw_payload(payload, header), np.uint8)
    return out.reshape(header.shape)


def _raw_payload(payload: memoryview, header: Header) -> memoryview:
    """A raw blob's payload: the tensor's C-order bytes, checked for their length."""
    expected = header.count * header.dtype.holder.itemsize
    if len(payload) != expected:
        raise CodecError(f"corrupt blob: raw payload of {len(payload)} bytes, "
                         f"{header.shape} {header.dtype.name} needs {expected}")
    return payload


def _encode_chunk(values: np.ndarray, planes: bool, scratch: chunks.Scratch) -> bytes:
    data = values.view(np.uint8)
    if planes:
        data = _split_planes(values, scratch).reshape(-1)
    return entropy.zstd_compress(data.data, scratch)


def _decode_chunk(body: memoryview, out: np.ndarray, planes: bool,
                  scratch: chunks.Scratch) -> None:
    raw = np.frombuffer(entropy.zstd_decompress(body, out.nbytes, scratch), np.uint8)
    if planes:
        _merge_planes(raw.reshape(out.itemsize, out.size), out)
    else:
        out.view(np.uint8)[...] = raw


def _word(values: np.ndarray) -> np.ndarray:
    """The elements as unsigned words of their size (little-endian: plane i = bits 8i..8i+7)."""
    return values.view(np.dtype(f"<u{values.itemsize}"))


def _split_planes(values: np.ndarray, scratch: chunks.Scratch) -> np.ndarray:
    """(itemsize, n) array of byte planes. Shifting whole words is ~2x faster than a strided
    byte transpose (and ~4x on the way back)."""
    words = _word(values)
    planes = scratch.get("planes", values.nbytes, np.uint8).reshape(values.itemsize, values.size)
    shifted = scratch.get("shifted", values.size, words.dtype)
    for i in range(values.itemsize):
        np.right_shift(words, 8 * i, out=shifted)
        np.copyto(planes[i], shifted, casting="unsafe")
    return planes


def _merge_planes(planes: np.ndarray, out: np.ndarray) -> None:
    """Inverse of ``_split_planes``, written into ``out``."""
    words = _word(out)
    np.copyto(words, planes[-1])
    for plane in planes[-2::-1]:
        np.left_shift(words, 8, out=words)
        np.bitwise_or(words, plane, out=words)
