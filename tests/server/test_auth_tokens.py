"""Bearer tokens against a real daemon: who gets in, what each scope allows, what is counted.

The daemon listens on loopback with ``--auth-tokens`` and ``--auth-policy``; each test is
an attack (no token, a wrong token, a reader writing, a writer deleting) or the legitimate
path, and checks the status, the client's class, and that storage did not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from auth_support import policy_file, tokens_file
from ckptd.client import Checkpointer, PermissionDeniedError, UnauthenticatedError
from ckptd.daemon.server.healthcheck import check
from ckptd.protos.v1 import pb
from daemon_harness import InProcessDaemon, start_in_process
from daemon_wire import restore, rpc_error, save, save_durable, stub

WRITER, READER = "tok-writer-0123456789", "tok-reader-0123456789"
STATE = {"w": np.arange(16, dtype=np.float32)}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    tokens = tokens_file(tmp_path / "tokens", {WRITER: "trainer-a", READER: "auditor"})
    policy = policy_file(tmp_path / "policy.json",
                         ("trainer-a", ["team-a-*"], ["read", "write"]),
                         ("auditor", ["*"], ["read"]))
    running = start_in_process(tmp_path / "storage", auth_tokens=str(tokens),
                               auth_policy=str(policy))
    try:
        with grpc.insecure_channel(running.address) as channel:
            save_durable(stub(channel), "team-a-run", 1, STATE, metadata=_bearer(WRITER))
        yield running
    finally:
        running.stop()


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _denied(daemon: InProcessDaemon, reason: str) -> float:
    value = daemon.running.metrics.registry.get_sample_value("ckptd_auth_denied_total",
                                                     {"reason": reason})
    return value or 0.0


@pytest.mark.parametrize("metadata", [(), _bearer("not-a-token")], ids=["none", "unknown"])
def test_an_unauthenticated_client_can_neither_list_restore_save_nor_delete(
    daemon: InProcessDaemon, metadata: tuple[tuple[str, str], ...]
) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        client = stub(channel)
        attacks = {
            "list runs": lambda: client.ListRuns(pb.ListRunsRequest(), metadata=metadata),
            "list steps": lambda: client.ListSteps(
                pb.ListStepsRequest(run="team-a-run"), metadata=metadata),
            "restore": lambda: list(client.Restore(
                pb.RestoreRequest(run="team-a-run"), metadata=metadata)),
            "inject a step": lambda: save(client, "team-a-run", 2, {"w": np.zeros(16, np.float32)},
                                          metadata=metadata),
            "delete a step": lambda: client.DeleteStep(pb.DeleteStepRequest(
                ref=pb.StepRef(run="team-a-run", step=1)), metadata=metadata),
            "delete the run": lambda: client.DeleteRun(
                pb.DeleteRunRequest(run="team-a-run"), metadata=metadata),
            "server info": lambda: client.GetServerInfo(pb.GetServerInfoRequest(),
                                                        metadata=metadata),
        }
        for what, attack in attacks.items():
            code = rpc_error(attack).code()
            assert code is grpc.StatusCode.UNAUTHENTICATED, (what, code)
        # Nothing changed: the owner still restores exactly step 1, the only step.
        _, arrays = restore(client, "team-a-run", metadata=_bearer(WRITER))
        steps = client.ListSteps(pb.ListStepsRequest(run="team-a-run"), metadata=_bearer(WRITER))
    assert [s.step for s in steps.steps] == [1] and np.array_equal(arrays["w"], STATE["w"])
    assert _denied(daemon, "unauthenticated") >= len(attacks)


def test_a_reader_cannot_write_or_delete_and_the_refusal_names_scope_and_run(
    daemon: InProcessDaemon,
) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        client = stub(channel)
        error = rpc_error(lambda: save(client, "team-a-run", 2, STATE, metadata=_bearer(READER)))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "'write'" in error.details() and "'team-a-run'" in error.details()
        error = rpc_error(lambda: client.DeleteRun(pb.DeleteRunRequest(run="team-a-run"),
                                                   metadata=_bearer(READER)))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED and "'delete'" in error.details()
        steps = client.ListSteps(pb.ListStepsRequest(run="team-a-run"), metadata=_bearer(READER))
    assert [s.step for s in steps.steps] == [1]
    assert _denied(daemon, "permission_denied") == 2


def test_a_writer_is_confined_to_its_runs_and_lists_only_them(daemon: InProcessDaemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        client = stub(channel)
        error = rpc_error(lambda: save(client, "team-b-run", 1, STATE, metadata=_bearer(WRITER)))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        mine = client.ListRuns(pb.ListRunsRequest(), metadata=_bearer(WRITER))
        everything = client.ListRuns(pb.ListRunsRequest(), metadata=_bearer(READER))
    assert [r.run for r in mine.runs] == ["team-a-run"]
    assert [r.run for r in everything.runs] == ["team-a-run"]


def test_the_checkpointer_authenticates_with_token_or_ckptd_token(
    daemon: InProcessDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"w": torch.arange(16, dtype=torch.float32)}
    with Checkpointer(daemon.address, "team-a-run", token=WRITER, transport="grpc") as ckpt:
        ckpt.save(2, state).wait_durable(60)
    monkeypatch.setenv("CKPTD_TOKEN", READER)
    with Checkpointer(daemon.address, "team-a-run", transport="grpc") as ckpt:
        assert torch.equal(ckpt.restore()["w"], state["w"])
    monkeypatch.delenv("CKPTD_TOKEN")
    with pytest.raises(UnauthenticatedError):
        Checkpointer(daemon.address, "team-a-run", transport="grpc", connect_timeout_s=5)
    with Checkpointer(daemon.address, "team-a-run", token=READER, transport="grpc") as ckpt, \
            pytest.raises(PermissionDeniedError):
        ckpt.delete_step(2)


def test_health_answers_probes_without_credentials(daemon: InProcessDaemon) -> None:
    assert check(daemon.address, timeout_s=60) == "SERVING"  # what it answers, not how fast
