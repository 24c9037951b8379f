"""The daemon's side of a Save stream: its framing (header first, then chunks in table
order, or nothing more for shared memory) and its pacing (the idle timeout).

A save's tensor bytes are nearly all of what crosses the wire, so the servicer registers
``streams.decode_request`` as Save's deserializer: each chunk arrives as a ``Chunk`` whose
``data`` is a view of the received message, and ``SaveSession.write`` copies it once, into
the tensor's receive buffer. A chunk framed otherwise (another language's protobuf, say)
arrives as a ``pb.SaveRequest`` and is written the same way. Why, measured (bench/README.md,
"gRPC saves: where the receive goes"; ``bench/transport.py --parts``): protobuf's parse
and the read of ``data`` are two copies of every chunk, two thirds of what the daemon's
Python spends on one; with a codec encoding the save while it arrives (``stream_saves``)
on the same cores, that CPU is time to durable. Transport-free: the servicer hands over
the request iterator and the session; no gRPC ``context`` reaches this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ckptd.daemon.engine.core import SaveSession
from ckptd.daemon.errors import InvalidRequestError, StreamIdleError
from ckptd.protos import streams
from ckptd.protos.v1 import pb


class SaveStream:
    """The messages of one Save call, read one at a time under the idle timeout."""

    def __init__(
        self, requests: AsyncIterator[streams.Request], idle_timeout_s: float
    ) -> None:
        self._requests = requests
        self._idle_timeout_s = idle_timeout_s

    async def header(self) -> pb.SaveHeader:
        """The header that must open the stream; ``InvalidRequestError`` otherwise."""
        message = await self.next()
        if message is None or streams.item_of(message) != "header":
            got = "an empty stream" if message is None else "a chunk"
            raise InvalidRequestError(f"a save stream must start with its header; got {got}")
        assert isinstance(message, pb.SaveRequest)  # a Chunk's item is "chunk"
        return message.header

    async def receive(self, session: SaveSession, max_chunk_bytes: int) -> None:
        """Writes every chunk into ``session`` until the stream ends; the session checks
        order and bounds, this the framing and the chunk size limit."""
        while (message := await self.next()) is not None:
            chunk = message if isinstance(message, streams.Chunk) else _chunk_of(message)
            if len(chunk.data) > max_chunk_bytes:
                raise InvalidRequestError(
                    f"chunk of tensor {chunk.tensor_index} at offset {chunk.offset} holds "
                    f"{len(chunk.data)} bytes, over the daemon's max_chunk_bytes "
                    f"{max_chunk_bytes}; send smaller chunks"
                )
            session.write(chunk.tensor_index, chunk.offset, chunk.data)

    async def expect_end(self, segment: str) -> None:
        """A save through shared memory sends its header only."""
        if await self.next() is not None:
            raise InvalidRequestError(
                f"a save through shared memory segment {segment!r} carries no chunks; got one"
            )

    async def next(self) -> streams.Request | None:
        """The stream's next message (None at its end); ``StreamIdleError`` when none comes
        within the idle timeout, so a paused or silently vanished client holds nothing."""
        try:
            return await asyncio.wait_for(anext(self._requests, None), self._idle_timeout_s)
        except asyncio.TimeoutError:
            raise StreamIdleError(
                f"the save stream sent nothing for {self._idle_timeout_s:g} s (the daemon's "
                "stream_idle_timeout_s); it was ended and its reservation released; send the "
                "save again without pausing inside the stream"
            ) from None


def _chunk_of(message: pb.SaveRequest) -> streams.Chunk:
    if message.WhichOneof("item") != "chunk":
        raise InvalidRequestError("a save stream carries exactly one header; got a second")
    chunk = message.chunk  # ``data`` read once: each read of a bytes field copies it
    return streams.Chunk(chunk.tensor_index, chunk.offset, memoryview(chunk.data))
