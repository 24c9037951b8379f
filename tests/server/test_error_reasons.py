"""Every ``ErrorReason`` of the proto crosses the real wire and lands in the right place.

The reasons are read from the generated enum descriptor, so a reason added to the .proto
without a daemon class, a client class and a CLI exit code fails here. Each is sent by a
real in-process daemon through the real ``status.py`` mapping (the engine's ``list_steps``
is made to raise the daemon error of that reason), then read by the trainer-side client
and by ``ckptd ls``. A second test provokes the reasons a request can cause for real.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.client import errors as client_errors
from ckptd.client.grpc_transport import Connection
from ckptd.daemon import errors
from ckptd.daemon.cli.app import main as cli_main
from ckptd.daemon.cli.commands import EXIT_FAILED, EXIT_TEMPFAIL, EXIT_UNAVAILABLE
from ckptd.protos.status import ERROR_DOMAIN, reason_of
from ckptd.protos.v1 import pb
from daemon_harness import InProcessDaemon, start_in_process

REASONS = [value.name for value in pb.ErrorReason.DESCRIPTOR.values
           if value.number != pb.ERROR_REASON_UNSPECIFIED]

# What a client sees for each reason, and what `ckptd` exits with.
EXPECTED: dict[str, tuple[type[client_errors.CkptdClientError], int]] = {
    "ERROR_REASON_INVALID_REQUEST": (client_errors.InvalidCheckpointError, EXIT_FAILED),
    "ERROR_REASON_INCOMPLETE_STREAM": (client_errors.InvalidCheckpointError, EXIT_FAILED),
    "ERROR_REASON_RUN_NOT_FOUND": (client_errors.CheckpointNotFoundError, EXIT_FAILED),
    "ERROR_REASON_STEP_NOT_FOUND": (client_errors.CheckpointNotFoundError, EXIT_FAILED),
    "ERROR_REASON_STEP_EXISTS": (client_errors.StepConflictError, EXIT_FAILED),
    "ERROR_REASON_STEP_ORDER": (client_errors.StepConflictError, EXIT_FAILED),
    "ERROR_REASON_BUSY": (client_errors.DaemonBusyError, EXIT_TEMPFAIL),
    "ERROR_REASON_SHUTTING_DOWN": (client_errors.DaemonUnavailableError, EXIT_UNAVAILABLE),
    "ERROR_REASON_CORRUPT_CHECKPOINT": (client_errors.CorruptCheckpointError, EXIT_FAILED),
    "ERROR_REASON_DATA_MISSING": (client_errors.CorruptCheckpointError, EXIT_FAILED),
    "ERROR_REASON_STORAGE_IN_USE": (client_errors.StorageInUseError, EXIT_FAILED),
    "ERROR_REASON_CHAIN_LEASED": (client_errors.ChainLeasedError, EXIT_FAILED),
    "ERROR_REASON_STORAGE_FULL": (client_errors.StorageFullError, EXIT_FAILED),
    "ERROR_REASON_STORAGE_UNAVAILABLE": (client_errors.DaemonUnavailableError, EXIT_UNAVAILABLE),
    "ERROR_REASON_SHARED_MEMORY_REFUSED": (client_errors.SharedMemoryRefusedError, EXIT_FAILED),
    "ERROR_REASON_INTERNAL": (client_errors.InternalDaemonError, EXIT_FAILED),
    "ERROR_REASON_UNAUTHENTICATED": (client_errors.UnauthenticatedError, EXIT_FAILED),
    "ERROR_REASON_PERMISSION_DENIED": (client_errors.PermissionDeniedError, EXIT_FAILED),
    "ERROR_REASON_STREAM_IDLE": (client_errors.StreamIdleError, EXIT_TEMPFAIL),
    "ERROR_REASON_STEP_INCOMPLETE": (client_errors.StepIncompleteError, EXIT_FAILED),
}


def _daemon_classes() -> dict[str, type[errors.CkptdError]]:
    """The daemon's own error classes (this module's tree) by the reason each declares."""
    by_reason: dict[str, type[errors.CkptdError]] = {}
    pending: list[type[errors.CkptdError]] = [errors.CkptdError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__ == errors.__name__ and cls.reason not in by_reason:
            by_reason[cls.reason] = cls
    return by_reason


def test_every_reason_has_one_daemon_class_and_every_class_a_known_reason() -> None:
    classes = _daemon_classes()
    assert sorted(classes) == sorted(REASONS)
    declared = [cls.reason for cls in classes.values()]
    assert len(declared) == len(set(declared)), "two classes share a reason"


def test_every_reason_has_a_client_class() -> None:
    assert sorted(EXPECTED) == sorted(REASONS)
    for reason, (cls, _) in EXPECTED.items():
        for code in grpc.StatusCode:
            assert client_errors.error_class_for(code, reason) is cls


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessDaemon]:
    running = start_in_process(tmp_path_factory.mktemp("reasons") / "storage")
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("reason", REASONS)
def test_each_reason_reaches_the_client_and_the_cli(
    daemon: InProcessDaemon, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_class = _daemon_classes()[reason]
    message = f"injected {daemon_class.__name__} for run 'job'"

    def fail(run: str, rank: int) -> list[object]:
        raise daemon_class(message)

    daemon.call(lambda engine: setattr(engine, "list_steps", fail))
    try:
        # Deadlines no loaded machine reaches: the test checks where a reason lands, and a
        # DEADLINE_EXCEEDED of a starved in-process daemon would land elsewhere. No retry, so
        # the reason is the first answer's.
        connection = Connection(daemon.address, call_timeout_s=60, reconnect_timeout_s=0)
        try:
            with pytest.raises(client_errors.CkptdClientError) as info:
                connection.list_steps("job", 3)
        finally:
            connection.close()
        code = cli_main(["ls", "job", "--target", daemon.address, "--timeout-s", "60"],
                        environ={})
    finally:
        daemon.call(lambda engine: vars(engine).pop("list_steps"))
    client_class, exit_code = EXPECTED[reason]
    error = info.value
    assert type(error) is client_class
    assert (error.reason, error.details) == (reason, message)
    assert message in str(error) and reason in str(error)
    out, err = capsys.readouterr()
    assert (code, out) == (exit_code, "")
    assert err.startswith("ckptd: error: ") and message in err and reason in err


def _save(client: object, step: int, *, chunks: bool = True) -> None:
    state = {"w": np.arange(8, dtype=np.float32)}
    requests = [pb.SaveRequest(header=wire.header_of("real", step, state, rank=1))]
    if chunks:
        requests += list(wire.chunks_of(state))
    client.Save(iter(requests), timeout=30)  # type: ignore[attr-defined]


def test_reasons_provoked_for_real_name_the_request(tmp_path: Path) -> None:
    running = start_in_process(tmp_path / "storage")
    try:
        with grpc.insecure_channel(running.address) as channel:
            client = wire.stub(channel)
            wire.save_durable(client, "real", 5, {"w": np.arange(8, dtype=np.float32)}, rank=1)
            cases = {
                "ERROR_REASON_RUN_NOT_FOUND": lambda: client.ListSteps(
                    pb.ListStepsRequest(run="nope", rank=0), timeout=30),
                "ERROR_REASON_INVALID_REQUEST": lambda: client.ListSteps(
                    pb.ListStepsRequest(run="../x", rank=0), timeout=30),
                "ERROR_REASON_STEP_NOT_FOUND": lambda: list(client.Restore(
                    pb.RestoreRequest(run="real", rank=1, step=99), timeout=30)),
                "ERROR_REASON_STEP_EXISTS": lambda: _save(client, 5),
                "ERROR_REASON_STEP_ORDER": lambda: _save(client, 4),
                "ERROR_REASON_INCOMPLETE_STREAM": lambda: _save(client, 6, chunks=False),
            }
            for reason, call in cases.items():
                wire_error = reason_of(wire.rpc_error(call))
                assert wire_error.reason == reason, (reason, wire_error)
                assert wire_error.metadata.get("run") in ("nope", "../x", "real"), wire_error
    finally:
        running.stop()


def test_a_status_from_grpc_itself_has_no_reason() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        error = wire.rpc_error(lambda: wire.stub(channel).ListRuns(
            pb.ListRunsRequest(), timeout=5))
    decoded = reason_of(error)
    assert (decoded.code, decoded.reason) == (grpc.StatusCode.UNAVAILABLE, "")
    assert ERROR_DOMAIN == "ckptd.v1"
