"""The delta codec's per-element work as compiled, fused loops (numba).

numpy took about ten passes over a chunk for one delta (subtract, bucket keys, a scatter for
the statistics, a gather for the symbols, another for the values, the addition, the
rounding, the exception checks), each a round trip through memory and numpy's per-call
setup. Each kernel here is one loop that does a whole pass per element:

* ``analyze`` (encode pass 1): the float32 delta in the tensor's domain and the per-key
  statistics (count and mantissa sum for "mean", minimum and maximum for "midrange").
* ``encode_chunk`` (encode pass 2): key -> symbol, the reconstruction, the exceptions.
* ``add_values`` (decode): ``ref (+) values`` rounded to the dtype (``add_values_in_place``
  when the output is the reference).
* ``split_symbols`` (encode, the adaptive layout's split mode): the zero/non-zero bitmap
  and the non-zero symbols of a chunk, one pass.
* ``apply_packed`` (a chain's restore, ``chain``): the same addition in place, reading
  each symbol straight from the entropy decoder's packed bytes (the adaptive layout's
  packed mode) instead of from a float32 array of its values: one pass over the chunk
  instead of a table lookup writing 4 bytes an element and a second pass reading them.

The arithmetic is the format's (``format``, ``domains``): float16/bfloat16 widen exactly to
float32, add there and round to nearest even (float16 by its bit pattern: numba has no
float16 arithmetic); float64 subtracts in float64 and rounds the delta to float32; the log
domain works on the integer bit patterns. That per-element arithmetic is
``elementwise``'s; encode and decode both end in its ``store``, so a decode returns the
encoder's reconstruction bit for bit. ``tests/codec/codec_oracle.py``
holds the numpy implementation these replaced; the tests check both give the same bytes.

Every kernel is ``nogil``: ``chunks.mapper``'s threads run chunks on several cores.
Compiled code is cached on disk (``cache=True``, next to this file or in the user's cache
directory); where no location is writable the kernels compile in every process (seconds
of CPU for all of them) instead of failing. ``warm_up`` compiles or loads every
kernel the codec uses; the daemon runs it in a background thread at start.

Each dtype and domain has its own compiled set (``for_dtype``: the dtype and domain are
constants in it, so the other branches fold away). Arrays arrive as float32/float64 for
those dtypes, uint16 words for float16 and bfloat16, and in the log domain as the signed
integer view of each (``PATTERNS``).
"""

# numba compiles positional parameters only (no keyword-only ones): the kernels take many.
# ruff: noqa: PLR0917

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .elementwise import (
    F32,
    F64,
    KINDS,
    bits_of,
    delta_of,
    inline,
    jit,
    log_add,
    log_step,
    store,
    widen,
)

# The statistics are accumulated in LANES interleaved tables: consecutive elements mostly
# hit the same key, and one table would make every update wait for the previous one.
LANES = 4
NKEYS = 512


@inline
def tally(lane: int, key: Any, u: Any, d: Any, mean: bool, counts: Any, sums: Any, lo: Any,
          hi: Any) -> None:
    """Pass 1's statistics of one element: its key's count and mantissa sum ("mean") or
    minimum and maximum ("midrange"), in table ``lane``."""
    counts[lane, key] += 1
    if mean:
        sums[lane, key] += np.uint64(u & 0x7FFFFF)
    else:
        lo[lane, key] = min(lo[lane, key], d)
        hi[lane, key] = max(hi[lane, key], d)


@dataclass(frozen=True)
class Kernels:
    """The kernels of one dtype and domain (see the module docstring).

    ``analyze(cur, ref, mean, counts, sums, lo, hi)``: encode pass 1 over a chunk; adds its
    per-key statistics to ``counts`` (int64) and ``sums`` (uint64 mantissa sums, "mean") or
    ``lo``/``hi`` (float32, "midrange"), each ``(LANES, 512)``.

    ``encode_chunk(cur, ref, out, lut, reps, symbols, index) -> count``: encode pass 2; the
    uint8 ``symbols`` and the reconstruction into ``out``. An element is an exception when
    its delta is non-finite, its reconstruction is, or (log domain) it is zero and its
    reconstruction is not, or its reconstruction's pattern is more than
    ``LOG_MAX_ERROR_OCTAVES`` from its own (``domains``): ``out`` then holds ``cur`` and its
    position goes into ``index`` (ascending); returns how many.

    ``add_values(values, ref, out)``: decode, ``out = ref (+) values``;
    ``add_values_in_place(values, out)`` the same with ``ref`` being ``out`` (a chain's
    restore). Its own loop: with two arrays that overlap exactly, the compiled loop's
    aliasing check fails and it runs one element at a time, without SIMD.

    ``scale(ref, factor, out)`` (linear kernels; the scaled domain's reference):
    ``out = ref (+) float32(widen(ref) * factor)``, the arithmetic of ``add_values`` with
    those values; ``out`` may be ``ref``.

    ``apply_packed(packed, n, bits, reps, out) -> ok``: ``out[i] = out[i] (+) reps[symbol
    i]`` for ``n`` b-bit symbols packed whole into bytes (``packing``), the arithmetic of
    ``add_values_in_place`` element for element. ``reps`` must have an entry for every
    value a field can hold (256 is always enough), so a corrupt symbol reads a defined
    value; ``ok`` is False when a symbol was 2^b or above, and then ``out`` holds garbage.
    """

    analyze: Callable[..., None]
    encode_chunk: Callable[..., int]
    add_values: Callable[..., None]
    add_values_in_place: Callable[..., None]
    apply_packed: Callable[..., bool]
    scale: Callable[..., None]


