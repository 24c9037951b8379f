"""The gRPC connection to the daemon, and the streaming save transport.

``Connection`` owns the channel and is the only place the client calls RPCs; every call
goes through ``_mapped``, which turns a ``grpc.RpcError`` into the client's exception tree
(``map_rpc_error``). The channel is created with short reconnect backoff so a restarted
daemon is found again within about a second. gRPC's sync API is used, so no event loop
runs in the trainer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator

import grpc
from ckptd.protos.v1 import pb, pb_grpc

from .credentials import TlsFiles, call_metadata, open_channel
from .errors import CkptdTimeoutError, DaemonUnavailableError, map_rpc_error
from .staging import HostBuffer, Layout, StagingBuffer
from .transport import SaveTransport

MiB = 1 << 20
SAVE_METHOD = "/ckptd.v1.CheckpointdService/Save"
DEFAULT_CHUNK_BYTES = 4 * MiB
# Pause between readiness probes that failed at once (a connection dying under them).
RETRY_PAUSE_S = 0.05
# Restore chunks are sized by the daemon; accept anything it may reasonably send.
MAX_RECEIVE_BYTES = 1 << 30
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_RECEIVE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@contextlib.contextmanager
def _mapped(operation: str) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise map_rpc_error(exc, operation) from exc


class Connection:
    """A gRPC channel to one daemon plus typed, error-mapped calls (thread-safe)."""

    def __init__(
        self, target: str, *, call_timeout_s: float, tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        """``call_timeout_s`` bounds every unary call (listing, deleting) and is the grace
        a ``WaitSave`` gets beyond the wait it asks the daemon for; ``tls`` and ``token``
        authenticate every call (``credentials.py``)."""
        self.target = target
        self.call_timeout_s = call_timeout_s
        self.channel = open_channel(target, tls, CHANNEL_OPTIONS)
        self._metadata = call_metadata(token)
        self._stub = pb_grpc.CheckpointdServiceStub(self.channel)
        # Save requests are serialized by hand (see encode_chunk), so bytes pass through.
        self._save = self.channel.stream_unary(
            SAVE_METHOD, request_serializer=None, response_deserializer=pb.SaveResponse.FromString
        )
        self._inflight: set[grpc.Future] = set()
        self._lock = threading.Lock()

    def wait_ready(self, timeout_s: float) -> pb.ServerInfo:
        """Waits until the daemon answers (reconnecting if needed) and returns its info.

        The probe is a ``GetServerInfo`` call that waits for the channel to connect; it
        avoids ``grpc.channel_ready_future``, whose polling thread outlives the future and
        fails if the channel is closed under it. A probe sent just as the daemon died
        fails at once even so (the connection still looked alive), hence the retries.

        Raises:
            DaemonUnavailableError: No daemon answered at the target within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = max(deadline - time.monotonic(), 0.0)
            try:
                with _mapped(f"get server info from {self.target}"):
                    return self._stub.GetServerInfo(
                        pb.GetServerInfoRequest(), timeout=remaining, wait_for_ready=True,
                        metadata=self._metadata,
                    ).info
            except (CkptdTimeoutError, DaemonUnavailableError) as exc:
                if time.monotonic() + RETRY_PAUSE_S >= deadline:
                    raise DaemonUnavailableError(
                        f"no ckptd daemon answered at {self.target!r} within {timeout_s} s; "
                        "is it running, and is the address right?"
                    ) from exc
            time.sleep(RETRY_PAUSE_S)  # let the channel notice the dead connection

    def save(self, requests: Iterable[bytes], operation: str) -> pb.SaveStatus:
        """Runs one Save stream of pre-serialized ``SaveRequest`` messages."""
        with _mapped(operation):
            future = self._save.future(iter(requests), metadata=self._metadata)
            with self._lock:
                self._inflight.add(future)
            try:
                response: pb.SaveResponse = future.result()
                return response.status
            finally:
                with self._lock:
                    self._inflight.discard(future)

    def wait_save(self, ref: pb.StepRef, timeout_s: float) -> pb.SaveStatus:
        request = pb.WaitSaveRequest(ref=ref, timeout_s=timeout_s)
        with _mapped(f"wait for step {ref.step} of run {ref.run!r} rank {ref.rank}"):
            return self._stub.WaitSave(request, timeout=timeout_s + self.call_timeout_s,
                                       metadata=self._metadata).status

    def restore(self, request: pb.RestoreRequest) -> Iterator[pb.RestoreResponse]:
        """Streams a restore; errors while iterating are mapped too."""
        what = "the latest step" if not request.HasField("step") else f"step {request.step}"
        with _mapped(f"restore {what} of run {request.run!r} rank {request.rank}"):
            yield from self._stub.Restore(request, metadata=self._metadata)

    def list_steps(self, run: str, rank: int) -> list[pb.StepInfo]:
        with _mapped(f"list steps of run {run!r} rank {rank}"):
            reply = self._stub.ListSteps(
                pb.ListStepsRequest(run=run, rank=rank), timeout=self.call_timeout_s,
                metadata=self._metadata,
            )
        return list(reply.steps)

    def delete_step(self, ref: pb.StepRef) -> int:
        with _mapped(f"delete step {ref.step} of run {ref.run!r} rank {ref.rank}"):
            reply = self._stub.DeleteStep(
                pb.DeleteStepRequest(ref=ref), timeout=self.call_timeout_s,
                metadata=self._metadata,
            )
        return int(reply.deleted_steps)

    def cancel_saves(self) -> None:
        """Cancels Save streams in flight (they fail with RequestCancelledError)."""
        with self._lock:
            for future in list(self._inflight):
                future.cancel()

    def close(self) -> None:
        self.cancel_saves()
        self.channel.close()


