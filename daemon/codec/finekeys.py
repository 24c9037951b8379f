"""Encode passes with finer buckets than octaves (``buckets_per_octave`` 2 or 4), compiled.

The key of an element is ``bits >> shift`` of its float32 delta, ``shift = 23 - key_bits``:
sign, exponent and the top ``key_bits`` mantissa bits (``quantize``). Only the two encode
passes depend on the key; decode adds ``reps[symbol]`` as for octave buckets (``kernels``),
so these are the only kernels the option needs, and the octave kernels stay as they were.
Linear arithmetic only (the linear and scaled domains): the log domain keeps octave buckets.

* ``analyze(cur, ref, shift, mean, counts, sums, lo, hi)``: ``kernels.Kernels.analyze`` with
  ``(LANES, 512 << key_bits)`` tables.
* ``encode_chunk(cur, ref, out, shift, lut, reps, symbols, index) -> count``:
  ``kernels.Kernels.encode_chunk`` with that key; the exceptions are the same (a non-finite
  delta or reconstruction), the reconstruction the same ``store``.
"""

# numba compiles positional parameters only (no keyword-only ones): the kernels take many.
# ruff: noqa: PLR0917

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import kernels
from .elementwise import bits_of, delta_of, jit, store
from .kernels import LANES, tally


@dataclass(frozen=True)
class FineKernels:
    """The two encode passes of one dtype with a key of ``bits >> shift``."""

    analyze: Callable[..., None]
    encode_chunk: Callable[..., int]


def _build(kind: int, limit: int) -> FineKernels:
    """The passes with ``kind`` and ``limit`` compiled in as constants (as ``kernels``)."""

    @jit
    def analyze(cur: Any, ref: Any, shift: int, mean: bool, counts: Any, sums: Any, lo: Any,
                hi: Any) -> None:
        for i in range(cur.size):
            d = delta_of(cur[i], ref[i], kind, False, limit)
            u = bits_of(d)
            tally(i & (LANES - 1), u >> shift, u, d, mean, counts, sums, lo, hi)

    @jit
    def encode_chunk(cur: Any, ref: Any, out: Any, shift: int, lut: Any, reps: Any,
                     symbols: Any, index: Any) -> int:
        count = 0
        for i in range(cur.size):
            c = cur[i]
            u = bits_of(delta_of(c, ref[i], kind, False, limit))
            symbol = lut[u >> shift]
            symbols[i] = symbol
            bad = store(out, i, reps[symbol], ref[i], kind, False, limit)
            if ((u >> 23) & 0xFF) == 0xFF or bad:
                out[i] = c
                index[count] = i
                count += 1
        return count

    return FineKernels(analyze, encode_chunk)


_KERNELS = {name: _build(kernels.KINDS[name], kernels.INF_PATTERNS[name])
            for name in kernels.KINDS}


def for_dtype(dtype_name: str) -> FineKernels:
    """The finer-bucket passes of a dtype (``format.DType.name``), linear arithmetic."""
    return _KERNELS[dtype_name]


def warm_up() -> None:
    """Compiles (or loads from the cache) both passes of every dtype."""
    reps = np.zeros(2, np.float32)
    lut = np.zeros(kernels.NKEYS << 2, np.uint8)
    shape = (LANES, kernels.NKEYS << 2)
    stats = [np.zeros(shape, t) for t in (np.int64, np.uint64, np.float32, np.float32)]
    for name, fns in _KERNELS.items():
        cur = np.zeros(4, kernels.HOLDERS[name])
        for mean in (True, False):
            fns.analyze(cur, cur, 21, mean, *stats)
        fns.encode_chunk(cur, cur, cur.copy(), 21, lut, reps, np.zeros(4, np.uint8),
                         np.zeros(4, np.intp))
