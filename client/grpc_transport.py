"""The gRPC connection to the daemon, and the streaming save transport.

``Connection`` owns the channel and is the only place the client calls RPCs. Every call
goes through ``_call``: each attempt through ``_mapped``, which turns a ``grpc.RpcError``
into the client's exception tree (``map_rpc_error``), and the attempts through
``call_with_retry`` (``retry.py``), which waits out a daemon that restarts or stalls for up
to ``reconnect_timeout_s``. The channel is created with short reconnect backoff so a
restarted daemon is found again within about a second. gRPC's sync API is used, so no
event loop runs in the trainer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import grpc
from ckptd.protos.streams import Reply, decode_reply, encode_chunk
from ckptd.protos.v1 import pb, pb_grpc

from .credentials import TlsFiles, call_metadata, open_channel
from .errors import CheckpointNotFoundError, StepConflictError, map_rpc_error
from .retry import Attempt, Retry, call_with_retry
from .staging import HostBuffer, Layout, StagingBuffer
from .transport import SaveTransport

logger = logging.getLogger("ckptd.client")
T = TypeVar("T")

MiB = 1 << 20
SAVE_METHOD = "/ckptd.v1.CheckpointdService/Save"
RESTORE_METHOD = "/ckptd.v1.CheckpointdService/Restore"
DEFAULT_CHUNK_BYTES = 4 * MiB
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
    """A gRPC channel to one daemon plus typed, error-mapped, retried calls (thread-safe).

    Which calls retry which failures, and why, is ``retry.py``'s docstring.
    """

    def __init__(
        self,
        target: str,
        *,
        call_timeout_s: float,
        reconnect_timeout_s: float = 30.0,
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        """``call_timeout_s`` bounds each attempt of a unary call (readiness, listing,
        deleting) and is the grace a ``WaitSave`` gets beyond the wait it asks the daemon
        for; ``reconnect_timeout_s`` is how long a call retries transient failures; ``tls``
        and ``token`` authenticate every call (``credentials.py``)."""
        self.target = target
        self.call_timeout_s = call_timeout_s
        self.retry = Retry(reconnect_timeout_s)
        self.channel = open_channel(target, tls, CHANNEL_OPTIONS)
        self._metadata = call_metadata(token)
        self._stub = pb_grpc.CheckpointdServiceStub(self.channel)
        # Save requests are serialized by hand (see encode_chunk), so bytes pass through.
        self._save = self.channel.stream_unary(
            SAVE_METHOD, request_serializer=None, response_deserializer=pb.SaveResponse.FromString
        )
        # Restore chunks are parsed by hand into views of the received bytes (decode_reply).
        self._restore = self.channel.unary_stream(
            RESTORE_METHOD, request_serializer=pb.RestoreRequest.SerializeToString,
            response_deserializer=decode_reply,
        )
        self._inflight: set[grpc.Future] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def _call(
        self,
        operation: str,
        fn: Callable[[Attempt], T],
        *,
        idempotent: bool,
        retry: Retry | None = None,
        deadline: float | None = None,
    ) -> T:
        def attempt(this: Attempt) -> T:
            with _mapped(operation):
                return fn(this)

        return call_with_retry(
            attempt, operation=operation, target=self.target, retry=retry or self.retry,
            idempotent=idempotent, closed=self._closed, deadline=deadline,
        )  # fmt: skip

    def _server_info(self, attempt: Attempt) -> pb.ServerInfo:
        # Waits for the channel to connect (up to the attempt's deadline) rather than
        # failing at once, and avoids grpc.channel_ready_future, whose polling thread
        # outlives the future and fails if the channel is closed under it.
        timeout = min(self.call_timeout_s, attempt.remaining_s())
        request = pb.GetServerInfoRequest()
        return self._stub.GetServerInfo(
            request, timeout=timeout, wait_for_ready=True, metadata=self._metadata
        ).info

    def wait_ready(
        self, retry: Retry | None = None, *, deadline: float | None = None
    ) -> pb.ServerInfo:
        """Waits until the daemon answers and returns its info; ``retry`` defaults to the
        connection's (``reconnect_timeout_s``).

        Raises:
            DaemonUnavailableError: No daemon answered at the target within the window.
        """
        operation = f"get server info from {self.target}"
        return self._call(
            operation, self._server_info, idempotent=True, retry=retry, deadline=deadline
        )

    def save(self, requests: Callable[[], Iterable[bytes]], operation: str) -> pb.SaveStatus:
        """Runs one Save stream of pre-serialized ``SaveRequest`` messages (``requests()``
        makes them anew for each attempt); no deadline, resent while the daemon restarts."""

        def attempt(this: Attempt) -> pb.SaveStatus:
            try:
                return self._save_once(requests())
            except StepConflictError as exc:
                if this.is_retry and exc.code == "ALREADY_EXISTS":
                    logger.info("%s: an earlier attempt got through (%s)", operation, exc.details)
                    return pb.SaveStatus(state=pb.SAVE_STATE_ACCEPTED)
                raise

        return self._call(operation, attempt, idempotent=False)

    def _save_once(self, requests: Iterable[bytes]) -> pb.SaveStatus:
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
        operation = f"wait for step {ref.step} of run {ref.run!r} rank {ref.rank}"
        return self._call(
            operation,
            lambda _: self._stub.WaitSave(
                request, timeout=timeout_s + self.call_timeout_s, metadata=self._metadata
            ).status,
            idempotent=True,
        )

    def restore(
        self, request: pb.RestoreRequest, consume: Callable[[Iterator[Reply]], T]
    ) -> T:
        """Streams a restore into ``consume`` and returns what it returns; a stream cut off
        by a restarting daemon is received again from the start."""
        what = "the latest step" if not request.HasField("step") else f"step {request.step}"

        def attempt(this: Attempt) -> T:
            # The stream has no deadline (a large restore takes its time): a readiness
            # probe first, so a stalled daemon is waited for under call_timeout_s.
            self._server_info(this)
            return consume(self._restore(request, metadata=self._metadata))

        operation = f"restore {what} of run {request.run!r} rank {request.rank}"
        return self._call(operation, attempt, idempotent=True)

    def list_steps(self, run: str, rank: int) -> list[pb.StepInfo]:
        request = pb.ListStepsRequest(run=run, rank=rank)
        reply = self._call(
            f"list steps of run {run!r} rank {rank}",
            lambda _: self._stub.ListSteps(
                request, timeout=self.call_timeout_s, metadata=self._metadata
            ),
            idempotent=True,
        )
        return list(reply.steps)

    def delete_step(self, ref: pb.StepRef) -> int:
        """Deletes one step; returns the steps removed (0 when a retry found it gone)."""
        operation = f"delete step {ref.step} of run {ref.run!r} rank {ref.rank}"
        request = pb.DeleteStepRequest(ref=ref)

        def attempt(this: Attempt) -> int:
            try:
                reply = self._stub.DeleteStep(
                    request, timeout=self.call_timeout_s, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                error = map_rpc_error(exc, operation)
                if this.is_retry and isinstance(error, CheckpointNotFoundError):
                    logger.warning("%s: not found on a retry; an earlier attempt, whose "
                                   "answer was lost, deleted it", operation)  # fmt: skip
                    return 0
                raise error from exc
            return int(reply.deleted_steps)

        # A delete must not time out behind a stalled daemon (DEADLINE_EXCEEDED is not
        # retried for it), so it goes once the daemon answers a probe, in the same window.
        deadline = time.monotonic() + self.retry.window_s
        self.wait_ready(deadline=deadline)
        return self._call(operation, attempt, idempotent=False, deadline=deadline)

    def set_retention(self, request: pb.SetRetentionRequest) -> pb.RetentionPolicy:
        """Stores the run's retention policy; idempotent (the same policy set twice is
        stored twice), so retried like a read."""
        reply = self._call(
            f"set the retention policy of run {request.run!r}",
            lambda _: self._stub.SetRetention(
                request, timeout=self.call_timeout_s, metadata=self._metadata
            ),
            idempotent=True,
        )
        return reply.policy

    def cancel_saves(self) -> None:
        """Cancels Save streams in flight (they fail with RequestCancelledError)."""
        with self._lock:
            for future in list(self._inflight):
                future.cancel()

    def close(self) -> None:
        """Ends retrying, cancels saves in flight and closes the channel."""
        self._closed.set()
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
        return self.connection.save(lambda: self._requests(header, buffer, layout), operation)

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