def chunk_bytes_for(info: pb.ServerInfo) -> int:
    """The chunk size to stream with: the daemon's limit, kept under its message limit."""
    size = info.max_chunk_bytes or DEFAULT_CHUNK_BYTES
    if info.max_message_bytes:
        size = min(size, info.max_message_bytes - 64)
    return max(size, 1)


def encode_header(header: pb.SaveHeader) -> bytes:
    return pb.SaveRequest(header=header).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(index: int, offset: int, data: memoryview) -> bytes:
    """Serializes ``SaveRequest{chunk: TensorChunk{index, offset, data}}`` with a single
    copy of ``data`` (protobuf would copy it twice: into ``bytes``, then on serialize).

    Field numbers: SaveRequest.chunk = 2; TensorChunk.tensor_index = 1, offset = 2,
    data = 3. Zero scalars are omitted, as protobuf itself does, so the bytes are identical.
    """
    inner = bytearray()
    if index:
        inner += b"\x08" + _varint(index)
    if offset:
        inner += b"\x10" + _varint(offset)
    inner += b"\x1a" + _varint(len(data))
    return b"".join((b"\x12", _varint(len(inner) + len(data)), inner, data))


class StreamTransport(SaveTransport):
    """Streams the snapshot over gRPC in chunks (any placement of the daemon)."""

    name = "grpc"

    def __init__(
        self, connection: Connection, chunk_bytes: int, *, pin_memory: bool = False
    ) -> None:
        self.connection = connection
        self.chunk_bytes = chunk_bytes
        self.pin_memory = pin_memory

    def allocate(self, capacity: int) -> StagingBuffer:
        return HostBuffer(capacity, pinned=self.pin_memory)

    def send(self, header: pb.SaveHeader, buffer: StagingBuffer, layout: Layout) -> pb.SaveStatus:
        operation = f"save step {header.step} of run {header.run!r} rank {header.rank}"
        return self.connection.save(self._requests(header, buffer, layout), operation)

    def _requests(
        self, header: pb.SaveHeader, buffer: StagingBuffer, layout: Layout
    ) -> Iterator[bytes]:
        yield encode_header(header)
        view = memoryview(buffer.data.numpy())  # type: ignore[arg-type]
        step = self.chunk_bytes
        for index, (offset, size) in enumerate(zip(layout.offsets, layout.nbytes, strict=True)):
            for start in range(0, size, step):
                yield encode_chunk(
                    index, start, view[offset + start : offset + min(size, start + step)]
                )

    def cancel(self) -> None:
        self.connection.cancel_saves()
