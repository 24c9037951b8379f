"""``torch.distributed.checkpoint`` through ckptd: a ``StorageWriter`` and a ``StorageReader``.

``dcp.save(state, storage_writer=CkptdStorageWriter(target, run), checkpoint_id=step)``
(and ``dcp.async_save``) and ``dcp.load(state, storage_reader=CkptdStorageReader(target,
run), checkpoint_id=step)`` keep DCP's planning, collectives and load-time resharding and
put the bytes through the daemon, with the daemon's delta compression.

How a save maps onto ckptd, in DCP's call order (``state_dict_saver.py``):

1. ``reset(checkpoint_id)`` on every rank: the checkpoint id is the training step (an
   ``int``, or a string of digits); each DCP save is one ckptd step.
2. ``set_up_storage_writer(is_coordinator, rank=...)``: a ``Checkpointer`` for (run, rank)
   with the process group's world size, made once and kept, so each rank's saves form one
   chain: every step's shards are deltas against that rank's previous shards.
3. ``prepare_local_plan`` / ``prepare_global_plan``: unchanged.
4. ``write_data(plan, planner)``: each write item becomes one tensor of the rank's save
   under its DCP name (``fqn``, plus ``@`` and the chunk offsets for a shard not at the
   origin), so names line up across steps; ``BytesIO`` items (optimizer param groups,
   plain Python values) become exact ``uint8`` tensors. A non-coordinator saves and
   returns when the save is durable. The coordinator keeps its items for step 5.
5. ``finish(metadata, results)`` on the coordinator, after DCP gathered every rank's
   results (so every other rank is durable): the coordinator saves its own items together
   with DCP's global ``Metadata`` (pickled, as DCP's own file writer stores it, in the
   exact tensor ``METADATA_NAME``) and waits until durable. That commit is the last rank
   of the step, so it is the world commit: the daemon records the step complete. A save
   whose world size differs from the run's previous steps is allowed (``reshardable``):
   ``load`` reshards it.

A load reads the ``Metadata`` from the coordinator rank's copy (rank 0, DCP's default
coordinator), then, per read item, the saving rank's tensor (``storage_data`` names it),
narrowed to the requested chunk: DCP's planner decides what each loading rank needs,
whatever world size it runs with. Each source rank's step is restored once per load and
dropped afterwards. Unpickling the metadata trusts the run's writers, as DCP's file
reader trusts its directory.

torch is imported when this module is (an optional integration, like ``lightning.py``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .checkpointer import Checkpointer

# The coordinator's save holds DCP's global metadata under this name; a leading "." keeps
# it apart from state-dict names (module and optimizer keys never start with one).
METADATA_NAME = ".dcp.metadata"
DURABLE_TIMEOUT_S = 3600.0

CheckpointId = str | os.PathLike[str] | int | None


@dataclasses.dataclass(frozen=True)
class CkptdItem:
    """Where one DCP item lives: the tensor ``name`` in the save of ``rank`` (pickled into
    DCP's ``Metadata.storage_data``, so its module path is part of the stored format)."""

    rank: int
    name: str


def item_name(index: MetadataIndex) -> str:
    """The tensor name of a DCP item: its ``fqn``, plus ``@`` and the chunk offsets for a
    shard that does not start at the origin (stable across steps of one sharding)."""
    offset = index.offset
    if offset is None or not any(offset):
        return index.fqn
    return f"{index.fqn}@{','.join(str(int(o)) for o in offset)}"


def step_of(checkpoint_id: CheckpointId) -> int | None:
    """The training step a DCP ``checkpoint_id`` names (None: none given)."""
    if checkpoint_id is None:
        return None
    text = os.fspath(checkpoint_id) if not isinstance(checkpoint_id, int) else str(checkpoint_id)
    if isinstance(checkpoint_id, bool) or not text.isdigit():
        raise ValueError(f"a ckptd checkpoint_id is the training step, a non-negative int "
                         f"(or a string of digits), got {checkpoint_id!r}")
    return int(text)


def _is_step(checkpoint_id: Any) -> bool:
    try:
        return step_of(checkpoint_id) is not None
    except (TypeError, ValueError):
        return False


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _as_bytes_tensor(data: bytes | memoryview) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class CkptdStorageWriter(StorageWriter):
    """Saves DCP checkpoints of ``run`` through the ckptd daemon at ``target``.

    Args:
        target: The daemon's address (as for ``Checkpointer``).
        run: The training job's name; each rank saves its chain (run, rank).
        **checkpointer_kwargs: Passed to each rank's ``Checkpointer`` (``policies``,
            ``bits``, ``transport``, ``token``, ...); not ``rank`` or ``world_size``, which
            come from the process group.
    """

    def __init__(self, target: str, run: str, **checkpointer_kwargs: Any) -> None:
        super().__init__()
        self.target, self.run = target, run
        self._kwargs = checkpointer_kwargs
        self._checkpointer: Checkpointer | None = None
        self._world: tuple[int, int] | None = None  # (rank, world size) it saves as
        self.step: int | None = None
        self._coordinator = False
        self._held: dict[str, torch.Tensor] = {}

    def reset(self, checkpoint_id: CheckpointId = None) -> None:
        self.step = step_of(checkpoint_id)
        self._held = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return _is_step(checkpoint_id)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"ckptd://{self.run}/{self.step}")

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        rank, world_size = _world()
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.target, self.run, rank=rank,
                                              world_size=world_size, reshardable=True,
                                              **self._kwargs)
            self._world = (rank, world_size)
        elif self._world != (rank, world_size):
            raise ValueError(f"this CkptdStorageWriter saved as (rank, world size) "
                             f"{self._world}, now {(rank, world_size)}; make one writer per "
                             "process group")
        self._coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        checkpointer = self._require()
        tensors: dict[str, torch.Tensor] = {}
        results = []
        for item in plan.items:
            name = item_name(item.index)
            tensors[name] = self._resolve(item, planner)
            results.append(WriteResult(index=item.index, size_in_bytes=tensors[name].nbytes,
                                       storage_data=CkptdItem(checkpointer.rank, name)))
        if self._coordinator:
            self._held = tensors  # saved with the global metadata by finish()
        else:
            self._save(tensors)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        metadata.storage_meta = self.storage_meta()
        tensors = dict(self._held)
        tensors[METADATA_NAME] = _as_bytes_tensor(pickle.dumps(metadata))
        self._held = {}
        self._save(tensors)

    def close(self) -> None:
        """Closes this rank's checkpointer (after its last save)."""
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None

    def _require(self) -> Checkpointer:
        if self._checkpointer is None or self.step is None:
            raise ValueError("CkptdStorageWriter needs checkpoint_id=<training step> in "
                             "dcp.save / dcp.async_save")
        return self._checkpointer

    def _resolve(self, item: WriteItem, planner: SavePlanner) -> torch.Tensor:
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            assert isinstance(data, io.BytesIO)
            return _as_bytes_tensor(data.getbuffer())  # one copy, into the bytearray
        assert isinstance(data, torch.Tensor)
        return data.detach()

    def _save(self, tensors: Mapping[str, torch.Tensor]) -> None:
        checkpointer, step = self._require(), self.step
        assert step is not None
        checkpointer.save(step, dict(tensors))
        checkpointer.wait(DURABLE_TIMEOUT_S)


