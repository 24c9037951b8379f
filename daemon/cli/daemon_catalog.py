"""``Catalog`` over a running daemon, through the ckptd.v1 gRPC API.

Every RPC goes through ``_mapped``, the one place a ``grpc.RpcError`` becomes the daemon's
exception tree: the daemon names the class of each error it raises in the trailing metadata
``ckptd-error`` (see ``ckptd.daemon.server.status``), so the same class comes back here; a status
without it (no daemon listening, a deadline) is mapped by its code.

Restores are checked again on this side: the bytes received must hash to the checksum the
daemon announced, so ``verify`` through a daemon covers the transport too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
from ckptd.daemon import errors
from ckptd.daemon.cli.catalog import (
    Catalog,
    CatalogError,
    ProgressCallback,
    StepDetail,
    TensorRow,
)
from ckptd.daemon.domain import RestoredCheckpoint, RunInfo, StepKey, TensorSpec
from ckptd.daemon.server import convert
from ckptd.daemon.server.status import ERROR_METADATA_KEY
from ckptd.daemon.store.manifest import tensors_checksum
from ckptd.protos.names import normalize_target
from ckptd.protos.records import StepInfo, step_info_from_message
from ckptd.protos.v1 import pb, pb_grpc

# Restore chunks are sized by the daemon (max_chunk_bytes); accept any it may send.
_MAX_RECEIVE_BYTES = 1 << 30


class DaemonUnreachableError(CatalogError, ConnectionError):
    """Raised when no daemon answers at the target (not running, or a wrong address)."""


class DaemonTimeoutError(CatalogError, TimeoutError):
    """Raised when the daemon does not answer a call within the CLI's timeout."""


# Statuses that arrive without the daemon's class name (raised by gRPC itself).
_BY_CODE: dict[grpc.StatusCode, type[Exception]] = {
    grpc.StatusCode.UNAVAILABLE: DaemonUnreachableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DaemonTimeoutError,
    grpc.StatusCode.NOT_FOUND: errors.StepNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequestError,
    grpc.StatusCode.DATA_LOSS: errors.CorruptCheckpointError,
}


