"""The save pipeline of one chain: encoding → writing → committed (or failed, cleaned up).

Called by the engine's per-chain worker, under ``Chain.lock``, one save at a time in step
order. For each tensor: encode it in the codec pool (an exact blob, or a lossy delta
against the head reconstruction), drop the received buffer, put the blob from the I/O
pool; tensors run concurrently up to the pools' width, a bound shared with every other
chain's saves (``Pools.blob_slots``). Before the first blob, the step's ``pending``
marker is put, so that a crash leaves a directory start-up can prove uncommitted; when
every blob is durable (they are put as one batch, ``Storage.put_batched``, made durable by
one ``Storage.sync``), the chain's lease is checked (``fence``: a daemon that lost the
chain commits nothing) and the manifest is created, recording the lease generation — the
commit point — then the marker removed,
and only then does the chain's head move on. On any failure the step's keys are deleted,
the marker last (best effort; a restart removes what is left), and the head stays at the
previous step, so the next save works as if this one never happened.

Each stage's busy seconds are counted in the save's ``StageTimes``
(``ckptd.daemon.engine.stages``) and come back in ``Committed.stages``; whether an exact
blob is compressed is ``BaseCoding``'s choice (``ckptd.daemon.engine.basecoding``), fed by
the same timings.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
from ckptd.daemon import codec
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import StepKey, TensorSpec
from ckptd.daemon.engine.basecoding import BaseCoding
from ckptd.daemon.engine.chain import Chain, QueuedSave, Reconstruction, choose_kind
from ckptd.daemon.engine.lease import Fence
from ckptd.daemon.engine.stages import StageTimes
from ckptd.daemon.engine.validation import bits_for, buckets_for, domain_for, is_lossy
from ckptd.daemon.errors import CorruptCheckpointError, StepExistsError
from ckptd.daemon.logs import get_logger, step_fields
from ckptd.daemon.pools import Pools, gather_bounded
from ckptd.daemon.storage.base import Storage
from ckptd.daemon.store.index import IndexEntry
from ckptd.daemon.store.manifest import (
    DELTA,
    EXACT,
    Manifest,
    TensorEntry,
    blob_checksum,
    blob_key,
    manifest_key,
    tensors_checksum,
)
from ckptd.daemon.store.repository import Repository
from ckptd.daemon.store.restore import as_holder
from ckptd.protos.records import SaveState

log = get_logger("engine")
Encoded = tuple[str, bytes, str, np.ndarray]  # encoding, blob, blob xxh3_64, reconstruction


@dataclass(frozen=True)
class Committed:
    """A save the pipeline committed: the chain's new head, its index entry, the wall
    time of its encode phase (first tensor started to last tensor encoded) and the busy
    seconds of each stage (``stages.SAVE_STAGES``)."""

    head: Reconstruction
    entry: IndexEntry
    encode_s: float
    stages: dict[str, float]


@dataclass
class _Progress:
    """Tensors of a save still to encode, and when the last one finished (monotonic s)."""

    remaining: int
    encoded_at_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    """What ``SavePipeline.plan`` decided for a save: base or delta, the head a delta is
    encoded against, and when encoding started (monotonic s)."""

    kind: str
    previous: Reconstruction | None
    progress: _Progress
    started_s: float


@dataclass(frozen=True)
class Written:
    """A save past its commit point: its manifest, index entry and reconstructed arrays."""

    manifest: Manifest
    entry: IndexEntry
    arrays: tuple[np.ndarray, ...]
    began_s: float  # perf_counter when the manifest's commit began


class SavePipeline:
    """Turns an accepted save into a committed step and the chain's next reconstruction."""

    def __init__(
        self,
        repository: Repository,
        config: EngineConfig,
        pools: Pools,
        *,
        fence: Callable[[Chain], Awaitable[Fence]] | None = None,
        recycle: Callable[[np.ndarray], None] | None = None,
        output: Callable[[int], np.ndarray | None] | None = None,
    ) -> None:
        """``fence(chain)`` returns the lease check a commit records (its generation,
        and the call made just before the manifest's put), or raises when this daemon no
        longer holds the chain (``ChainLeases.fence``); None: no leases.
        ``recycle(array)`` takes a received tensor no longer needed (a delta's, once
        encoded) for a later save's receive (``ReceiveBuffers.give_back``).
        ``output(nbytes)`` returns memory for a delta tensor's reconstruction, or None for
        a new array (``SpareOutputs.take``: a replaced head's, already mapped)."""
        self._repository = repository
        self._fence = fence
        self._recycle = recycle
        self._output = output
        self._storage = repository.storage
        self._config = config
        self._pools = pools
        self.base_coding = BaseCoding(config.base_compression)

    async def ensure_head(self, chain: Chain) -> None:
        """Makes ``chain.head`` the reconstruction of its latest committed step, restoring
        it from storage after a restart or a delete; an unrestorable head leaves None (the
        next save becomes a base instead of a delta against bad data)."""
        index = self._repository.index
        latest = index.latest(chain.run, chain.rank)
        if latest is not None and chain.head is not None and chain.head.step == latest:
            return
        chain.invalidate()
        if latest is None:
            return
        key = StepKey(chain.run, chain.rank, latest)
        plan = index.plan(key)
        try:
            arrays = await self._repository.restore(key)
        except CorruptCheckpointError as exc:
            log.error("cannot rebuild chain head; next save is a base %s",
                      step_fields(key, error=str(exc)))
            return
        chain.advance(Reconstruction.from_plan(plan, arrays))

    async def run(self, chain: Chain, save: QueuedSave) -> Committed:
        """Encodes, writes and commits ``save``; returns the chain's new head (the caller
        advances the chain to it). Raises whatever failed, after deleting the step's
        partial keys. A save whose tensors were encoded while it was received
        (``save.streamed``: ``ckptd.daemon.engine.streaming``) is only finished here."""
        if save.streamed is not None:
            return await save.streamed.finish()
        began = time.perf_counter()
        await self.ensure_head(chain)
        save.stages.add("head", time.perf_counter() - began)
        plan = self.plan(chain, save)
        try:
            await self.mark_pending(save.header.key)
            encoded = await self._encode_and_put(save, plan)
            written = await self.commit(chain, save, plan, encoded)
        except asyncio.CancelledError:
            raise  # shutting down: storage may hang, so leave the keys to the next start
        except BaseException as exc:
            await self.discard(save, exc)
            raise
        return await self.settle(save, plan, written)

    async def mark_pending(self, key: StepKey) -> None:
        """Puts the step's pending marker: before its first blob, so that a crash leaves a
        directory start-up can prove uncommitted."""
        await self._repository.mark_pending(key)

    def plan(self, chain: Chain, save: QueuedSave) -> Plan:
        """Chooses base or delta against ``chain.head`` (which must be ready: ``ensure_head``)
        and starts the save's encoding phase."""
        kind, why = choose_kind(chain.head, save.header.tensors, self._config)
        log.debug("encoding save %s", step_fields(save.header.key, kind=kind, why=why))
        save.state = SaveState.ENCODING
        previous = chain.head if kind == DELTA else None
        return Plan(kind, previous, _Progress(len(save.header.tensors)), time.monotonic())

    async def commit(
        self, chain: Chain, save: QueuedSave, plan: Plan,
        encoded: list[tuple[TensorEntry, np.ndarray]],
    ) -> Written:
        """Syncs the blobs of ``encoded`` (every tensor's, in table order), checks the lease
        and commits the manifest: the commit point. On a failure the caller discards the
        step's keys (``discard``); after it, the caller calls ``settle``."""
        stages, header = save.stages, save.header
        save.state = SaveState.WRITING
        entries = tuple(entry for entry, _ in encoded)
        arrays = tuple(array for _, array in encoded)
        specs = header.tensors
        # The blobs' one fsync batch runs while the codec pool hashes the tensors.
        keys = [entry.blob_key for entry in entries]
        _, checksum = await asyncio.gather(
            self._pools.run_io(stages.timed("sync", lambda: self._storage.sync(keys))),
            self._pools.run_codec(
                stages.timed("checksum", lambda: tensors_checksum(specs, arrays))),
        )
        self.base_coding.synced([entry.blob_bytes for entry in entries], stages.seconds()["sync"])
        fence = await self._fence(chain) if self._fence is not None else None
        manifest = self._manifest(save, plan.kind, plan.previous, entries, checksum,
                                  generation=fence.generation if fence is not None else 0)
        began = time.perf_counter()

        def before_put(step: int) -> None:  # in the storage thread, before the manifest's put
            if fence is not None:
                fence.before_put(step)  # a late put's lease check: raises when the lease is lost
            # Only from here may the put have created the manifest; a refusal above leaves
            # it to whoever holds the chain now, and ``discard`` must not delete theirs.
            save.commit_started = True

        entry = await self._repository.commit(manifest, before_put=before_put)
        return Written(manifest, entry, arrays, began)

    async def settle(self, save: QueuedSave, plan: Plan, written: Written) -> Committed:
        """After the commit point: removes the pending marker; the chain's next head."""
        await self._repository.clear_pending(save.header.key)
        save.stages.add("commit", time.perf_counter() - written.began_s)
        encode_s = (plan.progress.encoded_at_s or time.monotonic()) - plan.started_s
        head = _next_head(written.manifest, written.arrays, plan.previous)
        return Committed(head, written.entry, encode_s, save.stages.seconds())

    async def _encode_and_put(
        self, save: QueuedSave, plan: Plan
    ) -> list[tuple[TensorEntry, np.ndarray]]:
        calls = [functools.partial(self.tensor, save, i, plan) for i in range(len(save.arrays))]
        return await gather_bounded(calls, self._pools.blob_slots)

    async def tensor(
        self, save: QueuedSave, index: int, plan: Plan
    ) -> tuple[TensorEntry, np.ndarray]:
        """Encodes tensor ``index`` of ``save`` (codec pool), drops its received buffer and
        puts its blob (I/O pool); the caller holds one of ``Pools.blob_slots``."""
        previous, progress = plan.previous, plan.progress
        spec = save.header.tensors[index]
        current = save.arrays[index]
        assert current is not None
        reference = previous.arrays[index] if previous is not None else None
        compress = self.base_coding.compress()  # used only if the tensor is coded exactly
        out = self._output_for(spec, reference)
        if out is not None:
            save.recycled_bytes += out.nbytes
        job = functools.partial(_encode_tensor, spec, current, reference, self._config,
                                _Timing(save.stages, self.base_coding, compress), out=out)
        encoding, blob, digest, reconstruction = await self._pools.run_codec(job)
        save.arrays[index] = None  # the received bytes are no longer needed
        del job, out
        if (self._recycle is not None and encoding == DELTA
                and not np.may_share_memory(current, reconstruction)):
            self._recycle(current)  # a delta's head is other memory: nothing else holds these
        del current
        progress.remaining -= 1
        if progress.remaining == 0:
            progress.encoded_at_s = time.monotonic()
            save.state = SaveState.WRITING
        key = blob_key(save.header.key, index, save.blob_tag)
        put = functools.partial(_timed_put, self._storage, key, blob)
        spent_s = await self._pools.run_io(put)
        save.stages.add("write", spent_s)
        self.base_coding.written(len(blob), spent_s)
        return TensorEntry(spec, encoding, key, len(blob), digest), reconstruction

    def _output_for(self, spec: TensorSpec, reference: np.ndarray | None) -> np.ndarray | None:
        """Memory for the reconstruction of a tensor coded as a delta (None: exact, or none
        spare), viewed as the tensor's holder dtype."""
        if self._output is None or reference is None or not is_lossy(spec, self._config):
            return None
        memory = self._output(spec.nbytes)
        return None if memory is None else memory.view(spec.dtype_info.numpy)

    def _manifest(
        self,
        save: QueuedSave,
        kind: str,
        previous: Reconstruction | None,
        entries: tuple[TensorEntry, ...],
        checksum: str,
        *,
        generation: int,
    ) -> Manifest:
        key = save.header.key
        return Manifest(
            key=key,
            kind=kind,
            parent_step=previous.step if previous else None,
            base_step=previous.base_step if previous else key.step,
            chain_depth=previous.depth + 1 if previous else 0,
            created_unix_s=time.time(),
            metadata=dict(save.header.metadata),
            tensors=entries,
            checksum=checksum,
            metrics=dict(save.header.metrics),
            lease_generation=generation,
            world_size=save.header.world_size,
        )

    async def discard(self, save: QueuedSave, failure: BaseException) -> None:
        """Deletes the keys ``save`` may have written, the pending marker last. Its blobs
        carry its own tag, so they are never another writer's; the manifest is deleted
        only when this save may have created it: its put began and did not report that
        another writer's manifest was there (``StepExistsError``: that writer won the step,
        and its manifest and blobs stay)."""
        key = save.header.key
        keys = [blob_key(key, i, save.blob_tag) for i in range(len(save.header.tensors))]
        if save.commit_started and not isinstance(failure, StepExistsError):
            keys.insert(0, manifest_key(key))
        try:
            await self._pools.run_io(functools.partial(self._storage.delete, keys))
        except Exception as exc:
            log.warning("cannot remove keys of failed save; removed at next start %s",
                        step_fields(key, error=str(exc)))
            return  # the marker stays: it is what proves the rest uncommitted
        await self._repository.clear_pending(key)


