"""Lightning plug-in: ``CkptdCheckpointIO`` saves Lightning checkpoints through ckptd.

Use::

    from ckptd.client import Checkpointer
    from ckptd.client.lightning import CkptdCheckpointIO

    ckpt = Checkpointer("unix:///run/ckptd.sock", run="my-model")
    io = CkptdCheckpointIO(ckpt)
    trainer = L.Trainer(plugins=[io], callbacks=[ModelCheckpoint(save_last=True, ...)])
    trainer.fit(model, ckpt_path="last")

**Paths and steps.** Lightning names checkpoints by path and its ``ModelCheckpoint`` keeps
its books on the file system: it asks ``exists`` before choosing a file name, symlinks
``last.ckpt``, and ``ckpt_path="last"`` lists the checkpoint folder and picks the newest
``last*.ckpt`` by modification time. So every save leaves a *marker* at the path: a few
hundred bytes of JSON naming the target, run, rank and ckptd step (and the step that held
the path before), while the tensors live in ckptd. Each step carries its path and
Lightning's ``global_step`` as metadata (``lightning.path``, ``lightning.global_step``).
The ckptd step is Lightning's ``global_step`` when that is after every step saved so far,
else the next free number: ``ModelCheckpoint`` saves a top-k file and ``last.ckpt`` at the
same ``global_step``, and ckptd steps must grow.

**Deletion.** The daemon refuses to delete a step while a save of the run is in flight, so
``remove_checkpoint`` (``save_top_k`` rotation) and overwriting a path (``last.ckpt`` at
every save) remove the marker at once and queue the old step; queued steps are deleted as
soon as every save made so far is durable (checked without blocking on each call, and by
``teardown``). A superseded step is never deleted before its replacement is durable; a
crash can leave queued steps behind, unreferenced by any marker (``ckptd rm`` removes them).

**What is stored.** Lightning's checkpoint holds tensors and plain values, which ckptd
stores as they are, plus values ``ckptd.client.structure`` cannot encode: dict subclasses
(``AttributeDict`` hyper-parameters) are stored as plain dicts; anything else (a custom
object in the hyper-parameters) raises ``TypeError`` naming its path, unless the plug-in is
built with ``allow_pickle=True``, which pickles exactly those values (and unpickles them on
load: only for stores you trust).

Only global rank 0 saves (Lightning calls the plug-in there for single-device and DDP
strategies); sharded strategies (FSDP, DeepSpeed) are not supported. Lightning's
``LightningModule.load_from_checkpoint`` reads files itself: load with
``trainer.fit/validate(ckpt_path=...)`` or ``CkptdCheckpointIO.load_checkpoint``.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from .checkpointer import Checkpointer
from .deferred import DeferredDeletes
from .errors import CheckpointNotFoundError

MARKER_FORMAT = "ckptd.lightning/1"
PATH_KEY = "lightning.path"
GLOBAL_STEP_KEY = "lightning.global_step"
# A dict of this one key stands for a pickled value (allow_pickle=True only).
PICKLE_TAG = "ckptd.lightning.pickle"
_PLAIN = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device)


class CkptdCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves asynchronously through a ckptd daemon.

    Args:
        checkpointer: The run's checkpointer (its policies apply); the caller closes it.
        allow_pickle: Pickle values ckptd cannot encode (and unpickle them on load) instead
            of raising ``TypeError``.

    Call order (Lightning's, on global rank 0): ``save_checkpoint`` and
    ``remove_checkpoint`` from the training loop, ``load_checkpoint`` on resume,
    ``teardown`` at the end of ``fit``.
    """

    def __init__(self, checkpointer: Checkpointer, *, allow_pickle: bool = False) -> None:
        self.checkpointer = checkpointer
        self.allow_pickle = allow_pickle
        latest = checkpointer.latest_step()
        self._last_step = -1 if latest is None else latest
        self._deletes = DeferredDeletes(checkpointer)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Saves ``checkpoint`` as the next ckptd step and writes the marker at ``path``.

        Returns once the state is snapshot (the save becomes durable in the background).

        Raises:
            TypeError: ``storage_options`` given, or a value ckptd cannot store (without
                ``allow_pickle``); the message names its path in the checkpoint.
        """
        if storage_options is not None:
            raise TypeError(f"CkptdCheckpointIO takes no storage_options, got {storage_options!r}")
        path = os.path.abspath(path)
        global_step = int(checkpoint.get("global_step", 0))
        step = max(global_step, self._last_step + 1)
        state = _encode(checkpoint, (), self.allow_pickle)
        metadata = {PATH_KEY: path, GLOBAL_STEP_KEY: str(global_step)}
        handle = self.checkpointer.save(step, state, metadata=metadata)
        self._last_step = step
        self._deletes.saved(handle)
        replaced = read_marker(path) if os.path.isfile(path) else None
        previous = None
        if replaced is not None and self._ours(replaced):
            previous = replaced["step"]
            self._deletes.delete(previous, replaced_by=handle)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_marker(path, self._marker(step, previous))
        self._deletes.flush(block=False)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable[..., Any] | str | torch.device | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Restores the checkpoint whose marker is at ``path``.

        If the marker's step never became durable (the trainer died first), the step the
        path held before is restored.

        Raises:
            FileNotFoundError: No marker at ``path``, or neither step it names exists.
            ValueError: ``path`` is not a ckptd marker, or names another run or rank.
        """
        marker = read_marker(os.path.abspath(path))
        if marker is None:
            raise ValueError(f"{path} is not a ckptd checkpoint marker ({MARKER_FORMAT})")
        if not self._ours(marker):
            raise ValueError(
                f"{path} names run {marker.get('run')!r} rank {marker.get('rank')}, but this "
                f"CkptdCheckpointIO saves run {self.checkpointer.run!r} rank "
                f"{self.checkpointer.rank}"
            )
        location = map_location if isinstance(map_location, str | torch.device) else "cpu"
        for step in (marker["step"], marker.get("previous")):
            if step is None:
                continue
            try:
                state = self.checkpointer.restore(step, map_location=location)
            except CheckpointNotFoundError:
                continue
            return _decode(state, self.allow_pickle)
        raise FileNotFoundError(
            f"{path} names ckptd step {marker['step']} of run {marker['run']!r} "
            f"(previously {marker.get('previous')}), and neither step exists"
        )

    def remove_checkpoint(self, path: str | Path) -> None:
        """Removes the marker at ``path`` and deletes its step once no save is in flight."""
        path = os.path.abspath(path)
        marker = read_marker(path) if os.path.isfile(path) else None
        if os.path.lexists(path):
            os.remove(path)
        if marker is not None and self._ours(marker):
            self._deletes.delete(marker["step"])
        self._deletes.flush(block=False)

    def teardown(self) -> None:
        """Waits until every save is durable (raising the first failure), then deletes what
        ``remove_checkpoint`` and overwrites left queued."""
        self._deletes.flush(block=True)

    def _ours(self, marker: Mapping[str, Any]) -> bool:
        ckpt = self.checkpointer
        return bool(marker.get("run") == ckpt.run and marker.get("rank") == ckpt.rank)

    def _marker(self, step: int, previous: int | None) -> dict[str, Any]:
        ckpt = self.checkpointer
        return {
            "format": MARKER_FORMAT,
            "target": ckpt.target,
            "run": ckpt.run,
            "rank": ckpt.rank,
            "step": step,
            "previous": previous,
        }


