"""The in-memory index of committed steps, rebuilt from storage at start.

Storage is the source of truth; the index is a cache of every readable manifest, kept in
step with it by the engine (add after a manifest put, remove before its delete). It answers
listings, duplicate/order checks and restore plans without touching storage. Used only
from the event loop's thread.

A *hidden* step (its ``hidden`` marker is in storage) is one retention dropped while a kept
step still restores through it: it stays in ``entries``, ``get``, ``child`` and ``plan``
(the chain as stored) but is left out of what users see: ``steps``, ``visible``,
``step_infos``, ``nearby`` and the step counts of ``run_infos`` (which report its bytes).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ckptd.daemon.domain import RunInfo, StepKey
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.daemon.logs import fields, get_logger
from ckptd.daemon.storage.base import KeyNotFoundError, Storage
from ckptd.daemon.store.lease import LEASES_PREFIX, Lease, chain_prefix, is_void, read_all
from ckptd.daemon.store.manifest import (
    BASE,
    MANIFEST_NAME,
    RUNS_PREFIX,
    Manifest,
    hidden_key,
    is_newer_format,
    manifest_key,
    parse_key,
    pending_key,
)
from ckptd.daemon.store.quarantine import DamagedStep
from ckptd.protos.records import StepInfo

log = get_logger("engine")
ChainKey = tuple[str, int]
T = TypeVar("T")


class RunInPool(Protocol):
    """Runs a blocking call in one of the engine's thread pools (``loop.run_in_executor``)."""

    def __call__(self, call: Callable[[], T], /) -> Awaitable[T]: ...


@dataclass(frozen=True)
class IndexEntry:
    """A committed step: its manifest and the size of the manifest object itself."""

    manifest: Manifest
    manifest_bytes: int
    hidden: bool = False  # retention dropped it; kept only as a later step's dependency

    @property
    def stored_bytes(self) -> int:
        return self.manifest.stored_bytes + self.manifest_bytes