def _build(kind: int, log: bool, limit: int, max_step: int) -> Kernels:
    """Kernels with ``kind``, ``log``, ``limit`` and ``max_step`` (the log domain's error
    bound in pattern steps) compiled in as constants: the branches of
    the other dtypes and domain fold away (measured: a runtime switch per element made
    pass 2 markedly slower)."""

    @jit
    def analyze(cur: Any, ref: Any, mean: bool, counts: Any, sums: Any, lo: Any,
                hi: Any) -> None:
        for i in range(cur.size):
            d = delta_of(cur[i], ref[i], kind, log, limit)
            u = bits_of(d)
            tally(i & (LANES - 1), u >> 23, u, d, mean, counts, sums, lo, hi)

    @jit
    def encode_chunk(cur: Any, ref: Any, out: Any, lut: Any, reps: Any, symbols: Any,
                     index: Any) -> int:
        if log:
            return _encode_log(cur, ref, out, lut, reps, symbols, index, limit, max_step)
        count = 0
        for i in range(cur.size):
            c = cur[i]
            key = bits_of(delta_of(c, ref[i], kind, log, limit)) >> 23
            symbol = lut[key]
            symbols[i] = symbol
            bad = store(out, i, reps[symbol], ref[i], kind, log, limit)
            if (key & 0xFF) == 0xFF or bad:
                out[i] = c
                index[count] = i
                count += 1
        return count

    @jit
    def add_values(values: Any, ref: Any, out: Any) -> None:
        for i in range(values.size):
            store(out, i, values[i], ref[i], kind, log, limit)

    @jit
    def add_values_in_place(values: Any, out: Any) -> None:
        for i in range(values.size):
            store(out, i, values[i], out[i], kind, log, limit)

    @jit
    def scale(ref: Any, factor: Any, out: Any) -> None:
        for i in range(ref.size):
            r = ref[i]
            w = np.float32(r) if kind in (F32, F64) else widen(r, kind)
            store(out, i, np.float32(w * factor), r, kind, False, limit)

    return Kernels(analyze, encode_chunk, add_values, add_values_in_place,
                   _build_chain(kind, log, limit), scale)


@inline
def _encode_log(cur: Any, ref: Any, out: Any, lut: Any, reps: Any, symbols: Any, index: Any,
                limit: int, max_step: int) -> int:
    """``encode_chunk`` in the log domain: each symbol's integer step is rounded once
    (``log_step``, as ``store`` rounds it per element), not per element."""
    steps = np.empty(reps.size, np.int64)
    for s in range(reps.size):
        steps[s] = log_step(reps[s], limit)
    count = 0
    for i in range(cur.size):
        c = cur[i]
        r = ref[i]
        key = bits_of(delta_of(c, r, F32, True, limit)) >> 23
        symbol = lut[key]
        symbols[i] = symbol
        rec = log_add(r, steps[symbol], limit)
        if (key & 0xFF) == 0xFF or (c == 0 and rec != 0) or abs(rec - np.int64(c)) > max_step:
            rec = c
            index[count] = i
            count += 1
        out[i] = rec
    return count


def _build_chain(kind: int, log: bool, limit: int) -> Callable[..., bool]:
    """``apply_packed`` with ``_build``'s constants."""

    @jit
    def apply_packed(packed: Any, n: int, bits: int, reps: Any, out: Any) -> bool:
        shift, width = _packing(bits)
        whole = n >> shift
        # One branch per packing, so the loop over a byte's symbols has a constant count.
        if shift == 0:
            seen = _apply_bytes(packed, whole, 1, 8, reps, out, kind, log, limit)
        elif shift == 1:
            seen = _apply_bytes(packed, whole, 2, 4, reps, out, kind, log, limit)
        elif shift == 2:
            seen = _apply_bytes(packed, whole, 4, 2, reps, out, kind, log, limit)
        else:
            seen = _apply_bytes(packed, whole, 8, 1, reps, out, kind, log, limit)
        for i in range(whole << shift, n):
            symbol = _field(packed, i, shift, width)
            seen |= symbol
            store(out, i, reps[symbol], out[i], kind, log, limit)
        return (seen & _high_bits(bits, shift, width)) == 0

    return apply_packed


@inline
def _packing(bits: int) -> tuple[int, int]:
    """(log2 of symbols per byte, bits per field) of b-bit symbols, as ``packing`` packs
    them: 8 symbols a byte for b = 1, 4 for b = 2, 2 for b = 3..4, 1 for b >= 5."""
    if bits == 1:
        return 3, 1
    if bits == 2:
        return 2, 2
    if bits <= 4:
        return 1, 4
    return 0, 8


