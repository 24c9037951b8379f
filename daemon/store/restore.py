"""Restore plans: the nearest base at or below a step, then each delta up to it.

Restore works tensor by tensor (so it holds one checkpoint plus one tensor's blobs, not
the whole chain): read that tensor's blobs from its last exact one on (its base, or a
later step that stored it exactly: the blobs before it do not contribute) in the I/O
pool, verify each blob's xxh3_64 against its manifest, then decode and apply them in the
codec pool. Once every tensor is rebuilt, the xxh3_128 of the result must equal the target
manifest's checksum; any mismatch raises ``CorruptCheckpointError`` naming the step and
blob, never returning a wrong tensor.

``stream`` is the same work handed over tensor by tensor, in table order, for a transport
that writes each array out while the next are read and decoded (a restore into shared
memory): blobs read into reused buffers, raw bases not copied and not hashed on their way
(the step's checksum covers their bytes; ``check_blobs`` names the blob after a
mismatch), the checksum folded in as the arrays pass."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import numpy as np
from ckptd.daemon import codec
from ckptd.daemon.domain import TensorSpec
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.daemon.pools import Pools, gather_bounded
from ckptd.daemon.storage.base import KeyNotFoundError, Storage
from ckptd.daemon.store.manifest import (
    EXACT,
    Manifest,
    TensorEntry,
    blob_checksum,
    tensors_checksum,
)
from ckptd.protos.checksum import TensorsChecksum

# ``stream`` hashes an array this small on the event loop (xxh3: ~0.1 ms per MiB).
INLINE_HASH_BYTES = 1 << 20


class MissingBlobError(CorruptCheckpointError):
    """Raised when a blob named by a committed manifest is absent (maybe deleted meanwhile)."""

    reason = "ERROR_REASON_DATA_MISSING"


class Restorer:
    """Rebuilds steps from storage, or serves views of an in-memory reconstruction."""

    def __init__(
        self,
        storage: Storage,
        pools: Pools,
    ) -> None:
        self._storage = storage
        self._run_io = pools.run_io
        self._run_codec = pools.run_codec
        self._width = pools.width

    async def restore(self, plan: list[Manifest]) -> tuple[np.ndarray, ...]:
        """Decodes ``plan`` (base first, target last) into verified arrays."""
        target = plan[-1]
        _check_tables(plan)
        calls = [
            functools.partial(self._restore_tensor, plan, i) for i in range(len(target.tensors))
        ]
        arrays = await gather_bounded(calls, self._width)
        await self.verify(target, arrays)
        return tuple(arrays)

    async def stream(
        self, plan: list[Manifest], checksum: TensorsChecksum, start: int = 0
    ) -> AsyncIterator[np.ndarray]:
        """Yields the arrays of ``plan``'s target from tensor ``start`` on, in table order,
        each as soon as it and those before it are rebuilt; an array is valid only until
        the next one is asked for (its memory is then reused).

        Up to ``width`` tensors are read and decoded ahead of the one the caller is
        consuming, so a caller that writes each array out (a restore into shared memory)
        overlaps its write with the next tensors' reads and decodes, and only those few
        tensors are alive at once instead of the whole step. Blobs are read into buffers
        reused from tensor to tensor (``Storage.read_into``: no fresh pages per blob), and
        a raw base blob is handed over as a view of its buffer (``codec.raw_view``), not
        decoded into a copy. For each tensor only the blobs from its last exact one on are
        read (``_from_last_exact``). Every delta blob and every compressed exact one is
        checked against its manifest before it is decoded; a raw exact one's header is
        checked and its bytes are left to the step's checksum, which covers them (one
        pass over them fewer; after a mismatch ``check_blobs`` names the blob). Each array
        is folded into ``checksum``, in table order, in the I/O pool while the caller
        writes it out (not queued behind the codec pool's decodes of later tensors), and
        that fold ends before the next array is yielded; comparing the digest with the
        manifest's once all arrays passed is the caller's, who may have resumed a stream
        at ``start`` on a new plan. Closing the iterator early cancels the tensors not
        started and waits for the running ones.
        """
        _check_tables(plan)
        count = len(plan[-1].tensors)
        buffers = _Buffers()
        pending: dict[int, asyncio.Future[tuple[np.ndarray, list[np.ndarray]]]] = {}
        upcoming = iter(range(start, count))
        folding: asyncio.Future[None] | None = None
        try:
            for index in range(start, count):
                while len(pending) < self._width and (ahead := next(upcoming, None)) is not None:
                    pending[ahead] = asyncio.ensure_future(
                        self._stream_tensor(plan, ahead, buffers))
                array, held = await pending.pop(index)
                spec = plan[-1].tensors[index].spec
                fold = functools.partial(_fold, checksum, spec, array)
                if array.nbytes <= INLINE_HASH_BYTES:
                    fold()  # microseconds: cheaper than a hop to a pool
                else:
                    folding = asyncio.ensure_future(self._run_io(fold))
                yield array
                if folding is not None:
                    # Before the buffers are reused and before the next fold (table order).
                    await folding
                    folding = None
                buffers.give_back(held)
        finally:
            waits: list[asyncio.Future[Any]] = [*pending.values()]
            for future in waits:
                future.cancel()
            if folding is not None:
                waits.append(folding)
            if waits:
                await asyncio.wait(waits)
                for future in waits:
                    if not future.cancelled():
                        future.exception()  # retrieved: the first failure is what is raised

    async def _stream_tensor(
        self, plan: list[Manifest], index: int, buffers: _Buffers
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One tensor for ``stream``: its array and the buffers it holds until consumed.

        Its first blob (an exact one), when raw, is not hashed here: its header is checked
        and its payload is the tensor's bytes (or the chain's reference) that the step's
        checksum covers; a mismatch there makes ``check_blobs`` hash it to name it."""
        entries = _from_last_exact(plan, index)
        held = [buffers.take(entry.blob_bytes + 1) for _, entry in entries]
        # A chain's result goes into a reused buffer too (not fresh pages per tensor).
        out = buffers.take(entries[0][1].spec.nbytes) if len(entries) > 1 else None
        held += [] if out is None else [out]
        try:
            blobs = await self._run_io(lambda: [
                self._read_blob_into(m, e, b, trust_raw=i == 0)
                for i, ((m, e), b) in enumerate(zip(entries, held, strict=False))])
            array = await self._run_codec(lambda: _apply(entries, blobs, raw_view=True,
                                                         out=out))
        except BaseException:
            buffers.give_back(held)
            raise
        return array, held

    @staticmethod
    def head_views(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Read-only views of an in-memory head reconstruction, served without a copy.

        Not hashed again: a head was verified when it became the head (its manifest's
        checksum was computed from these very arrays by the save, or ``restore`` checked
        them), a chain never writes arrays anything else refers to (a replaced head's
        memory is reused only once no view of it is left: ``engine.recycle``), and
        every restore is verified end to end by its client against that checksum. So the
        head may be evicted or replaced while a restore still sends them; the views keep
        them alive, and a caller that writes into one gets an error, not a damaged head.
        """
        return tuple(_read_only(array) for array in arrays)

    async def verify(self, manifest: Manifest, arrays: Sequence[np.ndarray]) -> None:
        specs = manifest.specs
        actual = await self._run_codec(lambda: tensors_checksum(specs, arrays))
        if actual != manifest.checksum:
            raise CorruptCheckpointError(
                f"step {manifest.key} reconstructs to checksum {actual}, but its manifest "
                f"records {manifest.checksum}"
            )

    async def check_blobs(self, plan: list[Manifest]) -> None:
        """Reads and hashes every blob a restore of ``plan``'s target uses (for each tensor,
        from its last exact blob on) against its manifest; raises ``CorruptCheckpointError``
        naming the first that fails. ``stream`` does not hash a raw exact blob (the step's
        checksum covers its payload): after a step checksum mismatch, this names the blob."""
        calls = [functools.partial(self._run_io, functools.partial(self._check_tensor, plan, i))
                 for i in range(len(plan[-1].tensors))]
        await gather_bounded(calls, self._width)

    def _check_tensor(self, plan: list[Manifest], index: int) -> None:
        for manifest, entry in _from_last_exact(plan, index):
            self._read_blob(manifest, entry)

    async def _restore_tensor(self, plan: list[Manifest], index: int) -> np.ndarray:
        entries = _from_last_exact(plan, index)
        blobs = await self._run_io(lambda: [self._read_blob(m, e) for m, e in entries])
        return await self._run_codec(lambda: _apply(entries, blobs))

    def _read_blob(self, manifest: Manifest, entry: TensorEntry) -> bytes:
        try:
            blob = self._storage.get(entry.blob_key)
        except KeyNotFoundError as exc:
            raise _missing(manifest, entry) from exc
        _check_blob(manifest, entry, blob)
        return blob

    def _read_blob_into(
        self, manifest: Manifest, entry: TensorEntry, buffer: np.ndarray, *,
        trust_raw: bool = False,
    ) -> memoryview:
        """``_read_blob`` into ``buffer`` (one byte longer than the blob, to tell a longer
        object apart); returns the view of the blob's bytes. ``trust_raw``: a raw exact
        blob's size and header are checked, its bytes not hashed (the caller's step
        checksum covers them)."""
        view = buffer.data
        try:
            got = self._storage.read_into(entry.blob_key, view)
        except KeyNotFoundError as exc:
            raise _missing(manifest, entry) from exc
        if not (trust_raw and got == entry.blob_bytes and _is_raw(view[:got])):
            _check_blob(manifest, entry, view[:got])
        return view[:got]


def _missing(manifest: Manifest, entry: TensorEntry) -> MissingBlobError:
    return MissingBlobError(
        f"step {manifest.key}: blob {entry.blob_key} of tensor {entry.spec.name!r} "
        "is missing from storage"
    )


def _from_last_exact(plan: list[Manifest], index: int) -> list[tuple[Manifest, TensorEntry]]:
    """Tensor ``index``'s blobs along ``plan`` from its last exact one on: that one (its
    base, or a later step that stored it exactly) is decoded, every delta after it applied;
    blobs before it do not contribute, so they are neither read nor hashed."""
    entries = [(m, m.tensors[index]) for m in plan]
    start = max((i for i, (_, e) in enumerate(entries) if e.encoding == EXACT), default=None)
    if start is None:
        manifest, entry = entries[0]
        raise CorruptCheckpointError(
            f"step {manifest.key}: blob {entry.blob_key} of tensor {entry.spec.name!r} is a "
            "delta with no base to apply to"
        )
    return entries[start:]


def _is_raw(blob: memoryview) -> bool:
    """Whether ``blob`` is a raw exact blob with a sound header (``codec.raw_view``)."""
    try:
        return codec.raw_view(blob) is not None
    except codec.CodecError:
        return False  # hashed then, and named as failing its checksum


def _check_blob(manifest: Manifest, entry: TensorEntry, blob: bytes | memoryview) -> None:
    if len(blob) != entry.blob_bytes or blob_checksum(blob) != entry.blob_xxh3_64:
        raise CorruptCheckpointError(
            f"step {manifest.key}: blob {entry.blob_key} of tensor {entry.spec.name!r} "
            f"fails its checksum ({len(blob)} bytes, manifest says {entry.blob_bytes} "
            f"bytes with xxh3_64 {entry.blob_xxh3_64})"
        )


class _Buffers:
    """Blob buffers of one ``stream``, reused from tensor to tensor (touched pages stay)."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []

    def take(self, nbytes: int) -> np.ndarray:
        """The smallest free buffer of at least ``nbytes``, else a new one; a free one too
        small is dropped then, so there are never more buffers than are held at once."""
        sizes = [buffer.nbytes for buffer in self._free]
        fitting = [i for i, size in enumerate(sizes) if size >= nbytes]
        if fitting:
            return self._free.pop(min(fitting, key=sizes.__getitem__))
        if self._free:
            self._free.pop(max(range(len(sizes)), key=sizes.__getitem__))
        return np.empty(nbytes, np.uint8)

    def give_back(self, buffers: list[np.ndarray]) -> None:
        self._free.extend(buffers)