class StepIndex:
    """Committed steps per (run, rank), in step order."""

    def __init__(self) -> None:
        self._entries: dict[ChainKey, dict[int, IndexEntry]] = {}
        self._steps: dict[ChainKey, list[int]] = {}

    def add(self, entry: IndexEntry) -> None:
        key = entry.manifest.key
        chain = (key.run, key.rank)
        entries = self._entries.setdefault(chain, {})
        if key.step not in entries:
            bisect.insort(self._steps.setdefault(chain, []), key.step)
        entries[key.step] = entry

    def clear(self) -> None:
        self._entries.clear()
        self._steps.clear()

    def remove(self, key: StepKey) -> None:
        chain = (key.run, key.rank)
        if self._entries.get(chain, {}).pop(key.step, None) is None:
            return
        steps = self._steps[chain]
        del steps[bisect.bisect_left(steps, key.step)]
        if not steps:
            del self._entries[chain], self._steps[chain]

    def hide(self, key: StepKey) -> None:
        """Marks a stored step hidden (after its ``hidden`` marker was put)."""
        entry = self.get(key)
        if entry is not None:
            self._entries[(key.run, key.rank)][key.step] = dataclasses.replace(
                entry, hidden=True)

    def get(self, key: StepKey) -> IndexEntry | None:
        """The stored step ``key``, hidden or not (the chain as stored)."""
        return self._entries.get((key.run, key.rank), {}).get(key.step)

    def visible(self, key: StepKey) -> IndexEntry | None:
        """The step ``key`` as users see it: None when it is missing or hidden."""
        entry = self.get(key)
        return None if entry is None or entry.hidden else entry

    def steps(self, run: str, rank: int) -> list[int]:
        """The chain's steps users see (hidden ones left out), oldest first."""
        return [e.manifest.key.step for e in self.entries(run, rank) if not e.hidden]

    def entries(self, run: str, rank: int) -> list[IndexEntry]:
        """Every stored step of the chain, hidden ones included, oldest first."""
        entries = self._entries.get((run, rank), {})
        return [entries[step] for step in self._steps.get((run, rank), ())]

    def latest(self, run: str, rank: int) -> int | None:
        """The chain's newest stored step (never hidden: retention keeps the latest)."""
        steps = self._steps.get((run, rank))
        return steps[-1] if steps else None

    def run_infos(self) -> list[RunInfo]:
        """One line per (run, rank) with steps, as ``ListRuns`` and ``ckptd ls`` show it."""
        infos = []
        for run, rank in self.chains():
            entries = self.entries(run, rank)
            hidden = [entry for entry in entries if entry.hidden]
            infos.append(RunInfo(run, rank, len(entries) - len(hidden),
                                 entries[-1].manifest.key.step,
                                 sum(entry.stored_bytes for entry in entries),
                                 hidden_steps=len(hidden),
                                 hidden_bytes=sum(entry.stored_bytes for entry in hidden)))
        return infos

    def step_infos(self, run: str, rank: int) -> list[StepInfo]:
        """The committed steps of one chain, oldest first, as users see them."""
        return [
            StepInfo(step=m.key.step, kind=m.kind, parent_step=m.parent_step,
                     raw_bytes=m.raw_bytes, stored_bytes=e.stored_bytes,
                     chain_depth=m.chain_depth, created_unix_s=m.created_unix_s,
                     metrics=dict(m.metrics), world_size=m.world_size)
            for e in self.entries(run, rank) if not e.hidden
            for m in (e.manifest,)
        ]

    def chains(self) -> list[ChainKey]:
        return sorted(self._steps)

    def ranks(self, run: str) -> list[int]:
        return sorted(rank for name, rank in self._steps if name == run)

    def child(self, key: StepKey) -> IndexEntry | None:
        """The committed step encoded as a delta against ``key``, if any (at most one: a
        chain is linear, each delta's parent is the step committed just before it)."""
        steps = self._steps.get((key.run, key.rank), [])
        position = bisect.bisect_right(steps, key.step)
        if position == len(steps):
            return None
        entry = self._entries[(key.run, key.rank)][steps[position]]
        return entry if entry.manifest.parent_step == key.step else None

    def nearby(self, run: str, rank: int, step: int, count: int = 3) -> list[int]:
        steps = self.steps(run, rank)
        position = bisect.bisect_left(steps, step)
        return steps[max(0, position - count) : position + count]

    def plan(self, key: StepKey) -> list[Manifest]:
        """The manifests to apply to restore ``key``: its nearest base, then each delta up
        to ``key``, found through parent pointers."""
        chain = self._entries.get((key.run, key.rank), {})
        plan: list[Manifest] = []
        step: int | None = key.step
        while step is not None:
            entry = chain.get(step)
            if entry is None:
                raise CorruptCheckpointError(
                    f"step {key} needs step {step} of its chain, which is missing from storage"
                )
            plan.append(entry.manifest)
            parent = entry.manifest.parent_step
            if entry.manifest.kind == BASE:
                break
            if parent is None or parent >= step:
                raise CorruptCheckpointError(f"step {step} of {key.run}/rank{key.rank} has "
                                             f"parent_step {parent}, which is not earlier")
            step = parent
        plan.reverse()
        return plan


@dataclass
class ScanResult:
    """What ``scan`` found under ``runs/``: committed steps, keys that are provably garbage,
    and step directories that may have held a committed step but cannot be read."""

    entries: list[IndexEntry]
    garbage: list[str]
    damaged: list[DamagedStep] = field(default_factory=list)
    # Void manifests (their keys are in ``garbage``): a writer that had lost its lease
    # committed them, so their steps are not committed, whatever a world record says.
    void: list[Manifest] = field(default_factory=list)


@dataclass(frozen=True)
class _Unreadable:
    """A manifest that exists but cannot be used; ``newer`` when a newer ckptd wrote it."""

    reason: str
    newer: bool


