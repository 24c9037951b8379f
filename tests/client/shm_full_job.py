"""A trainer and its daemon on a /dev/shm too small for the checkpoint (Docker's default is
64 MB). Run by ``test_client_shm_full.py`` inside its own user and mount namespace, whose
/dev/shm is a private tmpfs of ``--shm-bytes`` (the host's /dev/shm is never filled).

Prints one JSON object: what each scenario ended with (an exception's class and message,
the transport, whether the restored state matched). A SIGBUS kills the process instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: daemon_harness

from ckptd.client import Checkpointer, restore, shm
from ckptd.client.restore import RETRY_EVERY_RESTORES
from ckptd.client.worker import RETRY_EVERY_SAVES
from daemon_harness import start_in_process


class CountedSegment(restore.RestoreSegment):
    """A restore segment that counts its creations: each is one ask for shared memory."""

    created = 0

    def __init__(self) -> None:
        CountedSegment.created += 1
        super().__init__()


class CountedBuffer(shm.ShmBuffer):
    """A staging segment that counts its creations (those refused for room too)."""

    created = 0

    def __init__(self, capacity: int, *, pinned: bool = False) -> None:
        CountedBuffer.created += 1
        super().__init__(capacity, pinned=pinned)


restore.RestoreSegment = CountedSegment  # type: ignore[misc]
shm.ShmBuffer = CountedBuffer  # type: ignore[misc]


def asked(do: Any, counted: type[CountedSegment | CountedBuffer] = CountedSegment,
          ) -> tuple[Any, int]:
    """``do()`` and how many restore (or staging) segments it created."""
    before = counted.created
    result = do()
    return result, counted.created - before


def fill_shm_but(nbytes: int) -> Path:
    """A file in this namespace's private /dev/shm that leaves ``nbytes`` free in it."""
    fs = os.statvfs("/dev/shm")
    filler = Path("/dev/shm/filler")
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, fs.f_bavail * fs.f_frsize - nbytes)
    finally:
        os.close(fd)
    return filler


class Warnings(logging.Handler):
    """Collects the client's warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def state(nbytes: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(nbytes // 4, generator=generator),
            "step": torch.tensor(seed, dtype=torch.int64)}


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def failure(exc: BaseException) -> dict[str, str]:
    return {"error": type(exc).__name__, "message": str(exc)}


def save_room(address: str, small: int) -> dict[str, Any]:
    """/dev/shm full at the first save (a transient filler): saves stream with one warning,
    try a staging segment on every RETRY_EVERY_SAVES-th save, and go back to shared memory
    at the first save once the room is there (before: streamed for good)."""
    out: dict[str, Any] = {"save_room": []}
    warnings = Warnings()
    logging.getLogger("ckptd.client").addHandler(warnings)
    filler = fill_shm_but(small // 2)
    with Checkpointer(address, "save-room-run", policies=[("*", "exact")],
                      connect_timeout_s=30) as ckpt:
        for step in range(RETRY_EVERY_SAVES + 3):
            if step == RETRY_EVERY_SAVES + 1:
                filler.unlink()
            saved = state(small, 10 + step)

            def save_one(step: int = step, saved: dict[str, torch.Tensor] = saved) -> None:
                ckpt.save(step, saved)
                ckpt.wait(timeout_s=120)

            _, asks = asked(save_one, CountedBuffer)
            out["save_room"].append([ckpt.transport, asks])
        out["save_room_restore_same"] = same(ckpt.restore(step), saved)
    out["save_room_warnings"] = list(warnings.messages)
    out["save_room_leftover_segments"] = sorted(os.listdir("/dev/shm"))
    logging.getLogger("ckptd.client").removeHandler(warnings)
    return out


def scenarios(address: str, big: int, small: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    warnings = Warnings()
    logging.getLogger("ckptd.client").addHandler(warnings)
    big_state = state(big, 1)
    # transport="auto": the staging segment does not fit, the save streams over gRPC.
    with Checkpointer(address, "auto-run", connect_timeout_s=30) as ckpt:
        out["auto_transport_before"] = ckpt.transport
        ckpt.save(1, big_state)
        ckpt.save(2, state(big, 2))
        ckpt.wait(timeout_s=120)
        out["auto_transport_after"] = ckpt.transport
        out["auto_warnings"] = list(warnings.messages)
        warnings.messages.clear()
        # The restore segment cannot hold the step either: the daemon refuses, it streams,
        # and later restores stream without asking until every RETRY_EVERY_RESTORES-th.
        out["auto_restore_asks"], out["auto_restore_transports"] = [], []
        for index in range(RETRY_EVERY_RESTORES + 1):
            zero_copy = index == 1
            restored, asks = asked(functools.partial(ckpt.restore_info, 1, zero_copy=zero_copy))
            out["auto_restore_asks"].append(asks)
            out["auto_restore_transports"].append(restored.transport)
            key = "auto_restore_zero_copy_same" if zero_copy else "auto_restore_same"
            out[key] = out.get(key, True) and same(restored.state, big_state)
        out["auto_restore_warnings"] = list(warnings.messages)
        warnings.messages.clear()
    # A step that fits an empty /dev/shm but not a full one: refused (one warning), not
    # asked again while the room is short, and through shared memory once it is there.
    with Checkpointer(address, "room-run", connect_timeout_s=30) as ckpt:
        small_state = state(small, 4)
        ckpt.save(1, small_state)
        ckpt.wait(timeout_s=120)
        filler = fill_shm_but(small // 2)
        out["room_restores"] = []
        for _ in range(3):
            if len(out["room_restores"]) == 2:
                filler.unlink()
            restored, asks = asked(lambda: ckpt.restore_info(1))
            out["room_restores"].append(
                [restored.transport, asks, same(restored.state, small_state)])
        out["room_warnings"] = list(warnings.messages)
    # transport="shm": the same saves and restores fail with a clear error instead.
    with Checkpointer(address, "shm-run", transport="shm", connect_timeout_s=30) as ckpt:
        try:
            ckpt.save(1, big_state)
            out["shm_save"] = {"error": None}
        except Exception as exc:
            out["shm_save"] = failure(exc)
        small_state = state(small, 3)
        ckpt.save(2, small_state)  # one that fits still goes through shared memory
        ckpt.wait(timeout_s=120)
        out["shm_small_transport"] = ckpt.transport
        out["shm_small_restore_same"] = same(ckpt.restore(2), small_state)
    with Checkpointer(address, "auto-run", transport="shm", connect_timeout_s=30) as ckpt:
        try:
            ckpt.restore(1)
            out["shm_restore"] = {"error": None}
        except Exception as exc:
            out["shm_restore"] = failure(exc)
    out["leftover_segments"] = sorted(os.listdir("/dev/shm"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--big-bytes", type=int, required=True)
    parser.add_argument("--small-bytes", type=int, required=True)
    args = parser.parse_args()
    daemon = start_in_process(args.dir / "storage", listen=f"unix://{args.dir}/ckptd.sock")
    try:
        result = scenarios(daemon.address, args.big_bytes, args.small_bytes)
        result.update(save_room(daemon.address, args.small_bytes))
    finally:
        daemon.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
