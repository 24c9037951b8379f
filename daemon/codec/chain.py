"""A chain's restore: several deltas applied to one array, chunk by chunk (``apply_deltas``).

Decoding the deltas one at a time (``decode_delta(..., in_place=True)`` each) makes ``k``
passes over the whole tensor, and each pass two: the symbols' float32 values written to a
chunk-sized buffer (a table lookup per packed byte), then read back and added. On a
tensor larger than the CPU caches every pass streams the tensor from memory again.

Here the outer loop is over chunks and the inner one over the deltas: a chunk of the array
(1 MiB of float32) stays in cache while every delta of the chain is applied to it, and
chunks run on several threads, so one huge tensor keeps every core busy. For the adaptive
zstd layout's packed chunks (what the encoder writes for all but mostly-zero deltas) a
compiled kernel reads each symbol straight from the entropy decoder's packed bytes
(``kernels.apply_packed``): no values buffer. Split chunks, other coders and the legacy
layouts go through their values, as ``decode_delta`` does: a kernel placing a split
chunk's symbols measured no faster than numpy's scatter on this machine.

The arithmetic is unchanged, element by element: delta ``j``'s scaled reference (scaled
domain), then ``reference (+) reps[symbol]`` rounded to the dtype, then delta ``j``'s
exceptions overwrite their elements, before delta ``j + 1`` touches the chunk. So the result
is bit for bit what ``decode_delta`` gives applied in turn
(``tests/codec/test_codec_chain_apply.py`` checks it for every domain, dtype and layout).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from . import chunks, domains, kernels, layouts, packing, scaled
from .delta import ParsedDelta, check_in_place, decode_delta, parse_delta
from .format import CODER_IDS, CodecError


class ChainError(CodecError):
    """Raised when delta ``position`` (0: the first applied) of a chain cannot be decoded."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


def apply_deltas(blobs: Sequence[bytes | memoryview], reference: np.ndarray, *,
                 in_place: bool = False, verified: bool = False,
                 out: np.ndarray | None = None) -> np.ndarray:
    """See ``ckptd.daemon.codec.apply_deltas``."""
    reference = np.asarray(reference)
    steps = []
    for position, blob in enumerate(blobs):
        with _naming(position):
            steps.append(_Step(parse_delta(blob, reference, verified=verified), position))
    if not steps:
        if in_place:
            return reference
        if out is None:
            return reference.copy()
        out = chunks.given_output(out, reference.dtype, reference.size, {"reference": reference})
        np.copyto(out, reference.reshape(-1))
        return out.reshape(reference.shape)
    holder = steps[0].parsed.header.dtype.holder
    source = reference.reshape(-1)  # a copy only if it is strided
    if in_place:
        with _naming(0):
            check_in_place(reference, steps[0].parsed.header.dtype)
        out = source
    elif out is not None:
        out = chunks.given_output(out, holder, reference.size, {"reference": reference})
    else:
        out = chunks.empty_output(reference.size, holder)
    if len({step.parsed.header.chunk_elems for step in steps}) > 1:
        # Never written so (the encoder's chunk size is a constant), but readable.
        np.copyto(out, source)
        for position, blob in enumerate(blobs):
            with _naming(position):
                decode_delta(blob, out, in_place=True)
        return out.reshape(reference.shape)
    parts = steps[0].parsed.parts
    pool = chunks.ScratchPool()

    def apply_chunk(i: int) -> None:
        scratch, chunk = pool.get(), out[parts[i]]
        if source is not out:  # the reference's chunk is copied in as the chain starts on it
            np.copyto(chunk, source[parts[i]])
        for step in steps:
            with _naming(step.position):
                step.apply(i, chunk, scratch)

    with chunks.mapper(len(parts)) as run:
        run(apply_chunk, range(len(parts)))
    return out.reshape(reference.shape)


class _Step:
    """One delta of the chain, applied chunk by chunk."""

    def __init__(self, parsed: ParsedDelta, position: int) -> None:
        header = parsed.header
        self.parsed = parsed
        self.position = position
        self._dtype_name = header.dtype.name
        self._log = header.domain == domains.LOG
        self._view_type = (kernels.PATTERNS if self._log else kernels.HOLDERS)[self._dtype_name]
        self._kernels = kernels.for_dtype(self._dtype_name, self._log)
        self._adaptive = (header.coder == CODER_IDS["zstd"]
                        and bytes(parsed.params) == bytes([layouts.ADAPTIVE]))
        self._values_of = None if self._adaptive else parsed.values_decoder()
        # Every byte value indexes it: a corrupt symbol reads a zero, then fails the check.
        self._reps = np.zeros(256, np.float32)
        self._reps[:parsed.reps.size] = parsed.reps
        self._split_table: packing.ValueTable | None = None
        self._ops = domains.Ops(header.domain, self._dtype_name)
        self._index, self._values = _ascending(parsed.index, parsed.values)

    def apply(self, i: int, chunk: np.ndarray, scratch: chunks.Scratch) -> None:
        """Applies this delta to chunk ``i`` (``chunk``: a view of the array's elements)."""
        parsed, part = self.parsed, self.parsed.parts[i]
        if parsed.header.domain == domains.SCALED:
            scaled.scale_reference(chunk, parsed.alpha, self._dtype_name, chunk)
        if self._values_of is not None:
            self._ops.add_values(self._values_of(i, scratch), chunk, chunk)
        else:
            self._apply_adaptive(i, chunk, scratch)
        lo, hi = np.searchsorted(self._index, (part.start, part.stop))
        if hi > lo:
            chunk[self._index[lo:hi] - part.start] = self._values[lo:hi]

    def _apply_adaptive(self, i: int, chunk: np.ndarray, scratch: chunks.Scratch) -> None:
        parsed, n = self.parsed, chunk.size
        bitmap, packed = layouts.adaptive_streams(parsed.bodies[i], n, parsed.header.bits,
                                                  scratch)
        bits = parsed.header.bits
        if bitmap is not None:  # mostly zeros: through their values (module docstring)
            if self._split_table is None:  # built once per delta (two threads may both)
                self._split_table = packing.ValueTable.build(parsed.reps, bits, lo=1)
            values = layouts.split_values(bitmap, packed, n, self._split_table, scratch)
            self._ops.add_values(values, chunk, chunk)
        elif not self._kernels.apply_packed(packed, n, bits, self._reps,
                                            chunk.view(self._view_type)):
            raise CodecError(f"corrupt blob: chunk {i} holds a symbol outside "
                             f"0..{(1 << bits) - 1} (b = {bits})")


@contextmanager
def _naming(position: int) -> Iterator[None]:
    """Turns a ``CodecError`` of delta ``position`` into a ``ChainError`` naming it."""
    try:
        yield
    except ChainError:
        raise
    except CodecError as exc:
        raise ChainError(position, str(exc)) from exc


def _ascending(index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exceptions in ascending order, as the encoder writes them; a blob that lists
    them otherwise is sorted (stably: where an index repeats, the last one listed still
    wins, as in ``decode_delta``'s assignment)."""
    if index.size < 2 or bool(np.all(index[1:] > index[:-1])):
        return index, values
    order = np.argsort(index, kind="stable")
    return index[order], values[order]