async def scan(
    storage: Storage,
    run_in_pool: RunInPool,
    chain: ChainKey | None = None,
    known: Mapping[str, IndexEntry] | None = None,
) -> ScanResult:
    """Reads every manifest under ``runs/`` (or one ``chain``'s) and classifies each step
    directory; a manifest key in ``known`` is taken from it instead of read again.

    * a readable manifest: the step is committed, hidden when its ``hidden`` marker is
      there; every other key of its directory the manifest does not name (a crashed
      rebase's old or new blobs, the ``pending`` marker) is garbage;
    * no manifest but the ``pending`` marker: a save that never committed or a deletion
      under way, both provably uncommitted: every key is garbage;
    * no manifest and no marker, or a manifest that is damaged: the step may have been
      committed, so the directory is ``damaged`` (the engine quarantines it);
    * a manifest of a newer format version is logged and left alone for the ckptd that
      wrote it: neither indexed nor deleted;
    * a void manifest (committed by a writer whose chain lease a later generation had
      fenced off, ``ckptd.daemon.store.lease``): not committed; every key is garbage.

    The rule needs the marker only for directories without a manifest, so stores written
    before the marker existed read the same: their committed steps have manifests.
    """
    runs_prefix = RUNS_PREFIX if chain is None else f"{RUNS_PREFIX}{chain[0]}/{chain[1]}/"
    lease_prefix = LEASES_PREFIX if chain is None else chain_prefix(*chain)
    leases = await run_in_pool(lambda: read_all(storage, lease_prefix))
    keys = await run_in_pool(lambda: storage.list(runs_prefix))
    by_step: dict[StepKey, list[str]] = collections.defaultdict(list)
    for key in keys:
        parsed = parse_key(key)
        if parsed is None:
            log.warning("ignoring key outside the layout %s", fields(key=key))
            continue
        by_step[parsed[0]].append(key)
    committed = [step for step, names in by_step.items() if manifest_key(step) in names]
    cached = known or {}
    loaded = await asyncio.gather(*(
        _cached(cached[manifest_key(step)]) if manifest_key(step) in cached
        else _load(storage, run_in_pool, step) for step in committed))
    result = ScanResult(entries=[], garbage=[])
    for step, names in by_step.items():
        if manifest_key(step) in names:
            continue
        if pending_key(step) in names:
            result.garbage.extend(names)
        else:
            result.damaged.append(DamagedStep(step, tuple(names), "manifest missing"))
    for step, outcome in zip(committed, loaded, strict=True):
        if isinstance(outcome, IndexEntry) and _void(outcome.manifest, leases):
            result.garbage.extend(by_step[step])
            result.void.append(outcome.manifest)
        elif isinstance(outcome, IndexEntry):
            hidden = hidden_key(step) in by_step[step]
            result.entries.append(dataclasses.replace(outcome, hidden=hidden))
            named = {tensor.blob_key for tensor in outcome.manifest.tensors}
            named.update((manifest_key(step), hidden_key(step)))
            result.garbage.extend(key for key in by_step[step] if key not in named)
        elif isinstance(outcome, _Unreadable) and not outcome.newer:
            result.damaged.append(DamagedStep(step, tuple(by_step[step]), outcome.reason))
    return result


async def _cached(entry: IndexEntry) -> IndexEntry:
    return entry


def _void(manifest: Manifest, leases: dict[ChainKey, list[Lease]]) -> bool:
    key = manifest.key
    if not is_void(manifest.lease_generation, key.step, leases.get((key.run, key.rank), ())):
        return False
    log.warning("ignoring a step committed by a writer that had lost its chain lease %s",
                fields(run=key.run, rank=key.rank, step=key.step,
                       lease_generation=manifest.lease_generation))
    return True


async def _load(
    storage: Storage, run_in_pool: RunInPool, step: StepKey
) -> IndexEntry | _Unreadable | None:
    """The step's index entry; ``_Unreadable`` for a manifest that cannot be used; None for
    one deleted since the listing (only a concurrent writer does that: left alone)."""
    key = manifest_key(step)
    data = b""
    try:
        data = await run_in_pool(lambda: storage.get(key))
        manifest = Manifest.from_bytes(data, key)
        if manifest.key != step:
            raise CorruptCheckpointError(f"manifest {key} describes step {manifest.key}")
    except KeyNotFoundError:
        return None
    except CorruptCheckpointError as exc:
        if is_newer_format(data):
            log.warning("leaving a step of a newer ckptd alone %s",
                        fields(key=key, error=str(exc)))
            return _Unreadable(str(exc), newer=True)
        return _Unreadable(str(exc), newer=False)
    return IndexEntry(manifest, len(data))


__all__ = ["MANIFEST_NAME", "IndexEntry", "ScanResult", "StepIndex", "scan"]
