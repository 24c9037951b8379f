"""Fills a small file system with saves, then frees it by deleting; run by
``test_daemon_full_disk.py`` inside a private mount namespace over a 4 MiB tmpfs.

Usage: ``python full_disk_scenario.py MOUNTPOINT``. Exits 0 when every check holds; an
``AssertionError`` (non-zero exit, traceback on stderr) names the one that did not.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
from ckptd.daemon.cli.app import main as ckptd
from ckptd.daemon.config import EngineConfig
from ckptd.protos.status import reason_of
from ckptd.protos.v1 import pb
from daemon_harness import start_in_process

RUN = "full"
# Segments of three steps (base, delta, delta): deleting a segment newest first rewrites
# nothing, deleting a segment's base alone must rewrite its first delta.
ENGINE = EngineConfig(base_interval=3, max_delta_fraction=100.0)


def arrays(step: int) -> dict[str, np.ndarray]:
    """Lossy floats plus incompressible integers, stored exactly even in a delta."""
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(64 * 1024).astype(np.float32),
            "noise": rng.integers(0, 2**62, 24 * 1024, dtype=np.int64)}


def save(client: wire.pb_grpc.CheckpointdStub, step: int) -> pb.SaveStatus:
    accepted = wire.save(client, RUN, step, arrays(step))
    assert accepted.state == pb.SAVE_STATE_ACCEPTED, accepted
    return wire.wait(client, RUN, step)


def steps(client: wire.pb_grpc.CheckpointdStub) -> list[int]:
    reply = client.ListSteps(pb.ListStepsRequest(run=RUN, rank=0))
    return [s.step for s in reply.steps]


def fill(storage: Path) -> int:
    """Saves until one fails for lack of space; returns the failed step."""
    daemon = start_in_process(storage, engine=ENGINE)
    try:
        with grpc.insecure_channel(daemon.address) as channel:
            client = wire.stub(channel)
            for step in range(1, 100):
                done = save(client, step)
                if done.state == pb.SAVE_STATE_FAILED:
                    assert "No space left on device" in done.error, done.error
                    assert done.error.startswith("StorageFullError"), done.error
                    break
            else:
                raise AssertionError("100 saves fit in a 4 MiB file system")
            assert steps(client) == list(range(1, step)), steps(client)
            # The oldest step is a base with a delta on it: deleting it alone must rewrite
            # that delta, which does not fit. Refused before anything is written or lost.
            try:
                client.DeleteStep(pb.DeleteStepRequest(ref=pb.StepRef(run=RUN, rank=0, step=1)))
            except grpc.RpcError as exc:
                message = exc.details() or ""
                wire_error = reason_of(exc)
                assert wire_error.code is grpc.StatusCode.RESOURCE_EXHAUSTED, wire_error
                assert wire_error.reason == "ERROR_REASON_STORAGE_FULL", wire_error
            else:
                raise AssertionError("deleting the base on a full disk succeeded")
            expected = "cannot delete step full/rank0/step1: step 2 is a delta on it"
            assert expected in message, message
            assert "--with-dependants" in message and "steps [3, 2, 1]" in message, message
            assert steps(client) == list(range(1, step))
            # The newest step has no dependant: deleting it works on the full disk.
            client.DeleteStep(pb.DeleteStepRequest(ref=pb.StepRef(run=RUN, rank=0, step=step - 1)))
            assert steps(client) == list(range(1, step - 1))
            return step
    finally:
        daemon.stop()


def free_and_save_again(storage: Path, failed: int) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ckptd(["rm", RUN, "--step", "1", "--with-dependants", "--storage", str(storage),
                      "--yes"], environ={})
    assert code == 0 and "deleted step full/rank0/step1" in out.getvalue(), out.getvalue()
    daemon = start_in_process(storage, engine=ENGINE)
    try:
        with grpc.insecure_channel(daemon.address) as channel:
            client = wire.stub(channel)
            assert steps(client)[0] == 4, steps(client)
            done = save(client, failed)
            assert done.state == pb.SAVE_STATE_DURABLE, done
            header, restored = wire.restore(client, RUN, failed)
            assert wire.received_checksum(header, restored) == header.checksum
    finally:
        daemon.stop()


def main(mountpoint: Path) -> None:
    storage = mountpoint / "storage"
    failed = fill(storage)
    free_and_save_again(storage, failed)
    print(f"full disk scenario passed: step {failed} failed for space, then saved")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
