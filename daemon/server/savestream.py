"""The daemon's side of a Save stream: its framing (header first, then chunks in table
order, or nothing more for shared memory) and its pacing (the idle timeout).

Each chunk's ``data`` is read from its message once (every read of a protobuf ``bytes``
field is a new copy) and ``SaveSession.write`` copies it into the tensor's receive buffer.
Parsing chunks by hand into views of the received message, as the client does for restore
chunks (``streams.decode_reply``), saved no measurable time here once the daemon reuses
message memory (``allocator.py``; bench/README.md, "gRPC transport"), so the generated
parser stays. Transport-free: the servicer hands over the request iterator and the session;
no gRPC ``context`` reaches this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ckptd.daemon.engine.core import SaveSession
from ckptd.daemon.errors import InvalidRequestError, StreamIdleError
from ckptd.protos.v1 import pb


class SaveStream:
    """The messages of one Save call, read one at a time under the idle timeout."""

    def __init__(self, requests: AsyncIterator[pb.SaveRequest], idle_timeout_s: float) -> None:
        self._requests = requests
        self._idle_timeout_s = idle_timeout_s

    async def header(self) -> pb.SaveHeader:
        """The header that must open the stream; ``InvalidRequestError`` otherwise."""
        message = await self.next()
        if message is None or message.WhichOneof("item") != "header":
            got = "an empty stream" if message is None else "a chunk"
            raise InvalidRequestError(f"a save stream must start with its header; got {got}")
        return message.header

    async def receive(self, session: SaveSession, max_chunk_bytes: int) -> None:
        """Writes every chunk into ``session`` until the stream ends; the session checks
        order and bounds, this the framing and the chunk size limit."""
        while (message := await self.next()) is not None:
            if message.WhichOneof("item") != "chunk":
                raise InvalidRequestError("a save stream carries exactly one header; got a second")
            chunk = message.chunk
            data = chunk.data
            if len(data) > max_chunk_bytes:
                raise InvalidRequestError(
                    f"chunk of tensor {chunk.tensor_index} at offset {chunk.offset} holds "
                    f"{len(data)} bytes, over the daemon's max_chunk_bytes "
                    f"{max_chunk_bytes}; send smaller chunks"
                )
            session.write(chunk.tensor_index, chunk.offset, data)

    async def expect_end(self, segment: str) -> None:
        """A save through shared memory sends its header only."""
        if await self.next() is not None:
            raise InvalidRequestError(
                f"a save through shared memory segment {segment!r} carries no chunks; got one"
            )

    async def next(self) -> pb.SaveRequest | None:
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
