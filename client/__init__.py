"""ckptd's trainer-side client: snapshot, hand over, restore.

Typical use::

    from ckptd.client import Checkpointer

    with Checkpointer("unix:///run/ckptd.sock", run="resnet50") as ckpt:
        if (step := ckpt.latest_step()) is not None:
            state = ckpt.restore(step)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
        for step in range(start, steps):
            train_step()
            if step % 100 == 0:
                ckpt.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict()})
        ckpt.wait()

Dependencies stay light (torch, numpy, grpcio, protobuf); the client never imports the
daemon.
"""

from .checkpointer import Checkpointer, StepInfo
from .errors import (
    CheckpointNotFoundError,
    CkptdClientError,
    CkptdTimeoutError,
    CorruptCheckpointError,
    DaemonBusyError,
    DaemonUnavailableError,
    InternalDaemonError,
    InvalidCheckpointError,
    PermissionDeniedError,
    RequestCancelledError,
    SaveFailedError,
    SaveSkippedError,
    SnapshotConflictError,
    StepConflictError,
    map_rpc_error,
)
from .handle import SaveHandle, SaveState
from .restore import RestoredState

__all__ = [
    "CheckpointNotFoundError",
    "Checkpointer",
    "CkptdClientError",
    "CkptdTimeoutError",
    "CorruptCheckpointError",
    "DaemonBusyError",
    "DaemonUnavailableError",
    "InternalDaemonError",
    "InvalidCheckpointError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "RestoredState",
    "SaveFailedError",
    "SaveHandle",
    "SaveSkippedError",
    "SaveState",
    "SnapshotConflictError",
    "StepConflictError",
    "StepInfo",
    "map_rpc_error",
]