@dataclass(frozen=True)
class _Timing:
    """Where one tensor's encode reports its seconds, and whether an exact blob is
    compressed (decided on the loop: ``BaseCoding.compress``)."""

    stages: StageTimes
    base_coding: BaseCoding
    compress: bool


def _encode_tensor(
    spec: TensorSpec, current: np.ndarray, reference: np.ndarray | None, config: EngineConfig,
    timing: _Timing, *, out: np.ndarray | None = None,
) -> Encoded:
    """Encodes one tensor (codec pool): exact without a reference or when the policy says
    so, else a lossy delta, whose reconstruction goes into ``out`` when given. Returns the
    blob and the tensor as a restore will rebuild it."""
    bfloat16 = spec.dtype_info.is_bfloat16
    began = time.perf_counter()
    if reference is None or not is_lossy(spec, config):
        blob = codec.encode_exact(current, bfloat16=bfloat16, compress=timing.compress)
        spent_s = time.perf_counter() - began
        timing.stages.add("encode_exact", spent_s)
        if timing.compress:
            timing.base_coding.coded(current.nbytes, len(blob), spent_s)
        return EXACT, blob, _blob_checksum(blob, timing.stages), current
    blob, reconstruction = codec.encode_delta(
        current,
        reference,
        bits=bits_for(spec, config),
        auto_max_error=config.auto_bits_max_error,
        auto_relative_to=cast(codec.AutoRelativeTo, config.auto_bits_relative_to),
        buckets_per_octave=buckets_for(spec, config),
        representative=cast(codec.Representative, config.representative),
        coder=cast(codec.Coder, config.coder),
        bfloat16=bfloat16,
        domain=cast(codec.Domain, domain_for(spec)),
        out=out,
    )
    timing.stages.add("encode_delta", time.perf_counter() - began)
    return DELTA, blob, _blob_checksum(blob, timing.stages), as_holder(reconstruction, spec)


def _timed_put(storage: Storage, key: str, blob: bytes) -> float:
    """Puts ``blob`` into the step's batch (I/O pool); returns the seconds it took."""
    began = time.perf_counter()
    storage.put_batched(key, blob)
    return time.perf_counter() - began


def _blob_checksum(blob: bytes, stages: StageTimes) -> str:
    return stages.timed("blob_checksum", lambda: blob_checksum(blob))()


def _next_head(
    manifest: Manifest, arrays: tuple[np.ndarray, ...], previous: Reconstruction | None
) -> Reconstruction:
    step, stored = manifest.key.step, manifest.stored_bytes
    if previous is None:
        return Reconstruction(
            step, manifest.specs, arrays, manifest.checksum,
            base_step=step, depth=0, base_stored_bytes=stored, delta_stored_bytes=0,
        )
    return Reconstruction(
        step, manifest.specs, arrays, manifest.checksum,
        base_step=previous.base_step,
        depth=previous.depth + 1,
        base_stored_bytes=previous.base_stored_bytes,
        delta_stored_bytes=previous.delta_stored_bytes + stored,
    )
