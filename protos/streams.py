"""Reassembling a ``Restore`` stream: one header, then every tensor's chunks in table order.

Shared by the trainer-side client (into torch tensors) and the ``ckptd`` CLI (into numpy
arrays): the caller allocates each tensor's destination and hands over its bytes as a flat
``uint8`` array; this module checks the framing and copies each chunk straight in, so a
restore costs one copy. The step checksum (``ckptd.protos.checksum``) is computed over the
chunks as they are copied and compared with the header's at the end, so the caller gets
what the daemon verified, end to end, without a second pass over the bytes. A stream that
skips, repeats or truncates bytes, or whose bytes do not match the checksum, raises
``StreamError`` rather than returning garbage; callers raise it as their own "corrupt
checkpoint" error. On the daemon's host the bytes may instead lie in the client's own
shared-memory segment (``RestoreHeader.shared_memory``), which the daemon wrote: the
client maps it (after checking its size, so no access can fault) and, as
``segment_ready`` messages announce batches, copies them out and hashes them block by
block as they land (the same one copy and one check; a copy out of a mapping costs less
CPU than ``preadv`` of a tmpfs file, which walks the file page by page), or, with
``adopt``, hashes them in place and hands the tensors over as views (no copy at all).
numpy, xxhash and the generated messages only (no grpc, no torch).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import checksum, dtypes
from .ckptd.v1 import ckptd_pb2 as pb

Allocate = Callable[[pb.TensorSpec], np.ndarray]
"""Returns the destination of one tensor's bytes: a writable flat uint8 array."""
Adopt = Callable[[pb.TensorSpec, np.ndarray], None]
"""Takes one tensor's verified bytes, in table order: a flat uint8 view of the mapping."""
Progress = Callable[[int], None]
"""Called with the number of bytes just received."""
# A segment is copied (and hashed) in blocks of this size: small enough to stay in a
# core's L2 between the copy and the hash, large enough that the calls cost nothing.
_BLOCK_BYTES = 1 << 20