def map_rpc_error(exc: grpc.RpcError, operation: str, target: str) -> Exception:
    """Converts a failed RPC into the daemon's exception tree, or a ``CatalogError`` when
    gRPC itself failed (no daemon, deadline); raise it ``from exc``."""
    code = _call(exc, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _call(exc, "details") or str(exc) or "no details"
    trailing = _call(exc, "trailing_metadata")
    name = dict(trailing or ()).get(ERROR_METADATA_KEY)
    cls = getattr(errors, str(name), None) if name else None
    if isinstance(cls, type) and issubclass(cls, errors.CkptdError):
        return cls(details)
    if code is grpc.StatusCode.UNAVAILABLE:
        return DaemonUnreachableError(f"cannot reach a ckptd daemon at {target} ({details}); "
                                      "is it running? (--target or $CKPTD_TARGET)")
    fallback = _BY_CODE.get(code, errors.CkptdError)
    return fallback(f"{operation}: {details} (gRPC status {code.name})")


def _call(exc: grpc.RpcError, method: str) -> Any:
    # A failed call's RpcError is also a grpc.Call; other RpcErrors lack these methods.
    fn = getattr(exc, method, None)
    return fn() if callable(fn) else None


class DaemonCatalog(Catalog):
    """Asks the daemon at ``target``; unary calls give up after ``timeout_s``."""

    def __init__(self, target: str, *, timeout_s: float) -> None:
        try:
            self.target = normalize_target(target)
        except ValueError as exc:
            raise errors.InvalidRequestError(f"--target: {exc}") from exc
        self.location = f"daemon at {self.target}"
        self._timeout_s = timeout_s
        options = [("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES)]
        self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = pb_grpc.CheckpointdStub(self._channel)

    def describe(self) -> list[tuple[str, str]]:
        with self._mapped("get server info"):
            info = self._stub.GetServerInfo(pb.ServerInfoRequest(), timeout=self._timeout_s)
        names = ("version", "api_version", "storage_url", "hostname", "default_bits",
                 "base_interval", "max_inflight_bytes", "max_checkpoint_bytes",
                 "max_message_bytes", "max_chunk_bytes", "max_tensors", "shared_memory")
        return [("target", self.target)] + [(name, str(getattr(info, name))) for name in names]

    def list_runs(self) -> list[RunInfo]:
        with self._mapped("list runs"):
            reply = self._stub.ListRuns(pb.ListRunsRequest(), timeout=self._timeout_s)
        runs = [RunInfo(r.run, r.rank, r.step_count, r.latest_step, r.stored_bytes)
                for r in reply.runs]
        return sorted(runs, key=lambda r: (r.run, r.rank))

    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        with self._mapped(f"list steps of {run}/rank{rank}"):
            reply = self._stub.ListSteps(pb.ListStepsRequest(run=run, rank=rank),
                                         timeout=self._timeout_s)
        return [step_info_from_message(s) for s in reply.steps]

    def step_detail(self, key: StepKey) -> StepDetail:
        # The API has no "describe step" call: read a restore's header, then hang up.
        call = self._stub.Restore(_restore_request(key))
        try:
            with self._mapped(f"describe step {key}"):
                header = _first_header(call)
        finally:
            call.cancel()
        specs = _specs(header)
        return StepDetail(key, tuple(TensorRow(spec) for spec in specs), dict(header.metadata),
                          header.checksum)

    def restore(
        self, key: StepKey, on_progress: ProgressCallback | None = None
    ) -> RestoredCheckpoint:
        call = self._stub.Restore(_restore_request(key))
        try:
            with self._mapped(f"restore step {key}"):
                header = _first_header(call)
                specs = _specs(header)
                receiver = _Receiver(specs, on_progress)
                for reply in call:
                    if reply.WhichOneof("item") != "chunk":
                        raise errors.CorruptCheckpointError(
                            f"restore stream of {key} sent a second header")
                    receiver.write(reply.chunk)
        finally:
            call.cancel()
        arrays = receiver.finish()
        actual = tensors_checksum(specs, arrays)
        if actual != header.checksum:
            raise errors.CorruptCheckpointError(
                f"step {key} arrived with checksum {actual}, but the daemon announced "
                f"{header.checksum}")
        return RestoredCheckpoint(key, specs, arrays, dict(header.metadata), header.checksum)

    def delete_step(self, key: StepKey) -> int:
        with self._mapped(f"delete step {key}"):
            reply = self._stub.DeleteStep(pb.DeleteStepRequest(ref=convert.ref_from_key(key)),
                                          timeout=self._timeout_s)
        return int(reply.deleted_steps)

    def delete_run(self, run: str) -> int:
        with self._mapped(f"delete run {run!r}"):
            reply = self._stub.DeleteRun(pb.DeleteRunRequest(run=run), timeout=self._timeout_s)
        return int(reply.deleted_steps)

    def close(self) -> None:
        self._channel.close()

    @contextlib.contextmanager
    def _mapped(self, operation: str) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, operation, self.target) from exc


def _restore_request(key: StepKey) -> pb.RestoreRequest:
    return pb.RestoreRequest(run=key.run, rank=key.rank, step=key.step)


def _first_header(call: Iterator[pb.RestoreReply]) -> pb.RestoreHeader:
    first = next(call, None)
    if first is None or first.WhichOneof("item") != "header":
        raise errors.CorruptCheckpointError("restore stream did not start with a header")
    return first.header


def _specs(header: pb.RestoreHeader) -> tuple[TensorSpec, ...]:
    try:
        return tuple(convert.spec_from_proto(i, s) for i, s in enumerate(header.tensors))
    except errors.InvalidRequestError as exc:
        raise errors.CorruptCheckpointError(f"restore header is malformed: {exc}") from exc


class _Receiver:
    """Fills one array per spec from chunks that must arrive in table and byte order."""

    def __init__(self, specs: tuple[TensorSpec, ...], on_progress: ProgressCallback | None):
        self._specs = specs
        self._arrays = [np.empty(spec.shape, spec.dtype_info.numpy) for spec in specs]
        self._views = [array.reshape(-1).view(np.uint8) for array in self._arrays]
        self._filled = [0] * len(specs)
        self._next = 0
        self._on_progress = on_progress

    def write(self, chunk: pb.TensorChunk) -> None:
        index, offset, data = chunk.tensor_index, chunk.offset, chunk.data
        while self._next < len(self._specs) and (
            self._filled[self._next] == self._specs[self._next].nbytes
        ):
            self._next += 1  # complete (or empty) tensors: chunks move on to the next one
        if index != self._next or index >= len(self._specs) or offset != self._filled[index]:
            raise errors.CorruptCheckpointError(
                f"restore stream out of order at tensor {index} offset {offset}")
        end = offset + len(data)
        if end > self._specs[index].nbytes:
            raise errors.CorruptCheckpointError(
                f"restore stream overruns tensor {self._specs[index].name!r}: {end} bytes of "
                f"{self._specs[index].nbytes}")
        self._views[index][offset:end] = np.frombuffer(data, dtype=np.uint8)
        self._filled[index] = end
        if self._on_progress is not None:
            self._on_progress(len(data))

    def finish(self) -> tuple[np.ndarray, ...]:
        for spec, filled in zip(self._specs, self._filled, strict=True):
            if filled != spec.nbytes:
                raise errors.CorruptCheckpointError(
                    f"restore stream ended early: tensor {spec.name!r} has {filled} of "
                    f"{spec.nbytes} bytes")
        return tuple(self._arrays)