def read_marker(path: str) -> dict[str, Any] | None:
    """The marker at ``path``, or None when the file is not one (or is missing)."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
        marker = json.loads(head)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    return marker


def _write_marker(path: str, marker: Mapping[str, Any]) -> None:
    # tmp + rename: a crash leaves the old marker or the new one, never half of one.
    if os.path.islink(path):
        os.remove(path)  # a save_last="link" symlink: replace the link, not its target
    tmp = f"{path}.ckptd-tmp"
    with open(tmp, "w") as file:
        json.dump(marker, file)
    os.replace(tmp, path)


def _encode(value: Any, path: tuple[Any, ...], allow_pickle: bool) -> Any:
    if isinstance(value, dict):
        # dict and OrderedDict keep their type (and a state_dict's _metadata); subclasses
        # such as AttributeDict become plain dicts.
        kind = type(value) if type(value) in (dict, OrderedDict) else dict
        encoded = kind(
            (key, _encode(item, (*path, key), allow_pickle)) for key, item in value.items()
        )
        if hasattr(value, "_metadata"):
            encoded._metadata = value._metadata  # type: ignore[attr-defined]
        return encoded
    if type(value) in (list, tuple):
        return type(value)(_encode(item, (*path, i), allow_pickle) for i, item in enumerate(value))
    if isinstance(value, _PLAIN) or type(value).__module__ == "numpy":
        return value
    if allow_pickle:
        return {PICKLE_TAG: pickle.dumps(value)}
    where = "checkpoint" + "".join(f"[{part!r}]" for part in path)
    raise TypeError(
        f"cannot store {where} through ckptd: {type(value).__qualname__} is neither a tensor "
        "nor a plain value; convert it, or pass CkptdCheckpointIO(..., allow_pickle=True) to "
        "pickle such values"
    )


def _decode(value: Any, allow_pickle: bool) -> Any:
    """Unpickles tagged values, in place (the restored state is ours to change)."""
    if isinstance(value, dict):
        if len(value) == 1 and PICKLE_TAG in value:
            if not allow_pickle:
                raise ValueError(
                    "the checkpoint holds pickled values; load it with "
                    "CkptdCheckpointIO(..., allow_pickle=True) if you trust its store"
                )
            return pickle.loads(value[PICKLE_TAG])  # explicit opt-in
        for key, item in value.items():
            value[key] = _decode(item, allow_pickle)
    elif isinstance(value, list):
        value[:] = [_decode(item, allow_pickle) for item in value]
    elif type(value) is tuple:
        return tuple(_decode(item, allow_pickle) for item in value)
    return value


__all__ = ["CkptdCheckpointIO", "read_marker"]
