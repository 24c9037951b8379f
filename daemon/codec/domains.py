"""What a lossy delta is taken of: the values, their logarithm, or the values against a
scaled reference.

* **linear** (format code 0): ``delta = current - reference`` in float32 and
  ``reconstruction = reference + reps[symbol]`` rounded to the dtype (``kernels``). The
  error is absolute: it can push a small element of a tensor
  that must stay non-negative (Adam's second moment) below zero.
* **log** (format code 1): the delta of the values' IEEE-754 bit patterns read as integers.
  For a non-negative float the bit pattern is a monotone, piecewise-linear approximation of
  ``2^m * (log2(v) + bias)`` (m: mantissa bits), so an integer step of ``k`` multiplies the
  value by between ``2^(k / 2^(m+1))`` and ``2^(k / 2^m)``: the quantization error is
  *relative* for every element, whatever its magnitude. Reconstruction adds the rounded
  representative to the reference's pattern in integer arithmetic and clamps the result to
  ``[+0.0, largest finite]``, so it is never negative and never infinite. An element that
  is exactly zero comes back exactly zero: pattern 0 against a zero reference is step 0,
  and an element that *becomes* zero where the quantized step misses pattern 0 (a tensor
  collapsing to zero) is an exception, as is an element whose reconstruction would be more
  than ``kernels.LOG_MAX_ERROR_OCTAVES`` off: a kept bucket's step is right only to a factor
  of 2 *of the step*, so an element that jumped by many octaves (an idle embedding row's
  second moment when the row sees a gradient again) would come back octaves off, and the
  restored Adam update ``m / sqrt(v)`` by a large factor. Such jumps are rare
  (``bench/first_moment.py``), so storing them verbatim costs little. Subnormals are the
  patterns just above 0 (there the step is absolute, below every normal value).

  Which buckets a width keeps is the log domain's own (``promote_log``): priority promotion
  keeps the largest steps, and where more buckets hold steps over the bound than the width
  has symbols (Adam's second moment 50 steps apart: decays of 1-4 octaves and growths of
  1-4 beside rare jumps of tens), every element of a dropped one is an exception; it keeps
  instead the buckets whose elements would otherwise be exceptions the most often. Only
  the encoder chooses (the blob holds the representatives, not the keys), so every earlier
  blob decodes as before. ``bits="auto"`` counts the buckets this rule drops
  (``Ops.ranked``), not priority promotion's.

  Every operation is integer arithmetic or IEEE-754 rounding of a float (no ``log``/``exp``,
  whose results differ between numpy's SIMD paths), so a decode on any host reproduces the
  encoder's reconstruction bit for bit.

  Elements outside the domain, in ``current`` or ``reference`` (sign bit set, ``-0.0``
  included, Inf, NaN), get a NaN delta and so become exceptions stored verbatim, as
  non-finite elements do in the linear domain.
* **scaled** (format code 2): the linear domain against ``alpha * reference``, one float32
  factor per tensor fitted by the encoder and stored in the blob (``scaled``): a value that
  decays between saves (Adam's first moment) decays where its delta is dropped instead of
  staying stale. ``delta`` writes the scaled reference into the output buffer (chunk by
  chunk, in pass 1) and runs the linear passes against it, so ``Ops`` treats it as linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import finekeys, kernels, quantize
from .chunks import Scratch

LINEAR = 0
LOG = 1
SCALED = 2
DOMAINS = {LINEAR: "linear", LOG: "log", SCALED: "scaled"}
DOMAIN_IDS = {name: code for code, name in DOMAINS.items()}


@dataclass(frozen=True)
class Ops:
    """The per-chunk passes of encode and decode, for one domain and dtype (``kernels``).

    Arrays are the dtype's holder (``format.DType.holder``); the log domain hands the
    kernels their signed integer view, so its arithmetic is on the bit patterns.
    ``key_bits`` > 0 (linear arithmetic only): the encode passes key each element by its
    sign, exponent and top ``key_bits`` mantissa bits (``finekeys``); decode is the same.
    """

    domain: int
    dtype_name: str
    key_bits: int = 0

    def stats(self, cur: np.ndarray, ref: np.ndarray, representative: str) -> quantize.Stats:
        """Encode pass 1: per-key statistics of the chunk's float32 deltas."""
        shape = (kernels.LANES, kernels.NKEYS << self.key_bits)
        mean = representative == "mean"
        counts = np.zeros(shape, np.int64)
        sums = np.zeros(shape if mean else (1, 1), np.uint64)
        lo = np.full(shape if not mean else (1, 1), np.inf, np.float32)
        hi = np.full(shape if not mean else (1, 1), -np.inf, np.float32)
        if self.key_bits:
            finekeys.for_dtype(self.dtype_name).analyze(
                self._view(cur), self._view(ref), 23 - self.key_bits, mean, counts, sums, lo, hi)
        else:
            self._kernels.analyze(self._view(cur), self._view(ref), mean, counts, sums, lo, hi)
        if mean:
            return quantize.Stats(counts.sum(axis=0), sums.sum(axis=0), None, None,
                                  self.key_bits)
        return quantize.Stats(counts.sum(axis=0), None, lo.min(axis=0), hi.max(axis=0),
                              self.key_bits)

    def keep(self, stats: quantize.Stats, bits: int) -> np.ndarray:
        """The keys width ``bits`` keeps, in symbol order: the log domain's by
        ``promote_log``, the others' by priority promotion."""
        if self.domain == LOG:
            return promote_log(stats, bits, self.dtype_name)
        return quantize.promote(stats, bits)

    def ranked(self, stats: quantize.Stats) -> np.ndarray:
        """The keys in the order the widths take them: width b keeps the first ``2^b - 1``
        (the set ``keep`` returns in symbol order). ``bits="auto"`` estimates each width's
        dropped buckets from it (``quantize.auto_bits``), so it counts the buckets the
        encoder drops."""
        if self.domain == LOG:
            order, chosen = _log_choice(stats, self.dtype_name)
            return order[chosen]
        return quantize.promote(stats, 8)

    def plan(self, stats: quantize.Stats, bits: int, representative: str) -> quantize.Plan:
        """Between the passes: what every key becomes at width ``bits`` (``keep``)."""
        return quantize.make_plan(stats, bits, representative, self.keep(stats, bits))

    def encode(self, cur: np.ndarray, ref: np.ndarray, out: np.ndarray, plan: quantize.Plan,
               scratch: Scratch) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode pass 2: the chunk's symbols (in ``scratch``) and its exceptions' positions,
        reconstruction into ``out`` (exceptions hold their value verbatim)."""
        symbols = scratch.get("symbols", cur.size, np.uint8)
        index = scratch.get("exceptions", cur.size, np.intp)
        if self.key_bits:
            count = finekeys.for_dtype(self.dtype_name).encode_chunk(
                self._view(cur), self._view(ref), self._view(out), 23 - self.key_bits,
                plan.lut, plan.reps, symbols, index)
        else:
            count = self._kernels.encode_chunk(self._view(cur), self._view(ref),
                                               self._view(out), plan.lut, plan.reps, symbols,
                                               index)
        return symbols, (index[:count].copy() if count else None)

    def add_values(self, values: np.ndarray, ref: np.ndarray, out: np.ndarray) -> None:
        """Decode: ``out = ref (+) values`` (float32 ``values``); ``out`` may be ``ref``."""
        if ref.ctypes.data == out.ctypes.data:  # in place: the same chunk of one buffer
            self._kernels.add_values_in_place(values, self._view(out))
        else:
            self._kernels.add_values(values, self._view(ref), self._view(out))

    @property
    def _kernels(self) -> kernels.Kernels:
        return kernels.for_dtype(self.dtype_name, self.domain == LOG)

    def _view(self, array: np.ndarray) -> np.ndarray:
        views = kernels.PATTERNS if self.domain == LOG else kernels.HOLDERS
        return array.view(views[self.dtype_name])


def promote_log(stats: quantize.Stats, bits: int, dtype_name: str) -> np.ndarray:
    """The log domain's kept keys, in priority promotion's (symbol) order.

    A key is a bucket of pattern steps ``[2^k, 2^(k+1))``. Dropped, its elements come back
    unchanged, so they are exceptions (stored verbatim, ~12 bytes each before zstd, against
    ``bits`` bits for a symbol) when the step exceeds the bound (``LOG_MAX_ERROR_OCTAVES``
    octaves of patterns, ``limit``): all of them for ``2^k >= limit``, about half where the
    bucket straddles it, none for ``2^(k+1) <= limit``. Kept, they come back at the
    bucket's one representative, within the bound for about ``min(1, 2 limit / 2^k)`` of
    them. The keys saving the most exceptions (count times both shares) are kept, ties and
    the remaining symbols in priority promotion's order; so where every bucket over the
    bound fits, the kept set, and the blob, are priority promotion's.
    """
    order, chosen = _log_choice(stats, dtype_name)
    return order[np.sort(chosen[: (1 << bits) - 1])]


def _log_choice(stats: quantize.Stats, dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every normal key in priority promotion's order, and the positions in it of the keys
    in the order the log domain's widths take them (``promote_log``)."""
    order = quantize.promote(stats, 9)  # 2^9 - 1 >= 508: every normal key, largest first
    limit = kernels.LOG_MAX_ERROR_OCTAVES * (1 << kernels.MANTISSA_BITS[dtype_name])
    low = np.ldexp(1.0, (order & 0xFF).astype(np.int64) - 127)  # 2^k, each key's smallest
    over = np.where(low >= limit, 1.0, np.where(2 * low <= limit, 0.0, 0.5))
    saved = stats.counts[order] * over * np.minimum(1.0, 2 * limit / low)
    return order, np.argsort(-saved, kind="stable")
