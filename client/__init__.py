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
daemon. The torch-backed names (``Checkpointer``, ``SaveHandle``, ...) are imported on
first use (PEP 562 ``__getattr__``), so that ``ckptd.client.errors`` — the exception tree
the daemon's ``ckptd`` CLI shares — imports without torch, which the daemon image lacks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptd.protos.records import SaveState, StepInfo

from .credentials import TlsFiles
from .errors import (
    ChainLeasedError,
    CheckpointNotFoundError,
    CkptdClientError,
    CkptdTimeoutError,
    CorruptCheckpointError,
    DaemonBusyError,
    DaemonUnavailableError,
    GrpcLimitError,
    InternalDaemonError,
    InvalidCheckpointError,
    PermissionDeniedError,
    RequestCancelledError,
    SaveFailedError,
    SaveSkippedError,
    SharedMemoryFullError,
    SharedMemoryRefusedError,
    SnapshotConflictError,
    StepConflictError,
    StepIncompleteError,
    StorageFullError,
    StorageInUseError,
    StreamIdleError,
    UnauthenticatedError,
    map_rpc_error,
)
from .retention import Retention

if TYPE_CHECKING:
    from .checkpointer import Checkpointer
    from .handle import SaveHandle
    from .restore import RestoredState

# Public names that need torch, and the module each lives in.
_LAZY = {
    "Checkpointer": "checkpointer",
    "SaveHandle": "handle",
    "RestoredState": "restore",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "ChainLeasedError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "CkptdClientError",
    "CkptdTimeoutError",
    "CorruptCheckpointError",
    "DaemonBusyError",
    "DaemonUnavailableError",
    "GrpcLimitError",
    "InternalDaemonError",
    "InvalidCheckpointError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "RestoredState",
    "Retention",
    "SaveFailedError",
    "SaveHandle",
    "SaveSkippedError",
    "SaveState",
    "SharedMemoryFullError",
    "SharedMemoryRefusedError",
    "SnapshotConflictError",
    "StepConflictError",
    "StepIncompleteError",
    "StepInfo",
    "StorageFullError",
    "StorageInUseError",
    "StreamIdleError",
    "TlsFiles",
    "UnauthenticatedError",
    "map_rpc_error",
]