def _check_tables(plan: list[Manifest]) -> None:
    for earlier, later in itertools.pairwise(plan):
        if earlier.specs != later.specs:
            raise CorruptCheckpointError(
                f"step {later.key} is a delta against step {earlier.key.step}, but their "
                "tensor tables differ"
            )


def _fold(checksum: TensorsChecksum, spec: TensorSpec, array: np.ndarray) -> None:
    flat = array.reshape(-1).view(np.uint8)
    checksum.begin(spec.name, spec.dtype, spec.shape, flat.nbytes)
    checksum.update(flat.data)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _apply(
    entries: list[tuple[Manifest, TensorEntry]], blobs: Sequence[bytes | memoryview], *,
    raw_view: bool = False, out: np.ndarray | None = None,
) -> np.ndarray:
    """Decodes ``entries[0]``, the tensor's last exact blob (``_from_last_exact``), then
    applies every delta after it in one ``codec.apply_deltas`` (runs in the codec pool);
    with ``raw_view``, the exact blob when it is the last and raw comes back as a
    read-only view of the blob instead of a copy. ``out``: bytes (at least the tensor's)
    that a chain on a raw base writes its result into, instead of a new array."""
    spec, last = entries[0][1].spec, len(entries) == 1
    with _decoding(entries[0]):
        # A raw base is read through a view of its blob: the chain's first chunk-by-chunk
        # pass copies it out (its header checked; its bytes against its manifest, or, in
        # ``stream``, by the step's checksum).
        view = codec.raw_view(blobs[0]) if raw_view or not last else None
        if view is not None and last:
            return as_holder(view, spec)
        array = as_holder(codec.decode_exact(blobs[0]) if view is None else view, spec)
    if last:
        return array
    try:
        # A decoded base is this call's own array: the deltas overwrite it (one buffer for
        # the whole chain).
        in_place = view is None and _writeable(array)
        target = None if in_place or out is None else out[:spec.nbytes].view(array.dtype)
        applied = codec.apply_deltas(blobs[1:], array, in_place=in_place, verified=True,
                                     out=target)
    except codec.ChainError as exc:
        raise _undecodable(entries[1 + exc.position], exc) from exc
    with _decoding(entries[-1]):
        return as_holder(applied, spec)


@contextlib.contextmanager
def _decoding(at: tuple[Manifest, TensorEntry]) -> Iterator[None]:
    """Reports a codec error of the blob ``at`` as a corrupt checkpoint naming it."""
    try:
        yield
    except (codec.CodecError, ValueError) as exc:
        raise _undecodable(at, exc) from exc


def _undecodable(at: tuple[Manifest, TensorEntry], exc: Exception) -> CorruptCheckpointError:
    manifest, entry = at
    return CorruptCheckpointError(
        f"step {manifest.key}: blob {entry.blob_key} of tensor {entry.spec.name!r} "
        f"cannot be decoded: {exc}"
    )


def _writeable(array: np.ndarray) -> bool:
    return bool(array.flags.writeable and array.flags.c_contiguous)


def as_holder(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Checks that a codec result is ``spec``'s tensor: holder dtype, shape, C order."""
    holder = spec.dtype_info.numpy
    if array.dtype != holder or array.size != spec.numel:
        raise ValueError(
            f"codec returned {array.dtype} with {array.size} elements for tensor "
            f"{spec.name!r}, expected {holder} with {spec.numel}"
        )
    return np.ascontiguousarray(array).reshape(spec.shape)
