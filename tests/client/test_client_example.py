"""Done-when of the client issue: a training loop checkpoints every few steps, is killed
with SIGKILL, restarts with --resume, gets the latest durable step back through the client
and trains on; the restored model and optimizer state match what was saved at that step
(bit for bit where stored exactly, within the codec's bound where lossy)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from ckptd.daemon.codec.scaled import fit_alpha
from ckptd.protos.segments import segment_owner
from ckptd.protos.v1 import pb, pb_grpc
from client_support import CheckpointerFactory, client_segments
from daemon_harness import DaemonProcess, wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"
SpawnDaemon = Callable[..., DaemonProcess]
RUN = "digits-crash"
EVERY = 5


def run_example(target: str, dump_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, str(EXAMPLE), "--target", target, "--run", RUN, "--every", str(EVERY),
        "--width", "4", "--dump-dir", str(dump_dir), *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def settled_steps(address: str, steps: list[int]) -> set[int]:
    """Waits until the daemon finished every step the dead trainer handed over; returns
    the durable ones (a step it never accepted is simply unknown to it)."""
    durable = set()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CheckpointdServiceStub(channel)
        for step in steps:
            ref = pb.StepRef(run=RUN, rank=0, step=step)
            try:
                request = pb.WaitSaveRequest(ref=ref, timeout_s=120)
                status = stub.WaitSave(request, timeout=180).status
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                continue
            assert status.state in (pb.SAVE_STATE_DURABLE, pb.SAVE_STATE_FAILED), status
            if status.state == pb.SAVE_STATE_DURABLE:
                durable.add(step)
    return durable


def leaves(state: Any, path: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for key, value in state.items():
            out.update(leaves(value, f"{path}/{key}"))
        return out
    if isinstance(state, list | tuple):
        out = {}
        for i, value in enumerate(state):
            out.update(leaves(value, f"{path}/{i}"))
        return out
    return {path: state}


@pytest.mark.slow
@pytest.mark.parametrize("snapshot", ["copy", "overlap"])
def test_killed_trainer_resumes_from_the_latest_durable_step(
    tmp_path: Path,
    spawn_daemon: SpawnDaemon,
    make_checkpointer: CheckpointerFactory,
    snapshot: str,
) -> None:
    # On its unix socket: the only connection on which the daemon serves shared memory.
    daemon = spawn_daemon(tmp_path / "storage", "--listen", f"unix://{tmp_path}/ckptd.sock")
    dumps = tmp_path / "dumps"

    crashed = run_example(
        daemon.address, dumps, "--steps", "40", "--kill-at", "22", "--snapshot", snapshot
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert "killing this process at step 22" in crashed.stdout
    assert "transport shm" in crashed.stdout  # same host: the snapshot went through /dev/shm
    handed_over = [5, 10, 15, 20]
    assert sorted(int(p.stem.split("-")[1]) for p in dumps.glob("saved-*.pt")) == handed_over

    # With two staging buffers, the save at step 20 could only snapshot once step 10's
    # buffer was accepted, so the daemon holds at least steps 5 and 10.
    durable = settled_steps(daemon.address, handed_over)
    assert {5, 10} <= durable
    latest = max(durable)

    # The dead trainer's resource tracker unlinks its shared memory.
    pid = _pid_of(crashed)
    wait_until(
        lambda: all(segment_owner(name) != pid for name in client_segments()),
        timeout_s=30,
        what=f"the killed trainer's (pid {pid}) segments to be unlinked",
    )

    resumed = run_example(
        daemon.address, dumps, "--steps", "40", "--resume", "--snapshot", snapshot
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {latest} " in resumed.stdout
    done = re.search(r"done: step 40, .*latest durable step (\d+)", resumed.stdout)
    assert done is not None and int(done.group(1)) == 40, resumed.stdout

    saved = torch.load(dumps / f"saved-{latest}.pt", weights_only=True)
    restored = torch.load(dumps / f"restored-{latest}.pt", weights_only=True)
    assert restored["step"] == latest and restored["loss"] == saved["loss"]
    assert restored["optim"]["param_groups"] == saved["optim"]["param_groups"]
    check_within_codec_bound(make_checkpointer, daemon.address, latest, saved, restored)


def _pid_of(process: subprocess.CompletedProcess[str]) -> int:
    match = re.search(r"pid (\d+)", process.stdout)
    assert match is not None, process.stdout
    return int(match.group(1))


def check_within_codec_bound(
    make_checkpointer: CheckpointerFactory,
    address: str,
    step: int,
    saved: dict[str, Any],
    restored: dict[str, Any],
) -> None:
    """Every tensor is bit-exact, or — stored as a lossy delta against its parent step's
    reconstruction ``p`` — within the codec's bound ``|restored - saved| <= |saved - p|``:
    on the values, or for Adam's ``exp_avg_sq`` (lossy-log by default) on the float32 bit
    patterns, the log scale its delta is taken on; for Adam's ``exp_avg`` (lossy-scaled by
    default) against ``alpha * p``, ``alpha`` the codec's own fit."""
    ckpt = make_checkpointer(address, RUN)
    info = {i.step: i for i in ckpt.step_infos()}[step]
    parent = leaves(ckpt.restore(info.parent_step)) if info.parent_step is not None else {}
    want, got = leaves(saved), leaves(restored)
    assert sorted(want) == sorted(got)
    lossy = 0
    for name, tensor in want.items():
        if not isinstance(tensor, torch.Tensor):
            assert got[name] == tensor, name
            continue
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        if torch.equal(got[name], tensor):
            continue
        assert tensor.is_floating_point() and name in parent, f"{name} differs and is not lossy"
        if name.endswith("exp_avg_sq"):
            assert not bool(torch.signbit(got[name]).any()), f"{name} restored negative"
            patterns = [x.view(torch.int32).long() for x in (got[name], tensor, parent[name])]
            error, step = (patterns[0] - patterns[1]).abs(), (patterns[1] - patterns[2]).abs()
            assert bool((error <= step + step // 2**23 + 1).all()), f"{name} beyond the bound"
        else:
            reference = parent[name]
            if name.endswith("exp_avg"):
                alpha = float(fit_alpha(tensor.numpy().ravel(), reference.numpy().ravel(),
                                        "float32"))
                reference = reference * alpha
            bound = ((tensor - reference).abs() + 1e-6 * (tensor.abs() + reference.abs())
                     + 1e-30)
            error = (got[name] - tensor).abs()
            assert bool((error <= bound).all()), f"{name} beyond the codec bound"
        lossy += 1
    assert lossy > 0 or info.kind == "base", "a delta step restored every tensor exactly"