class CkptdStorageReader(StorageReader):
    """Loads DCP checkpoints of ``run`` from the ckptd daemon at ``target``, resharding to
    the loading world through DCP's planner.

    Args:
        target: The daemon's address.
        run: The training job's name.
        coordinator_rank: The rank that coordinated the saves (DCP's default, 0): its copy
            holds the global metadata.
        **checkpointer_kwargs: Passed to the ``Checkpointer`` of each rank read.
    """

    def __init__(
        self, target: str, run: str, *, coordinator_rank: int = 0, **checkpointer_kwargs: Any
    ) -> None:
        super().__init__()
        self.target, self.run = target, run
        self.coordinator_rank = coordinator_rank
        self._kwargs = checkpointer_kwargs
        self.step: int | None = None
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        self.storage_data: dict[MetadataIndex, CkptdItem] = {}

    def reset(self, checkpoint_id: CheckpointId = None) -> None:
        self.step = step_of(checkpoint_id)
        self._states = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return _is_step(checkpoint_id)

    def read_metadata(self) -> Metadata:
        """The global metadata of ``step`` (None: the latest step every rank completed)."""
        blob = self._state(self.coordinator_rank)[METADATA_NAME]
        metadata = pickle.loads(blob.numpy().tobytes())
        if not isinstance(metadata, Metadata):
            raise TypeError(f"step {self.step} of run {self.run!r} holds no DCP metadata "
                            f"(found {type(metadata).__name__}); was it saved with dcp.save?")
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.storage_data = dict(metadata.storage_data)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            for request in plan.items:
                self._read(request, planner)
        finally:
            self._states = {}  # one load: free what it restored
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read(self, request: ReadItem, planner: LoadPlanner) -> None:
        where = self.storage_data[request.storage_index]
        stored = self._state(where.rank)[where.name]
        if request.type == LoadItemType.BYTE_IO:
            planner.load_bytes(request, io.BytesIO(stored.numpy().tobytes()))
            return
        for dim, (start, length) in enumerate(
                zip(request.storage_offsets, request.lengths, strict=True)):
            stored = stored.narrow(dim, start, length)
        target = planner.resolve_tensor(request).detach()
        if target.size() != stored.size():
            raise ValueError(f"DCP item {request.storage_index.fqn!r}: the planner asks for "
                             f"{tuple(target.size())}, the checkpoint holds "
                             f"{tuple(stored.size())} at step {self.step}")
        target.copy_(stored)
        planner.commit_tensor(request, target)

    def _state(self, rank: int) -> dict[str, torch.Tensor]:
        state = self._states.get(rank)
        if state is None:
            with Checkpointer(self.target, self.run, rank=rank, **self._kwargs) as ckpt:
                if self.step is None:
                    self.step = ckpt.latest_step()
                    if self.step is None:
                        raise ValueError(f"run {self.run!r} has no complete step to load")
                state = self._states[rank] = ckpt.restore(self.step)
        return state


__all__ = ["METADATA_NAME", "CkptdItem", "CkptdStorageReader", "CkptdStorageWriter"]
