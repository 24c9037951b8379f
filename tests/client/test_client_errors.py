"""Every gRPC status code maps to one documented client exception, at one choke point."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from ckptd.client import Checkpointer, errors
from ckptd.client.errors import (
    CkptdClientError,
    DaemonUnavailableError,
    error_class_for,
    map_rpc_error,
)
from ckptd.client.grpc_transport import Connection
from ckptd.protos.v1 import pb, pb_grpc

EXPECTED: dict[str, type[CkptdClientError]] = {
    "CANCELLED": errors.RequestCancelledError,
    "UNKNOWN": errors.InternalDaemonError,
    "INVALID_ARGUMENT": errors.InvalidCheckpointError,
    "DEADLINE_EXCEEDED": errors.CkptdTimeoutError,
    "NOT_FOUND": errors.CheckpointNotFoundError,
    "ALREADY_EXISTS": errors.StepConflictError,
    "PERMISSION_DENIED": errors.PermissionDeniedError,
    "RESOURCE_EXHAUSTED": errors.GrpcLimitError,
    "FAILED_PRECONDITION": errors.StepConflictError,
    "ABORTED": errors.StepConflictError,
    "OUT_OF_RANGE": errors.InvalidCheckpointError,
    "UNIMPLEMENTED": errors.InternalDaemonError,
    "INTERNAL": errors.InternalDaemonError,
    "UNAVAILABLE": errors.DaemonUnavailableError,
    "DATA_LOSS": errors.CorruptCheckpointError,
    "UNAUTHENTICATED": errors.UnauthenticatedError,
}
BUILTIN_PARENTS = {
    errors.DaemonUnavailableError: ConnectionError,
    errors.CkptdTimeoutError: TimeoutError,
    errors.CheckpointNotFoundError: LookupError,
    errors.InvalidCheckpointError: ValueError,
    errors.CorruptCheckpointError: ValueError,
    errors.PermissionDeniedError: PermissionError,
}


class AbortingServicer(pb_grpc.CheckpointdServiceServicer):
    """Answers ListSteps with whatever status ``code`` is set to."""

    code = grpc.StatusCode.INTERNAL

    def ListSteps(
        self, request: pb.ListStepsRequest, context: grpc.ServicerContext
    ) -> pb.ListStepsResponse:
        context.abort(self.code, f"daemon details for {self.code.name}")
        raise AssertionError("abort returns by raising")


@pytest.fixture
def aborting_server() -> Iterator[tuple[AbortingServicer, str]]:
    servicer = AbortingServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CheckpointdServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_the_table_covers_every_status_code() -> None:
    non_ok = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]
    assert sorted(code.name for code in non_ok) == sorted(EXPECTED)
    for code in non_ok:
        assert error_class_for(code) is EXPECTED[code.name]


@pytest.mark.parametrize("code_name", sorted(EXPECTED))
def test_real_rpc_errors_map_with_the_daemons_details(
    aborting_server: tuple[AbortingServicer, str], code_name: str
) -> None:
    servicer, address = aborting_server
    servicer.code = grpc.StatusCode[code_name]
    connection = Connection(address, call_timeout_s=10, reconnect_timeout_s=0)  # no retry
    try:
        with pytest.raises(CkptdClientError) as info:
            connection.list_steps("r", 0)
    finally:
        connection.close()
    error = info.value
    assert type(error) is EXPECTED[code_name]
    assert error.code == code_name
    assert error.details == f"daemon details for {code_name}"
    assert f"daemon details for {code_name}" in str(error)
    assert code_name in str(error) and "list steps of run 'r' rank 0" in str(error)
    assert isinstance(error.__cause__, grpc.RpcError)  # raised `from` the gRPC error


@pytest.mark.parametrize(("cls", "builtin"), list(BUILTIN_PARENTS.items()))
def test_errors_refine_the_builtin_they_mean(cls: type, builtin: type) -> None:
    assert issubclass(cls, builtin) and issubclass(cls, CkptdClientError)


def test_every_class_in_the_tree_is_documented() -> None:
    for cls in {*EXPECTED.values(), errors.SaveFailedError, errors.SaveSkippedError}:
        assert cls.__doc__ and cls.__doc__.startswith("Raised when"), cls
        assert cls.__name__ in errors.__doc__


def test_an_rpc_error_without_a_status_is_internal() -> None:
    error = map_rpc_error(grpc.RpcError("boom"), "doing things")
    assert type(error) is errors.InternalDaemonError
    assert "doing things: boom" in str(error)


def test_unreachable_tcp_target_fails_fast_and_clearly() -> None:
    start = time.monotonic()
    with pytest.raises(DaemonUnavailableError, match=r"127\.0\.0\.1:1.*connect_timeout_s=1 s"):
        Checkpointer("127.0.0.1:1", run="r", connect_timeout_s=1.0)
    assert time.monotonic() - start < 30  # bounded, not a hang


def test_missing_unix_socket_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="no ckptd daemon answered"):
        Checkpointer(f"unix://{tmp_path / 'nothing.sock'}", run="r", connect_timeout_s=0.5)
