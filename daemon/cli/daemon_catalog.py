"""``Catalog`` over a running daemon, through the ckptd.v1 gRPC API.

Every RPC goes through ``_mapped``, which raises the client's exception tree
(``ckptd.client.errors.map_rpc_error``): the CLI is a client of the daemon like any other
and reads the same wire contract (the ``ErrorReason`` of each error; the status code when
gRPC itself failed, such as no daemon listening or a deadline). ``ckptd.client.errors``
imports without torch, so the daemon image can run this.

Restores are checked again on this side (``ckptd.protos.streams`` hashes the bytes as they
arrive and compares them with the checksum the daemon announced), so ``verify`` through a
daemon covers the transport too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import numpy as np
from ckptd.client.credentials import TlsFiles, call_metadata, open_channel
from ckptd.client.errors import CorruptCheckpointError, map_rpc_error
from ckptd.daemon import errors
from ckptd.daemon.cli.catalog import Catalog, ProgressCallback, StepDetail, TensorRow
from ckptd.daemon.config import AUTO_BITS
from ckptd.daemon.domain import RestoredCheckpoint, RunInfo, StepKey, TensorSpec
from ckptd.daemon.server import convert
from ckptd.protos import streams
from ckptd.protos.names import normalize_target
from ckptd.protos.records import StepInfo, step_info_from_message
from ckptd.protos.v1 import pb, pb_grpc

# Restore chunks are sized by the daemon (max_chunk_bytes); accept any it may send.
_MAX_RECEIVE_BYTES = 1 << 30
_INFO_FIELDS = ("version", "api_version", "storage_url", "hostname", "default_bits",
                "auto_bits_max_error", "auto_bits_relative_to", "buckets_per_octave",
                "base_interval", "lossy_min_elements", "max_inflight_bytes",
                "max_checkpoint_bytes", "max_message_bytes", "max_chunk_bytes", "max_tensors",
                "shared_memory")



def _info_value(info: pb.ServerInfo, name: str) -> str:
    """One ServerInfo field as ``ckptd info`` prints it (a wire float32 rounded back)."""
    value = getattr(info, name)
    if name == "default_bits" and value == AUTO_BITS:
        return "auto"
    if name == "buckets_per_octave" and value == 0:
        return "1"  # a daemon from before the field: octaves
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class DaemonCatalog(Catalog):
    """Asks the daemon at ``target``; unary calls give up after ``timeout_s``."""

    def __init__(
        self, target: str, *, timeout_s: float, tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        try:
            self.target = normalize_target(target)
        except ValueError as exc:
            raise errors.InvalidRequestError(f"--target: {exc}") from exc
        self.location = f"daemon at {self.target}"
        self._timeout_s = timeout_s
        options = [("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES)]
        self._channel = open_channel(self.target, tls, options)
        self._metadata = call_metadata(token)
        self._stub = pb_grpc.CheckpointdServiceStub(self._channel)

    def describe(self) -> list[tuple[str, str]]:
        with self._mapped("get server info"):
            response = self._stub.GetServerInfo(pb.GetServerInfoRequest(),
                                                timeout=self._timeout_s, metadata=self._metadata)
        info = response.info
        return [("target", self.target)] + [(name, _info_value(info, name))
                                            for name in _INFO_FIELDS]

    def list_runs(self) -> list[RunInfo]:
        with self._mapped("list runs"):
            reply = self._stub.ListRuns(pb.ListRunsRequest(), timeout=self._timeout_s,
                                        metadata=self._metadata)
        runs = [RunInfo(r.run, r.rank, r.step_count, r.latest_step, r.stored_bytes,
                        convert.retention_from_proto(r.retention)
                        if r.HasField("retention") else None,
                        hidden_steps=r.hidden_steps, hidden_bytes=r.hidden_bytes)
                for r in reply.runs]
        return sorted(runs, key=lambda r: (r.run, r.rank))

    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        with self._mapped(f"list steps of {run}/rank{rank}"):
            reply = self._stub.ListSteps(pb.ListStepsRequest(run=run, rank=rank),
                                         timeout=self._timeout_s, metadata=self._metadata)
        return [step_info_from_message(s) for s in reply.steps]

    def step_detail(self, key: StepKey) -> StepDetail:
        # The API has no "describe step" call: read a restore's header, then hang up.
        call = self._stub.Restore(_restore_request(key), metadata=self._metadata)
        try:
            with self._mapped(f"describe step {key}"):
                header = streams.first_header(call)
        finally:
            call.cancel()
        specs = _specs(header)
        return StepDetail(key, tuple(TensorRow(spec) for spec in specs), dict(header.metadata),
                          header.checksum)

    def restore(
        self, key: StepKey, on_progress: ProgressCallback | None = None
    ) -> RestoredCheckpoint:
        call = self._stub.Restore(_restore_request(key), metadata=self._metadata)
        arrays: list[np.ndarray] = []
        try:
            with self._mapped(f"restore step {key}"):
                header = streams.receive(call, _allocate_into(arrays), on_progress)
        finally:
            call.cancel()
        # streams.receive verified the bytes against the header's checksum as they arrived.
        return RestoredCheckpoint(key, _specs(header), tuple(arrays), dict(header.metadata),
                                  header.checksum)

    def delete_step(self, key: StepKey) -> int:
        with self._mapped(f"delete step {key}"):
            reply = self._stub.DeleteStep(pb.DeleteStepRequest(ref=convert.ref_from_key(key)),
                                          timeout=self._timeout_s, metadata=self._metadata)
        return int(reply.deleted_steps)

    def delete_run(self, run: str) -> int:
        with self._mapped(f"delete run {run!r}"):
            reply = self._stub.DeleteRun(pb.DeleteRunRequest(run=run), timeout=self._timeout_s,
                                         metadata=self._metadata)
        return int(reply.deleted_steps)

    def close(self) -> None:
        self._channel.close()

    @contextlib.contextmanager
    def _mapped(self, operation: str) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, f"{operation} (daemon at {self.target})") from exc
        except streams.StreamError as exc:
            raise CorruptCheckpointError(f"{operation}: {exc}") from exc


def _restore_request(key: StepKey) -> pb.RestoreRequest:
    return pb.RestoreRequest(run=key.run, rank=key.rank, step=key.step)


def _specs(header: pb.RestoreHeader) -> tuple[TensorSpec, ...]:
    try:
        return tuple(convert.spec_from_proto(i, s) for i, s in enumerate(header.tensors))
    except errors.InvalidRequestError as exc:
        raise CorruptCheckpointError(f"restore header is malformed: {exc}") from exc


def _allocate_into(arrays: list[np.ndarray]) -> streams.Allocate:
    """An allocator for ``streams.receive`` that keeps each numpy array it makes."""

    def allocate(wire: pb.TensorSpec) -> np.ndarray:
        try:
            spec = convert.spec_from_proto(len(arrays), wire)
        except errors.InvalidRequestError as exc:
            raise streams.StreamError(f"restore header is malformed: {exc}") from exc
        array = np.empty(spec.shape, spec.dtype_info.numpy)
        arrays.append(array)
        return array.reshape(-1).view(np.uint8)

    return allocate