@inline
def _field(packed: Any, i: int, shift: int, width: int) -> Any:
    """Symbol ``i`` of a packed stream."""
    return (np.int64(packed[i >> shift]) >> ((i & ((1 << shift) - 1)) * width)) & (
        (1 << width) - 1)


@inline
def _high_bits(bits: int, shift: int, width: int) -> int:
    """The bits of a packed byte that no symbol below 2^bits sets."""
    high = 0
    for t in range(1 << shift):
        high |= (((1 << width) - 1) & ~((1 << bits) - 1)) << (t * width)
    return high


@inline
def _apply_bytes(packed: Any, nbytes: int, per_byte: int, width: int, reps: Any, out: Any,
                 kind: int, log: bool, limit: int) -> int:
    """``apply_packed`` over whole bytes; the OR of the bytes (to check the symbols')."""
    mask = (1 << width) - 1
    seen = 0
    for j in range(nbytes):
        byte = np.int64(packed[j])
        seen |= byte
        for t in range(per_byte):
            i = j * per_byte + t
            store(out, i, reps[(byte >> (t * width)) & mask], out[i], kind, log, limit)
    return seen


@jit
def split_symbols(symbols: Any, bitmap: Any, nonzero: Any) -> int:
    """The split layout's streams before packing (``layouts``), in one pass: ``bitmap`` bit i
    (LSB first, ``ceil(n / 8)`` bytes) is ``symbols[i] != 0``, and the non-zero symbols in
    order go to the front of ``nonzero`` (``n`` bytes); returns how many there are.

    Replaces ``np.packbits`` + ``np.compress`` (the latter ~1 ns an element). Branch-free,
    so the zero/non-zero pattern costs no mispredictions: every symbol is stored at the
    next free place, which only a non-zero one takes.
    """
    n = symbols.size
    count = 0
    for j in range(n >> 3):
        byte = 0
        for t in range(8):
            s = symbols[(j << 3) + t]
            nz = np.int64(s != 0)
            byte |= nz << t
            nonzero[count] = s
            count += nz
        bitmap[j] = byte
    if n & 7:
        byte = 0
        for i in range(n & ~7, n):
            s = symbols[i]
            nz = np.int64(s != 0)
            byte |= nz << (i & 7)
            nonzero[count] = s
            count += nz
        bitmap[n >> 3] = byte
    return count


# What the kernels take for each dtype (float16 as its words: numba has no float16), its
# signed view (log domain), and the pattern of +Inf.
HOLDERS: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<u2"),
                                "bfloat16": np.dtype("<u2"), "float64": np.dtype("<f8")}
PATTERNS: dict[str, np.dtype] = {"float32": np.dtype("<i4"), "float16": np.dtype("<i2"),
                                 "bfloat16": np.dtype("<i2"), "float64": np.dtype("<i8")}
INF_PATTERNS = {"float32": 0x7F800000, "float16": 0x7C00, "bfloat16": 0x7F80,
                "float64": 0x7FF0000000000000}
# The log domain stores an element verbatim when its reconstruction is more than this many
# octaves (factors of 2) from its value (``domains``); an octave is 2^(mantissa bits) pattern
# steps. Chosen from bench/first_moment.py (bench/README.md, "Adam's first moment").
LOG_MAX_ERROR_OCTAVES = 1.0
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7, "float64": 52}
_KERNELS = {(name, log): _build(KINDS[name], log, INF_PATTERNS[name],
                                int(LOG_MAX_ERROR_OCTAVES * (1 << MANTISSA_BITS[name])))
            for name in KINDS for log in (False, True)}


def for_dtype(dtype_name: str, log: bool) -> Kernels:
    """The kernels of a dtype (``format.DType.name``) and domain (log or linear)."""
    return _KERNELS[dtype_name, log]


def warm_up() -> None:
    """Compiles (or loads from the cache) every kernel the codec calls."""
    reps = np.zeros(2, np.float32)
    lut = np.zeros(NKEYS, np.uint8)
    stats = [np.zeros((LANES, NKEYS), t) for t in (np.int64, np.uint64, np.float32, np.float32)]
    for (name, log), fns in _KERNELS.items():
        cur = np.zeros(4, HOLDERS[name]).view(PATTERNS[name] if log else HOLDERS[name])
        for mean in (True, False):
            fns.analyze(cur, cur, mean, *stats)
        fns.encode_chunk(cur, cur, cur.copy(), lut, reps, np.zeros(4, np.uint8),
                         np.zeros(4, np.intp))
        fns.add_values(reps[:1].repeat(4), cur, cur.copy())
        fns.add_values_in_place(reps[:1].repeat(4), cur.copy())
        stream = np.frombuffer(bytes(1), np.uint8)  # as the zstd decoder's: read-only
        fns.apply_packed(stream, 1, 1, reps, cur.copy())
        if not log:
            fns.scale(cur, np.float32(0.5), cur.copy())
            fns.scale(cur.copy(), np.float32(0.5), cur.copy())
    split_symbols(np.zeros(9, np.uint8), np.zeros(2, np.uint8), np.zeros(9, np.uint8))