def encode_chunk(index: int, offset: int, data: memoryview) -> bytes:
    """Serializes ``SaveRequest{chunk: TensorChunk{index, offset, data}}`` — byte for byte
    also ``RestoreResponse{chunk: ...}``, both field 2 — with a single copy of ``data``
    (protobuf would copy it twice: into ``bytes``, then on serialize). The client sends
    save chunks this way and the daemon restore chunks, each through a serializer that
    passes bytes through.

    Field numbers: SaveRequest.chunk = RestoreResponse.chunk = 2; TensorChunk.tensor_index
    = 1, offset = 2, data = 3. Zero scalars are omitted, as protobuf itself does, so the
    bytes are identical.
    """
    inner = bytearray()
    if index:
        inner += b"\x08" + _varint(index)
    if offset:
        inner += b"\x10" + _varint(offset)
    inner += b"\x1a" + _varint(len(data))
    return b"".join((b"\x12", _varint(len(inner) + len(data)), inner, data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True)
class Chunk:
    """A restore chunk parsed by ``decode_reply``: its bytes are a view of the message."""

    tensor_index: int
    offset: int
    data: memoryview


Reply = pb.RestoreResponse | Chunk
"""What a restore stream yields: messages, or chunks where ``decode_reply`` parsed them."""
Request = pb.SaveRequest | Chunk
"""What a save stream yields to the daemon: messages, or chunks ``decode_request`` parsed."""


def decode_reply(message: bytes) -> Reply:
    """A restore's response deserializer: a chunk — nearly all of a stream — is parsed by
    hand into a view of ``message`` (protobuf copies its bytes twice, into the message and
    again on each access to ``data``, ~0.4 s per GiB here); anything else (a header,
    ``segment_ready``, a chunk framed unlike ``encode_chunk``) goes through protobuf."""
    chunk = _parse_chunk(memoryview(message))
    return chunk if chunk is not None else pb.RestoreResponse.FromString(message)


def decode_request(message: bytes) -> Request:
    """The daemon's Save request deserializer, ``decode_reply``'s mirror (a save chunk is
    framed byte for byte like a restore chunk): a chunk becomes a view of ``message``, so
    the daemon copies its bytes once, into the receive buffer, where protobuf made a copy
    on parsing and one more on each read of ``data``. Anything else goes through protobuf,
    which also raises ``DecodeError`` for a malformed message."""
    chunk = _parse_chunk(memoryview(message))
    return chunk if chunk is not None else pb.SaveRequest.FromString(message)


def item_of(message: Reply | Request) -> str | None:
    """Which item of its ``oneof`` a stream message holds (``"chunk"`` for a ``Chunk``)."""
    return "chunk" if isinstance(message, Chunk) else message.WhichOneof("item")


def _parse_chunk(view: memoryview) -> Chunk | None:
    """``RestoreResponse{chunk}`` or ``SaveRequest{chunk}`` (both field 2) with fields 1-3
    in any order, or None."""
    if len(view) < 2 or view[0] != 0x12:
        return None
    size, pos = _read_varint(view, 1)
    if size is None or pos + size != len(view):
        return None
    fields = {0x08: 0, 0x10: 0}
    data = view[pos:pos]
    while pos < len(view):
        tag = view[pos]
        value, pos = _read_varint(view, pos + 1)
        if value is None:
            return None
        if tag == 0x1A:
            if pos + value > len(view):
                return None
            data, pos = view[pos : pos + value], pos + value
        elif tag in fields:
            fields[tag] = value
        else:
            return None
    if fields[0x08] >= 1 << 32:  # a uint32 protobuf would truncate: let it
        return None
    return Chunk(fields[0x08], fields[0x10], data)


def _read_varint(view: memoryview, pos: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while pos < len(view) and shift < 64:
        byte = view[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


class StreamError(ValueError):
    """Raised when a restore stream breaks its framing (order, sizes, a second header)."""


def first_header(replies: Iterator[Reply]) -> pb.RestoreHeader:
    """Reads the header that must open a restore stream."""
    first = next(replies, None)
    if not isinstance(first, pb.RestoreResponse) or first.WhichOneof("item") != "header":
        raise StreamError("restore stream did not start with a header")
    return first.header


@dataclass(frozen=True)
class Segment:
    """The client's restore segment: its shm name and a descriptor open on it read-write
    (read from, or, with ``adopt``, mapped shared and writable)."""

    name: str
    fd: int


def receive(
    replies: Iterator[Reply],
    allocate: Allocate,
    on_progress: Progress | None = None,
    *,
    segment: Segment | None = None,
    adopt: Adopt | None = None,
) -> pb.RestoreHeader:
    """Consumes a whole restore and verifies its bytes against the header's checksum;
    returns the header (metadata, checksum). The bytes are copied into the buffers
    ``allocate`` gives, one per tensor in table order: from the chunks of a stream, or,
    when the request named ``segment`` and the daemon wrote into it, copied out of a
    read-only mapping of the segment, each block hashed as it lands. With ``adopt``, a
    segment is not copied: it is mapped writable and ``adopt`` receives each tensor's
    bytes as a view of the mapping, once all of them are verified."""
    header = first_header(replies)
    if header.HasField("shared_memory") and adopt is not None:
        views = _map_segment(header, segment)
        digest = _hash_as_ready(header, views, replies, on_progress)
        _check_checksum(header, digest.hexdigest())
        for spec, view in zip(header.tensors, views, strict=True):
            adopt(spec, view)
        return header
    assembler = _Assembler(header.tensors, [allocate(spec) for spec in header.tensors])
    if header.HasField("shared_memory"):
        views = _map_segment(header, segment, writable=False)
        for ready in _announced(header, replies):
            for index in ready:  # the daemon writes the next batch meanwhile
                assembler.copy_from(index, views[index], on_progress)
        del views  # unmapped now, not with the restored state's last reference
    for reply in replies:
        chunk = reply if isinstance(reply, Chunk) else _chunk_of(reply)
        assembler.write(chunk)
        if on_progress is not None:
            on_progress(len(chunk.data))
    assembler.finish()
    _check_checksum(header, assembler.checksum.hexdigest())
    return header


def _chunk_of(reply: pb.RestoreResponse) -> pb.TensorChunk:
    if reply.WhichOneof("item") != "chunk":
        raise StreamError(f"restore stream sent a {reply.WhichOneof('item')} among its chunks")
    return reply.chunk


def _check_checksum(header: pb.RestoreHeader, actual: str) -> None:
    if actual != header.checksum:
        raise StreamError(
            f"step {header.ref.step} of {header.ref.run}/rank{header.ref.rank} arrived with "
            f"checksum {actual}, but the daemon announced {header.checksum}: the bytes were "
            "damaged in transit"
        )


def _check_segment(header: pb.RestoreHeader, segment: Segment | None) -> int:
    """Checks that the daemon answered with the segment the request named, one offset per
    tensor; returns its descriptor."""
    ref = header.shared_memory
    if segment is None or ref.segment_name != segment.name:
        raise StreamError(
            f"restore answered with shared memory segment {ref.segment_name!r}, which the "
            f"request did not name ({segment.name if segment else 'none'!r})"
        )
    if len(ref.offsets) != len(header.tensors):
        raise StreamError(
            f"restore segment {ref.segment_name!r} lists {len(ref.offsets)} offsets for "
            f"{len(header.tensors)} tensors"
        )
    return segment.fd


def _map_segment(
    header: pb.RestoreHeader, segment: Segment | None, *, writable: bool = True
) -> list[np.ndarray]:
    """Maps the client's segment (shared; writable where the views become the trainer's
    tensors, read-only where they are copied out) and returns each tensor's bytes as a
    flat uint8 view, after checking that every tensor lies inside it and that it is as
    large as announced — so no access past its end can fault. Only the client and, until
    its Restore call ends, the daemon hold it; the daemon sizes it once, before the
    header, and never shrinks it."""
    fd, ref, specs = _check_segment(header, segment), header.shared_memory, header.tensors
    for spec, offset in zip(specs, ref.offsets, strict=True):
        _check_nbytes(spec)
        if offset + spec.nbytes > ref.segment_bytes:
            raise StreamError(
                f"restore segment {ref.segment_name!r} places tensor {spec.name!r} at "
                f"{offset}..{offset + spec.nbytes}, past its {ref.segment_bytes} bytes"
            )
    size = os.fstat(fd).st_size
    if size < ref.segment_bytes:
        raise StreamError(
            f"restore segment {ref.segment_name!r} holds {size} bytes, less than the "
            f"{ref.segment_bytes} the daemon announced"
        )
    if ref.segment_bytes == 0:
        return [np.empty(0, dtype=np.uint8) for _ in specs]
    # The views keep the mapping alive; it is unmapped when the last of them dies.
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    whole = np.frombuffer(mmap.mmap(fd, ref.segment_bytes, prot=prot), dtype=np.uint8)
    return [whole[offset : offset + spec.nbytes]
            for spec, offset in zip(specs, ref.offsets, strict=True)]


def _check_nbytes(spec: pb.TensorSpec) -> None:
    try:
        itemsize = dtypes.from_wire(spec.dtype).numpy.itemsize
    except ValueError as exc:
        raise StreamError(f"tensor {spec.name!r}: {exc}") from None
    expected = itemsize * math.prod(spec.shape)
    if spec.nbytes != expected:
        raise StreamError(
            f"tensor {spec.name!r}: the header announces {spec.nbytes} bytes but its "
            f"dtype and shape {list(spec.shape)} hold {expected}"
        )


def _announced(header: pb.RestoreHeader, replies: Iterator[Reply]) -> Iterator[range]:
    """The tensors each ``segment_ready`` announces written (checked to grow to all)."""
    done, tensors = 0, len(header.tensors)
    for reply in replies:
        item = item_of(reply)
        if item != "segment_ready" or isinstance(reply, Chunk):
            raise StreamError("a restore through shared memory carries no chunks or second "
                              f"header; got a {item}")
        ready = reply.segment_ready
        if not done <= ready <= tensors:
            raise StreamError(f"restore segment announced {ready} tensors ready after "
                              f"{done}, of {tensors}")
        yield range(done, ready)
        done = ready
    if done != tensors:
        raise StreamError(f"restore ended with {done} of {tensors} tensors in the segment")


def _hash_as_ready(
    header: pb.RestoreHeader,
    views: Sequence[np.ndarray],
    replies: Iterator[Reply],
    on_progress: Progress | None,
) -> checksum.TensorsChecksum:
    """Hashes each batch of the mapped segment as ``segment_ready`` announces it (while the
    daemon writes the next), in the checksum's framing."""
    digest = checksum.TensorsChecksum()
    for ready in _announced(header, replies):
        for index in ready:
            spec = header.tensors[index]
            digest.begin(spec.name, dtypes.from_wire(spec.dtype).name, spec.shape, spec.nbytes)
            digest.update(views[index].data)
            if on_progress is not None:
                on_progress(spec.nbytes)
    return digest


class _Assembler:
    """Destination buffers of one restore and the position of the next expected chunk."""

    def __init__(self, specs: Sequence[pb.TensorSpec], buffers: Sequence[np.ndarray]) -> None:
        for spec, buffer in zip(specs, buffers, strict=True):
            if buffer.nbytes != spec.nbytes:
                raise StreamError(
                    f"tensor {spec.name!r}: the header announces {spec.nbytes} bytes but its "
                    f"dtype and shape {list(spec.shape)} hold {buffer.nbytes}"
                )
        self._specs = specs
        self._buffers = buffers
        self._filled = [0] * len(specs)
        self._index = -1  # the tensor whose bytes are being hashed
        self.checksum = checksum.TensorsChecksum()

    def write(self, chunk: pb.TensorChunk | Chunk) -> None:
        index, offset, data = chunk.tensor_index, chunk.offset, chunk.data
        self._advance()
        if index != self._index or index >= len(self._specs) or offset != self._filled[index]:
            expected = (
                f"tensor {self._index} offset {self._filled[self._index]}"
                if self._index < len(self._specs)
                else "no more chunks"
            )
            raise StreamError(
                f"restore stream out of order: got tensor {index} offset {offset}, "
                f"expected {expected}"
            )
        end = offset + len(data)
        spec = self._specs[index]
        if end > spec.nbytes:
            raise StreamError(
                f"restore stream overruns tensor {spec.name!r}: {end} bytes of {spec.nbytes}"
            )
        self._buffers[index][offset:end] = np.frombuffer(data, dtype=np.uint8)
        self.checksum.update(data)
        self._filled[index] = end

    def copy_from(self, index: int, source: np.ndarray, on_progress: Progress | None) -> None:
        """Copies tensor ``index`` out of ``source`` (its bytes in the mapped segment) into
        its buffer block by block, hashing each block right after it lands (still in
        cache) rather than in a second pass."""
        self._advance()
        target = self._buffers[index]
        for start in range(0, len(source), _BLOCK_BYTES):
            block = target[start : start + _BLOCK_BYTES]
            np.copyto(block, source[start : start + _BLOCK_BYTES])
            self.checksum.update(block.data)
            if on_progress is not None:
                on_progress(len(block))
        self._filled[index] = len(source)

    def finish(self) -> None:
        self._advance()
        for spec, filled in zip(self._specs, self._filled, strict=True):
            if filled != spec.nbytes:
                raise StreamError(
                    f"restore stream ended early: tensor {spec.name!r} has {filled} "
                    f"of {spec.nbytes} bytes"
                )

    def _advance(self) -> None:
        # Complete (or empty) tensors: their chunks are done, the next one's follow. Each
        # tensor's framing enters the checksum as it starts, in table order.
        while self._index < 0 or (
            self._index < len(self._specs)
            and self._filled[self._index] == self._specs[self._index].nbytes
        ):
            self._index += 1
            if self._index < len(self._specs):
                spec = self._specs[self._index]
                name = dtypes.from_wire(spec.dtype).name
                self.checksum.begin(spec.name, name, spec.shape, spec.nbytes)
