"""TLS and mTLS against a real daemon, with certificates made by a throwaway CA.

The identity of an mTLS client is its certificate's subject CN (no SAN here); the policy
grants ``trainer-a`` read and write. A certificate from another CA fails the handshake; a
certificate the CA signed for an identity without grants is PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from auth_support import Authority, policy_file
from ckptd.client import (
    Checkpointer,
    DaemonUnavailableError,
    PermissionDeniedError,
    TlsFiles,
)
from ckptd.daemon.server.healthcheck import main as healthcheck
from daemon_harness import InProcessDaemon, start_in_process


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def daemon(tmp_path: Path, ca: Authority) -> Iterator[InProcessDaemon]:
    server = ca.issue("ckptd-server", server=True)
    policy = policy_file(tmp_path / "policy.json", ("trainer-a", ["*"], ["read", "write"]))
    running = start_in_process(
        tmp_path / "storage", tls_cert=str(server.cert), tls_key=str(server.key),
        tls_client_ca=str(ca.pem.cert), auth_policy=str(policy))
    try:
        yield running
    finally:
        running.stop()


def _files(ca: Authority, cn: str) -> TlsFiles:
    pem = ca.issue(cn)
    return TlsFiles(ca=str(ca.pem.cert), cert=str(pem.cert), key=str(pem.key))


def test_a_client_certificate_of_a_granted_identity_saves_and_restores(
    daemon: InProcessDaemon, ca: Authority
) -> None:
    state = {"w": torch.arange(32, dtype=torch.float32)}
    tls = _files(ca, "trainer-a")
    with Checkpointer(daemon.address, "run-a", tls=tls, transport="grpc") as ckpt:
        ckpt.save(1, state).wait_durable(60)
        assert torch.equal(ckpt.restore()["w"], state["w"])


def test_a_signed_certificate_without_grants_is_denied(
    daemon: InProcessDaemon, ca: Authority
) -> None:
    state = {"w": torch.arange(32, dtype=torch.float32)}
    with Checkpointer(daemon.address, "run-a", tls=_files(ca, "mallory"),
                      transport="grpc") as ckpt:
        with pytest.raises(PermissionDeniedError, match="'mallory' has no 'read' scope"):
            ckpt.restore()
        handle = ckpt.save(1, state)
        with pytest.raises(PermissionDeniedError, match="'write'"):
            handle.wait_durable(60)


@pytest.mark.slow  # waits out three failed handshakes
def test_no_certificate_or_a_foreign_ca_never_gets_a_connection(
    daemon: InProcessDaemon, ca: Authority, tmp_path: Path
) -> None:
    # gRPC Python can only require client certificates under mTLS: the handshake fails.
    with pytest.raises(DaemonUnavailableError):
        Checkpointer(daemon.address, "run-a", tls=str(ca.pem.cert), connect_timeout_s=2)
    foreign = Authority(tmp_path, "foreign CA")
    pem = foreign.issue("trainer-a")
    tls = TlsFiles(ca=str(ca.pem.cert), cert=str(pem.cert), key=str(pem.key))
    with pytest.raises(DaemonUnavailableError):
        Checkpointer(daemon.address, "run-a", tls=tls, connect_timeout_s=2)
    # Plaintext to a TLS port gets nothing either.
    with grpc.insecure_channel(daemon.address) as channel, \
            pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=1)


def test_the_health_probe_speaks_tls(daemon: InProcessDaemon, ca: Authority) -> None:
    probe = ca.issue("probe")
    args = [daemon.address, "--tls-ca", str(ca.pem.cert), "--tls-cert", str(probe.cert),
            "--tls-key", str(probe.key), "--timeout-s", "60"]  # what it answers, not how fast
    assert healthcheck(args, environ={}) == 0
