"""Server lifecycle: ready reporting, health, reflection, listen addresses, SIGTERM drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.protos.v1 import pb
from daemon_harness import InProcessDaemon, SpawnDaemon, start_in_process, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE = "ckptd.v1.CheckpointdService"


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return int(reply.status)


def test_health_reflection_and_server_info(daemon: InProcessDaemon) -> None:
    assert _health(daemon.address) == health_pb2.HealthCheckResponse.SERVING
    assert _health(daemon.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(daemon.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(reflect.ServerReflectionInfo(iter([request]), timeout=10))
        services = {s.name for s in replies[0].list_services_response.service}
        info = wire.stub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10).info
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    assert info.api_version == "ckptd.v1"
    assert info.max_chunk_bytes == 1 << 20
    assert info.storage_url.endswith(str(daemon.storage_path))


def test_unix_socket_in_process(tmp_path: Path) -> None:
    socket_path = tmp_path / "ckptd.sock"
    running = start_in_process(tmp_path / "storage", listen=f"unix://{socket_path}")
    try:
        assert running.address == f"unix://{socket_path}"
        with grpc.insecure_channel(running.address) as channel:
            client = wire.stub(channel)
            wire.save_durable(client, "unix", 1, {"w": np.arange(10, dtype=np.float32)})
            _, arrays = wire.restore(client, "unix")
        assert np.array_equal(arrays["w"], np.arange(10, dtype=np.float32))
    finally:
        running.stop()


def test_subprocess_ready_file_line_and_unix_listen(
    tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    socket_path = tmp_path / "d.sock"
    process = spawn_daemon(tmp_path / "storage", "--listen", f"unix://{socket_path}")
    assert process.address == f"unix://{socket_path}"
    assert process.info["pid"] == process.pid
    assert _health(process.address) == health_pb2.HealthCheckResponse.SERVING
    assert process.terminate() == 0
    first_line = process.log().splitlines()
    assert f"ckptd: serving on unix://{socket_path} (storage file://" in "\n".join(first_line)


def test_env_configures_the_subprocess(
    tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    env = {"CKPTD_BITS": "5", "CKPTD_BASE_INTERVAL": "7"}
    process = spawn_daemon(tmp_path / "storage", env=env)
    with grpc.insecure_channel(process.address) as channel:
        info = wire.stub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10).info
    assert (info.default_bits, info.base_interval) == (5, 7)
    assert process.terminate() == 0


def test_port_in_use_fails_with_exit_1(tmp_path: Path, daemon: InProcessDaemon) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ckptd.daemon.cli", "serve", "--storage", str(tmp_path / "s2"),
         "--listen", daemon.address],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on {daemon.address!r}" in result.stderr


def test_second_daemon_on_the_same_storage_fails_with_exit_1(
    tmp_path: Path, daemon: InProcessDaemon
) -> None:
    # Two daemons on one directory would overwrite each other's steps; the second one is
    # refused before it scans (and "cleans up") anything, and the first keeps serving.
    with grpc.insecure_channel(daemon.address) as channel:
        wire.save_durable(wire.stub(channel), "held", 1, {"w": np.ones(4096, np.float32)})
    # What a save in progress looks like on disk: blobs, no manifest yet. A start-up scan
    # would delete it as an uncommitted leftover.
    in_progress = tmp_path / "storage" / "runs" / "held" / "0" / f"{2:020d}" / "00000.blob"
    in_progress.parent.mkdir(parents=True)
    in_progress.write_bytes(b"being written")
    result = subprocess.run(
        [sys.executable, "-m", "ckptd.daemon.cli", "serve", "--storage", str(tmp_path / "storage"),
         "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot start: storage file://" in result.stderr
    assert "is in use by ckptd serve (pid " in result.stderr
    assert in_progress.read_bytes() == b"being written"
    assert _health(daemon.address) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow  # over 2 s: the full suite (--all) runs it
def test_sigterm_drains_accepted_saves_and_exits_0(
    tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    storage = tmp_path / "storage"
    process = spawn_daemon(storage)
    rng = np.random.default_rng(0)
    states = {step: {"w": rng.standard_normal(1 << 20).astype(np.float32)} for step in (1, 2, 3)}
    with grpc.insecure_channel(process.address) as channel:
        client = wire.stub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        for step, state in states.items():
            assert wire.save(client, "drain", step, state).state == pb.SAVE_STATE_ACCEPTED
        process.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    assert process.proc.wait(120) == 0
    assert "drained=True" in process.log()
    restarted = spawn_daemon(storage)
    with grpc.insecure_channel(restarted.address) as channel:
        client = wire.stub(channel)
        steps = client.ListSteps(pb.ListStepsRequest(run="drain"), timeout=10).steps
        assert [info.step for info in steps] == [1, 2, 3]
        for step in states:
            header, arrays = wire.restore(client, "drain", step)
            assert wire.received_checksum(header, arrays) == header.checksum
    assert restarted.terminate() == 0


def test_stop_finishes_open_streams_and_refuses_new_saves(tmp_path: Path) -> None:
    """The drain order, made deterministic by a save stream held open across the stop."""
    running = start_in_process(tmp_path / "storage")
    state = {"w": np.arange(1 << 18, dtype=np.float32)}
    release = threading.Event()

    def held_stream() -> Iterator[pb.SaveRequest]:
        requests = wire.save_requests("held", 1, state)
        yield next(requests)  # the header: the session opens and reserves its bytes
        release.wait(60)
        yield from requests

    with grpc.insecure_channel(running.address) as channel:
        client = wire.stub(channel)
        pending = client.Save.future(held_stream(), timeout=120)
        wait_until(lambda: running.call(lambda engine: engine.inflight_bytes) > 0, what="session")
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=running.stop)
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        late = wire.rpc_error(lambda: wire.save(client, "late", 1, state))
        assert late.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in late.details()
        release.set()
        assert pending.result().status.state == pb.SAVE_STATE_ACCEPTED
        stopper.join(120)
    assert not stopper.is_alive()
    restarted = start_in_process(tmp_path / "storage")
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            header, arrays = wire.restore(wire.stub(channel), "held", 1)
        assert header.ref.step == 1
        assert np.array_equal(arrays["w"], state["w"])
    finally:
        restarted.stop()
