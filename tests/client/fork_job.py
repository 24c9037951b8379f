"""A trainer that forks a child (a DataLoader-style worker made with ``os.fork``) while its
checkpointer is open. Run by ``test_client_fork.py`` with the daemon's unix address, so the
fork happens in a process of its own, not in pytest's.

A first child only exits as an interpreter does (atexit handlers, the checkpointer's
finalizer among them); a second tries to save through the inherited checkpointer first.
Prints one JSON object: what the second child's save did, whether the parent's staging
segments survived the children, and whether the parent's next save went through shared
memory and restores.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch
from ckptd.client import Checkpointer
from ckptd.protos import segments


def own_segments() -> set[str]:
    return {p.name for p in Path(segments.SHM_ROOT).iterdir()
            if p.name.startswith(segments.SEGMENT_PREFIX)
            and segments.segment_owner(p.name) == os.getpid()}


def fork(checkpointer: Checkpointer, *, save: bool) -> tuple[str, int]:
    """Runs a child; returns what its save did and its exit code."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        outcome = "no save"
        if save:
            try:
                handle = checkpointer.save(2, {"w": torch.full((1024,), 2.0)})
                outcome = f"save returned a handle ({handle.state.name})"
            except RuntimeError as exc:
                outcome = f"RuntimeError: {exc}"
        os.write(write, outcome.encode())
        atexit._run_exitfuncs()  # what a normal interpreter exit runs, finalizers included
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    outcome = os.read(read, 4096).decode()
    os.close(read)
    return outcome, os.waitstatus_to_exitcode(status)


def main(address: str) -> None:
    checkpointer = Checkpointer(address, "fork", transport="shm", connect_timeout_s=30.0)
    assert checkpointer.save(1, {"w": torch.ones(1024)}).durable(60)
    staged = own_segments()
    _, first_exit = fork(checkpointer, save=False)
    kept = staged <= own_segments()
    outcome, second_exit = fork(checkpointer, save=True)
    handle = checkpointer.save(3, {"w": torch.full((1024,), 3.0)})
    durable = handle.durable(60)
    error = handle.exception(0)
    restored = checkpointer.restore(3)["w"] if durable else None
    print(json.dumps({
        "child": outcome,
        "child_exits": [first_exit, second_exit],
        "staged_segments": len(staged),
        "segments_kept": kept,
        "parent_durable": durable,
        "parent_error": None if error is None else repr(error),
        "transport": checkpointer.transport,
        "restored_ok": restored is not None and bool((restored == 3.0).all()),
        "steps": checkpointer.steps(),
    }))
    checkpointer.close()


if __name__ == "__main__":
    main(sys.argv[1])
