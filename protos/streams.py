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
shared-memory segment (``RestoreHeader.shared_memory``): as ``segment_ready`` messages
announce them, they are read out of it with ``preadv`` and hashed block by block as they
land, the same one copy and one check.
numpy, xxhash and the generated messages only (no grpc, no torch).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import checksum, dtypes
from .ckptd.v1 import ckptd_pb2 as pb

Allocate = Callable[[pb.TensorSpec], np.ndarray]
"""Returns the destination of one tensor's bytes: a writable flat uint8 array."""
Progress = Callable[[int], None]
"""Called with the number of bytes just received."""
# A segment is read (and hashed) in blocks of this size: small enough to stay in cache
# between the copy and the hash, large enough that the calls cost nothing.
_BLOCK_BYTES = 4 << 20


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


class StreamError(ValueError):
    """Raised when a restore stream breaks its framing (order, sizes, a second header)."""


def first_header(replies: Iterator[pb.RestoreResponse]) -> pb.RestoreHeader:
    """Reads the header that must open a restore stream."""
    first = next(replies, None)
    if first is None or first.WhichOneof("item") != "header":
        raise StreamError("restore stream did not start with a header")
    return first.header


@dataclass(frozen=True)
class Segment:
    """The client's restore segment: its shm name and a descriptor open on it for reading."""

    name: str
    fd: int


def receive(
    replies: Iterator[pb.RestoreResponse],
    allocate: Allocate,
    on_progress: Progress | None = None,
    *,
    segment: Segment | None = None,
) -> pb.RestoreHeader:
    """Consumes a whole restore into the buffers ``allocate`` gives, one per tensor in table
    order, and verifies the bytes against the header's checksum; returns the header
    (metadata, checksum). The bytes come as chunks, or, when the request named ``segment``
    and the daemon wrote into it, from the segment at the header's offsets."""
    header = first_header(replies)
    assembler = _Assembler(header.tensors, [allocate(spec) for spec in header.tensors])
    if header.HasField("shared_memory"):
        _read_segment(header, replies, segment, assembler, on_progress)
    for reply in replies:
        if reply.WhichOneof("item") != "chunk":
            raise StreamError("restore stream sent a second header")
        assembler.write(reply.chunk)
        if on_progress is not None:
            on_progress(len(reply.chunk.data))
    assembler.finish()
    actual = assembler.checksum.hexdigest()
    if actual != header.checksum:
        raise StreamError(
            f"step {header.ref.step} of {header.ref.run}/rank{header.ref.rank} arrived with "
            f"checksum {actual}, but the daemon announced {header.checksum}: the bytes were "
            "damaged in transit"
        )
    return header


def _read_segment(
    header: pb.RestoreHeader,
    replies: Iterator[pb.RestoreResponse],
    segment: Segment | None,
    assembler: _Assembler,
    on_progress: Progress | None,
) -> None:
    ref = header.shared_memory
    if segment is None or ref.segment_name != segment.name:
        raise StreamError(
            f"restore answered with shared memory segment {ref.segment_name!r}, which the "
            f"request did not name ({segment.name if segment else 'none'!r})"
        )
    tensors = len(header.tensors)
    if len(ref.offsets) != tensors:
        raise StreamError(
            f"restore segment {ref.segment_name!r} lists {len(ref.offsets)} offsets for "
            f"{tensors} tensors"
        )
    done = 0
    for reply in replies:
        if reply.WhichOneof("item") != "segment_ready":
            raise StreamError("a restore through shared memory carries no chunks or second "
                              f"header; got a {reply.WhichOneof('item')}")
        ready = reply.segment_ready
        if not done <= ready <= tensors:
            raise StreamError(f"restore segment announced {ready} tensors ready after "
                              f"{done}, of {tensors}")
        # The daemon writes the next batch meanwhile.
        for index in range(done, ready):
            assembler.read_from(segment.fd, index, ref.offsets[index], on_progress)
        done = ready
    if done != tensors:
        raise StreamError(f"restore ended with {done} of {tensors} tensors in the segment")


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

    def write(self, chunk: pb.TensorChunk) -> None:
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

    def read_from(
        self, fd: int, index: int, offset: int, on_progress: Progress | None
    ) -> None:
        """Reads tensor ``index`` from ``fd`` at ``offset`` straight into its buffer, hashing
        each block right after it lands (still in cache) rather than in a second pass."""
        self._advance()
        spec, target = self._specs[index], self._buffers[index]
        done = self._filled[index]
        while done < spec.nbytes:
            window = memoryview(target[done : done + _BLOCK_BYTES])  # type: ignore[arg-type]
            got = os.preadv(fd, [window], offset + done)
            if got == 0:
                raise StreamError(
                    f"restore segment ended at byte {offset + done} while tensor "
                    f"{spec.name!r} needs bytes {offset}..{offset + spec.nbytes}"
                )
            self.checksum.update(window[:got])
            done += got
            if on_progress is not None:
                on_progress(got)
        self._filled[index] = done

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
