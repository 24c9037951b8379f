"""The container/probe health check against a real gRPC health service."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from ckptd.daemon.server.healthcheck import main
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "ckptd.v1.CheckpointdService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Capture = pytest.CaptureFixture[str]
# These tests check what a probe answers, not how fast: a deadline no loaded machine
# reaches (the probe's 3 s default suits a container runtime, not a test run at load 10).
PATIENT = ["--timeout-s", "60"]


class HealthServer:
    """A gRPC server holding only the standard health service, like the daemon's."""

    def __init__(self, address: str) -> None:
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(address)
        self.server.start()

    def set(self, service: str, status: int) -> None:
        self.servicer.set(service, status)

    def close(self) -> None:
        self.server.stop(grace=None).wait()


@pytest.fixture
def tcp_server() -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1:0")
    yield server
    server.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "ckptd.sock"


def test_serving_server_exits_0(tcp_server: HealthServer, capsys: Capture) -> None:
    tcp_server.set("", SERVING)
    assert main([f"127.0.0.1:{tcp_server.port}", *PATIENT]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_draining_server_exits_1_naming_the_status(
    tcp_server: HealthServer, capsys: Capture
) -> None:
    tcp_server.set("", NOT_SERVING)
    assert main([f"127.0.0.1:{tcp_server.port}", *PATIENT]) == 1
    assert "is NOT_SERVING" in capsys.readouterr().err


def test_named_service_is_checked(tcp_server: HealthServer, capsys: Capture) -> None:
    tcp_server.set("", SERVING)
    target = f"127.0.0.1:{tcp_server.port}"
    assert main([target, "--service", SERVICE, *PATIENT]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    tcp_server.set(SERVICE, SERVING)
    assert main([target, "--service", SERVICE, *PATIENT]) == 0


def test_target_defaults_to_the_listen_address_in_the_environment(
    tcp_server: HealthServer,
) -> None:
    tcp_server.set("", SERVING)
    assert main(PATIENT, environ={"CKPTD_LISTEN": f"0.0.0.0:{tcp_server.port}"}) == 0


def _probe_of_a_serving_server(target: str) -> int:
    """The probe's exit code against a server started at ``target`` that is SERVING."""
    server = HealthServer(target)
    try:
        server.set("", SERVING)
        return main([target, *PATIENT])
    finally:
        server.close()


def test_unix_socket_and_missing_daemon(socket_path: Path, capsys: Capture) -> None:
    target = f"unix://{socket_path}"
    assert main([target, *PATIENT]) == 1  # refused at once: no wait
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert _probe_of_a_serving_server(target) == 0


def test_a_probe_connects_afresh_after_a_failed_one(socket_path: Path) -> None:
    """gRPC shares a connection per target between a process's channels; one that failed
    answers UNAVAILABLE at once until its reconnect backoff ends. A probe made while an
    earlier channel still held the failed connection (closing one lets go of it in the
    background) reported a serving daemon UNAVAILABLE: the unix socket test above failed
    under load. Here the earlier channel is held open, so the sharing is certain."""
    target = f"unix://{socket_path}"
    with grpc.insecure_channel(target) as earlier:
        with pytest.raises(grpc.RpcError) as failed:
            health_pb2_grpc.HealthStub(earlier).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert _probe_of_a_serving_server(target) == 0


def test_runs_as_a_module_the_way_the_image_runs_it(tcp_server: HealthServer) -> None:
    tcp_server.set("", SERVING)
    module = "ckptd.daemon.server.healthcheck"
    command = [sys.executable, "-m", module, f"127.0.0.1:{tcp_server.port}", *PATIENT]

    def exit_code() -> int:
        return subprocess.run(command, check=False, capture_output=True, timeout=120).returncode

    assert exit_code() == 0
    tcp_server.set("", NOT_SERVING)
    assert exit_code() == 1

