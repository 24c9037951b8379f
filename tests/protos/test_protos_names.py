"""The one rule for run names and daemon targets, shared by the client, daemon and CLI."""

from __future__ import annotations

import pytest
from ckptd.protos.names import normalize_target, run_name_problem


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:50051", "[::1]:50051"),
        (":50051", "127.0.0.1:50051"),
        ("10.0.0.7:50051", "10.0.0.7:50051"),
        ("localhost:7", "localhost:7"),
        (" 10.0.0.7:50051 ", "10.0.0.7:50051"),
        ("unix:///run/ckptd/ckptd.sock", "unix:///run/ckptd/ckptd.sock"),
        ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
        ("/run/ckptd/ckptd.sock", "unix:/run/ckptd/ckptd.sock"),
    ],
)
def test_targets_become_what_grpc_dials(address: str, target: str) -> None:
    assert normalize_target(address) == target


@pytest.mark.parametrize("address", ["", "   ", None, 5])
def test_an_empty_target_is_refused_with_the_accepted_forms(address: object) -> None:
    with pytest.raises(ValueError, match=r"'host:port' or 'unix:///path/to/socket'"):
        normalize_target(address)  # type: ignore[arg-type]


@pytest.mark.parametrize("run", ["r", "resnet-50_v1.2", "_x", "-x", "a" * 128])
def test_valid_run_names(run: str) -> None:
    assert run_name_problem(run) is None


@pytest.mark.parametrize("run", ["", ".hidden", "a/b", "a b", "é", "a" * 129, None, 3])
def test_invalid_run_names_say_the_rule(run: object) -> None:
    problem = run_name_problem(run)
    assert problem is not None
    # A long name is shown by its first 64 characters (a 10 kB name makes a short message).
    shown = repr(run[:64]) if isinstance(run, str) else repr(run)
    assert shown in problem and "[A-Za-z0-9._-]" in problem
    assert len(problem) < 200
