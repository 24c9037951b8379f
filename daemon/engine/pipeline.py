"""The save pipeline of one chain: encoding → writing → committed (or failed, cleaned up).

Called by the engine's per-chain worker, under ``Chain.lock``, one save at a time in step
order. For each tensor: encode it in the codec pool (an exact blob, or a lossy delta
against the head reconstruction), drop the received buffer, put the blob from the I/O
pool; tensors run concurrently up to the pools' width, a bound shared with every other
chain's saves (``Pools.blob_slots``). Before the first blob, the step's ``pending``
marker is put, so that a crash leaves a directory start-up can prove uncommitted; when
every blob is durable, the manifest is put — the commit point — then the marker removed,
and only then does the chain's head move on. On any failure the step's keys are deleted,
the marker last (best effort; a restart removes what is left), and the head stays at the
previous step, so the next save works as if this one never happened.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import cast

import numpy as np
from ckptd.daemon import codec
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import StepKey, TensorSpec
from ckptd.daemon.engine.chain import Chain, QueuedSave, Reconstruction, choose_kind
from ckptd.daemon.engine.validation import bits_for, domain_for, is_lossy
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.daemon.logs import get_logger, step_fields
from ckptd.daemon.pools import Pools, gather_bounded
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
    """A save the pipeline committed: the chain's new head, its index entry, and the wall
    time of its encode phase (first tensor started to last tensor encoded)."""

    head: Reconstruction
    entry: IndexEntry
    encode_s: float


@dataclass
class _Progress:
    """Tensors of a save still to encode, and when the last one finished (monotonic s)."""

    remaining: int
    encoded_at_s: float = 0.0


class SavePipeline:
    """Turns an accepted save into a committed step and the chain's next reconstruction."""

    def __init__(self, repository: Repository, config: EngineConfig, pools: Pools) -> None:
        self._repository = repository
        self._storage = repository.storage
        self._config = config
        self._pools = pools

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
        partial keys."""
        await self.ensure_head(chain)
        header = save.header
        kind, why = choose_kind(chain.head, header.tensors, self._config)
        log.debug("encoding save %s", step_fields(header.key, kind=kind, why=why))
        previous = chain.head if kind == DELTA else None
        save.state = SaveState.ENCODING
        started_s = time.monotonic()
        progress = _Progress(len(save.arrays))
        try:
            await self._repository.mark_pending(header.key)
            encoded = await self._encode_and_put(save, previous, progress)
            save.state = SaveState.WRITING
            entries = tuple(entry for entry, _ in encoded)
            arrays = tuple(array for _, array in encoded)
            specs = header.tensors
            checksum = await self._pools.run_codec(lambda: tensors_checksum(specs, arrays))
            manifest = self._manifest(save, kind, previous, entries, checksum)
            entry = await self._repository.commit(manifest)
        except asyncio.CancelledError:
            raise  # shutting down: storage may hang, so leave the keys to the next start
        except BaseException:
            await self._discard(header.key, len(header.tensors))
            raise
        await self._repository.clear_pending(header.key)
        encode_s = (progress.encoded_at_s or time.monotonic()) - started_s
        return Committed(_next_head(manifest, arrays, previous), entry, encode_s)

    async def _encode_and_put(
        self, save: QueuedSave, previous: Reconstruction | None, progress: _Progress
    ) -> list[tuple[TensorEntry, np.ndarray]]:
        calls = [
            functools.partial(self._tensor, save, i, previous, progress)
            for i in range(len(save.arrays))
        ]
        return await gather_bounded(calls, self._pools.blob_slots)

    async def _tensor(
        self, save: QueuedSave, index: int, previous: Reconstruction | None, progress: _Progress
    ) -> tuple[TensorEntry, np.ndarray]:
        spec = save.header.tensors[index]
        current = save.arrays[index]
        assert current is not None
        reference = previous.arrays[index] if previous is not None else None
        job = functools.partial(_encode_tensor, spec, current, reference, self._config)
        del current
        encoding, blob, digest, reconstruction = await self._pools.run_codec(job)
        save.arrays[index] = None  # the received bytes are no longer needed
        del job
        progress.remaining -= 1
        if progress.remaining == 0:
            progress.encoded_at_s = time.monotonic()
            save.state = SaveState.WRITING
        key = blob_key(save.header.key, index)
        await self._pools.run_io(functools.partial(self._storage.put, key, blob))
        return TensorEntry(spec, encoding, key, len(blob), digest), reconstruction

    def _manifest(
        self,
        save: QueuedSave,
        kind: str,
        previous: Reconstruction | None,
        entries: tuple[TensorEntry, ...],
        checksum: str,
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
        )

    async def _discard(self, key: StepKey, tensors: int) -> None:
        keys = [manifest_key(key)] + [blob_key(key, i) for i in range(tensors)]
        try:
            await self._pools.run_io(functools.partial(self._storage.delete, keys))
        except Exception as exc:
            log.warning("cannot remove keys of failed save; removed at next start %s",
                        step_fields(key, error=str(exc)))
            return  # the marker stays: it is what proves the rest uncommitted
        await self._repository.clear_pending(key)


def _encode_tensor(
    spec: TensorSpec, current: np.ndarray, reference: np.ndarray | None, config: EngineConfig
) -> Encoded:
    """Encodes one tensor (codec pool): exact without a reference or when the policy says
    so, else a lossy delta. Returns the blob and the tensor as a restore will rebuild it."""
    bfloat16 = spec.dtype_info.is_bfloat16
    if reference is None or not is_lossy(spec, config):
        blob = codec.encode_exact(current, bfloat16=bfloat16)
        return EXACT, blob, blob_checksum(blob), current
    blob, reconstruction = codec.encode_delta(
        current,
        reference,
        bits=bits_for(spec, config),
        auto_max_error=config.auto_bits_max_error,
        representative=cast(codec.Representative, config.representative),
        coder=cast(codec.Coder, config.coder),
        bfloat16=bfloat16,
        domain=cast(codec.Domain, domain_for(spec)),
    )
    return DELTA, blob, blob_checksum(blob), as_holder(reconstruction, spec)


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
