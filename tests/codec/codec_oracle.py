"""The delta codec's numpy passes, kept as the test oracle of the compiled kernels.

Until issue 17 these were the codec's per-chunk work (``daemon/codec/quantize.py`` and
``domains.py``): about ten numpy passes per chunk. The daemon now runs
``daemon/codec/kernels.py``; ``NumpyOps`` plugs the old passes into the same
``delta.encode_delta``/``decode_delta`` (promotion, representatives, entropy coding and the
blob layout are shared), and the tests check both write the same bytes and reconstruct
the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from ckptd.daemon.codec import chunks, delta, domains, quantize
from ckptd.daemon.codec.chunks import Scratch
from ckptd.daemon.codec.domains import LOG
from ckptd.daemon.codec.kernels import LOG_MAX_ERROR_OCTAVES, MANTISSA_BITS

_F32 = np.dtype("<f4")
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
NKEYS = quantize.NKEYS
MAX_STATS_ELEMS = 1 << 20
_EXP_MASK = 0xFF
_MANTISSA_BITS = 23
_COUNT_SHIFT = 43
_KEY_PATTERNS = np.arange(NKEYS, dtype=np.uint64) << np.uint64(_MANTISSA_BITS)
_COUNT_UNITS = np.uint64(1 << _COUNT_SHIFT) + _KEY_PATTERNS
_SIGNED: dict[str, np.dtype] = {"float32": np.dtype("<i4"), "float16": np.dtype("<i2"),
                                "bfloat16": np.dtype("<i2"), "float64": np.dtype("<i8")}
_INF_PATTERN = {"float32": 0x7F800000, "float16": 0x7C00, "bfloat16": 0x7F80,
                "float64": 0x7FF0000000000000}
_LOG_MAX_STEP = {name: int(LOG_MAX_ERROR_OCTAVES * (1 << bits))
                 for name, bits in MANTISSA_BITS.items()}


def widen(values: np.ndarray, dtype_name: str, out: np.ndarray) -> np.ndarray:
    """float32 values of float16/bfloat16/float32 input (bfloat16 given as uint16 words)."""
    if dtype_name == "bfloat16":
        np.left_shift(values, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, values)
    return out


def delta32(cur: np.ndarray, ref: np.ndarray, dtype_name: str, out: np.ndarray,
            scratch: Scratch) -> None:
    """Writes ``float32(cur - ref)`` into ``out``.

    float16/bfloat16 subtract in float32 (exact widening); float64 subtracts in float64 and
    rounds the delta to float32 (an overflow becomes Inf and so an exception).
    """
    if dtype_name == "bfloat16":
        a = widen(cur, dtype_name, scratch.get("wide_a", cur.size, _F32))
        b = widen(ref, dtype_name, scratch.get("wide_b", cur.size, _F32))
        np.subtract(a, b, out=out)
    elif dtype_name == "float64":
        np.subtract(cur, ref, out=out, casting="same_kind")
    else:
        np.subtract(cur, ref, out=out, dtype=_F32)


def keys_of(delta: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Bucket key (sign << 8 | biased exponent) of each float32 delta, into ``out``."""
    return np.right_shift(delta.view(np.uint32), _MANTISSA_BITS, out=out, casting="unsafe")


def chunk_stats(delta: np.ndarray, representative: str, scratch: Scratch) -> quantize.Stats:
    """Counts and mantissa sums (mean) or min/max (midrange) per key of one chunk."""
    if delta.size > MAX_STATS_ELEMS:
        raise ValueError(f"chunk of {delta.size} elements exceeds {MAX_STATS_ELEMS}")
    keys = keys_of(delta, scratch.get("key_intp", delta.size, np.intp))
    if representative != "mean":
        lo = np.full(NKEYS, np.inf, _F32)
        hi = np.full(NKEYS, -np.inf, _F32)
        np.minimum.at(lo, keys, delta)
        np.maximum.at(hi, keys, delta)
        return quantize.Stats(np.bincount(keys, minlength=NKEYS).astype(np.int64), None, lo, hi)
    packed = np.add(delta.view(np.uint32), np.uint64(1 << _COUNT_SHIFT),
                    out=scratch.get("packed_stats", delta.size, np.uint64))
    acc = np.zeros(NKEYS, np.uint64)
    np.add.at(acc, keys, packed)
    counts = acc // _COUNT_UNITS
    return quantize.Stats(counts.astype(np.int64), acc - counts * _COUNT_UNITS, None, None)


def add_values(values: np.ndarray, ref: np.ndarray, dtype_name: str, *, out: np.ndarray,
               scratch: Scratch) -> None:
    """``out = ref + values`` (float32 ``values = reps[symbols]``), rounded to the dtype.

    float32 adds in float32; float16 adds in float32 and rounds to nearest even; bfloat16
    adds in float32 and rounds the words to nearest even; float64 adds in float64.
    ``out`` may alias the float32 delta buffer (it is read before this is called). Encode
    and decode both end here, which is what makes a decode equal
    the encoder's reconstruction bit for bit however ``values`` was computed.
    """
    if dtype_name in ("float32", "float64"):
        np.add(ref, values, out=out)
    elif dtype_name == "float16":
        np.add(ref, values, out=out, dtype=_F32, casting="same_kind")
    else:
        total = widen(ref, dtype_name, scratch.get("wide_a", ref.size, _F32))
        np.add(total, values, out=total)
        _round_to_bfloat16(total.view(np.uint32), out, scratch)


def _round_to_bfloat16(words32: np.ndarray, out: np.ndarray, scratch: Scratch) -> None:
    """Round-to-nearest-even of float32 bit patterns to bfloat16 words (in place on words32).

    Only finite and infinite values reach here with a meaning; NaN elements are exceptions
    and get overwritten, so the carry a NaN payload may take is harmless.
    """
    lsb = np.right_shift(words32, 16, out=scratch.get("lsb", words32.size, np.uint32))
    np.bitwise_and(lsb, 1, out=lsb)
    lsb += 0x7FFF
    words32 += lsb
    np.right_shift(words32, 16, out=out, casting="unsafe")


def nonfinite_mask(values: np.ndarray, dtype_name: str, out: np.ndarray) -> np.ndarray:
    """Boolean mask of Inf/NaN elements (bfloat16 read from its exponent bits), into ``out``."""
    if dtype_name == "bfloat16":
        exponent = np.bitwise_and(values, 0x7F80)
        return np.equal(exponent, 0x7F80, out=out)
    np.isfinite(values, out=out)
    return np.logical_not(out, out=out)


def exception_mask(keys: np.ndarray, recon: np.ndarray, dtype_name: str,
                   nonfinite_deltas: int, scratch: Scratch) -> np.ndarray | None:
    """Elements stored verbatim: a non-finite delta, or a reconstruction that overflowed.

    Returns None when there are none (the common case costs one ``isfinite`` pass).
    """
    if not nonfinite_deltas and dtype_name != "bfloat16":
        # The common case in two passes, not three: all finite means no exception.
        finite = np.isfinite(recon, out=scratch.get("bad", recon.size, np.bool_))
        if finite.all():
            return None
        return np.logical_not(finite, out=finite)
    bad = nonfinite_mask(recon, dtype_name, scratch.get("bad", recon.size, np.bool_))
    if nonfinite_deltas:
        bad |= (keys & _EXP_MASK) == _EXP_MASK
    elif not bad.any():
        return None
    return bad


@dataclass(frozen=True)
class _Numpy:
    """The numpy delta and addition of one domain and dtype (``domains.Ops`` before issue 17)."""

    domain: int
    dtype_name: str

    def delta32(self, cur: np.ndarray, ref: np.ndarray, out: np.ndarray,
                scratch: Scratch) -> None:
        """Writes the float32 delta of ``cur`` against ``ref`` into ``out``."""
        if self.domain != LOG:  # the scaled domain: linear against its scaled reference
            delta32(cur, ref, self.dtype_name, out, scratch)
            return
        a = self._patterns(cur, scratch.get("pattern_a", cur.size, _I64))
        b = self._patterns(ref, scratch.get("pattern_b", cur.size, _I64))
        outside = self._outside(a, scratch.get("outside_a", cur.size, np.bool_))
        outside |= self._outside(b, scratch.get("outside_b", cur.size, np.bool_))
        np.subtract(a, b, out=a)
        np.copyto(out, a, casting="unsafe")
        out[outside] = np.nan

    def add_values(self, values: np.ndarray, ref: np.ndarray, out: np.ndarray,
                   scratch: Scratch) -> None:
        """``out = ref (+) values`` in the domain; encode and decode both end here."""
        if self.domain != LOG:  # the scaled domain: linear against its scaled reference
            add_values(values, ref, self.dtype_name, out=out, scratch=scratch)
            return
        limit = _INF_PATTERN[self.dtype_name]
        steps = scratch.get("steps", values.size, _F64)
        # Clipped before the integer cast (a float32 representative may exceed int64);
        # no real step is longer than the whole pattern range.
        np.clip(values, -limit, limit, out=steps)
        np.rint(steps, out=steps)
        total = self._patterns(ref, scratch.get("pattern_b", values.size, _I64))
        total += steps.astype(_I64)
        np.clip(total, 0, limit - 1, out=total)
        np.copyto(out.view(_SIGNED[self.dtype_name]), total, casting="unsafe")

    def lost_zeros(self, cur: np.ndarray, recon: np.ndarray, mask: np.ndarray | None,
                   scratch: Scratch) -> np.ndarray | None:
        """``mask`` plus, in the log domain, the elements stored verbatim: zero in ``cur`` but
        not in ``recon`` (a zero always survives), or more than ``LOG_MAX_ERROR_OCTAVES``
        from ``cur`` (in-domain elements; the others are exceptions already)."""
        if self.domain != LOG:  # the scaled domain: linear against its scaled reference
            return mask
        signed = _SIGNED[self.dtype_name]
        lost = np.equal(cur.view(signed), 0, out=scratch.get("lost", cur.size, np.bool_))
        lost &= recon.view(signed) != 0
        a = self._patterns(cur, scratch.get("pattern_a", cur.size, _I64))
        b = self._patterns(recon, scratch.get("pattern_b", cur.size, _I64))
        far = self._outside(a, scratch.get("far", cur.size, np.bool_))
        np.logical_not(far, out=far)
        np.subtract(a, b, out=a)
        np.abs(a, out=a)
        far &= a > _LOG_MAX_STEP[self.dtype_name]
        lost |= far
        if not lost.any():
            return mask
        return lost if mask is None else mask | lost

    def _patterns(self, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.copyto(out, values.view(_SIGNED[self.dtype_name]), casting="unsafe")
        return out

    def _outside(self, patterns: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Negative (sign bit) or non-finite (exponent all ones) patterns."""
        np.greater_equal(patterns, _INF_PATTERN[self.dtype_name], out=out)
        out |= patterns < 0
        return out


@dataclass(frozen=True)
class NumpyOps(domains.Ops):
    """The per-chunk passes of ``delta.encode_delta``/``decode_delta`` in numpy, as the codec
    ran them until issue 17; everything else (promotion, coding, the blob) is shared."""

    def stats(self, cur: np.ndarray, ref: np.ndarray, representative: str) -> quantize.Stats:
        scratch = Scratch()
        with np.errstate(all="ignore"):  # Inf/NaN become exceptions
            delta = scratch.get("delta", cur.size, _F32)
            self._numpy.delta32(cur, ref, delta, scratch)
            return chunk_stats(delta, representative, scratch)

    def encode(self, cur: np.ndarray, ref: np.ndarray, out: np.ndarray, plan: quantize.Plan,
               scratch: Scratch) -> tuple[np.ndarray, np.ndarray | None]:
        with np.errstate(all="ignore"):  # Inf/NaN become exceptions
            delta = scratch.get("delta", cur.size, _F32)
            self._numpy.delta32(cur, ref, delta, scratch)
            keys = keys_of(delta, scratch.get("key_intp", cur.size, np.intp))
            symbols = np.take(plan.lut, keys, out=scratch.get("symbols", cur.size, np.uint8),
                              mode="wrap")
            self._numpy.add_values(plan.reps[symbols], ref, out, scratch)
            nonfinite = int(np.count_nonzero((keys & _EXP_MASK) == _EXP_MASK))
            mask = exception_mask(keys, out, self.dtype_name, nonfinite, scratch)
            mask = self._numpy.lost_zeros(cur, out, mask, scratch)
        if mask is None:
            return symbols, None
        index = np.flatnonzero(mask)
        out[index] = cur[index]
        return symbols, index

    def add_values(self, values: np.ndarray, ref: np.ndarray, out: np.ndarray) -> None:
        with np.errstate(all="ignore"):  # Inf/NaN become exceptions
            self._numpy.add_values(values, ref, out, Scratch())

    @property
    def _numpy(self) -> _Numpy:
        return _Numpy(self.domain, self.dtype_name)


def encode_delta(current: np.ndarray, reference: np.ndarray, **options: Any,
                 ) -> tuple[bytes, np.ndarray]:
    """``ckptd.daemon.codec.encode_delta`` with the numpy passes."""
    return delta.encode_delta(current, reference, ops_type=NumpyOps, **options)


def decode_delta(blob: bytes | memoryview, reference: np.ndarray, *,
                 in_place: bool = False) -> np.ndarray:
    """``ckptd.daemon.codec.decode_delta`` with the numpy passes."""
    return delta.decode_delta(blob, reference, in_place=in_place, ops_type=NumpyOps)


def fit_alpha(cur: np.ndarray, ref: np.ndarray, dtype_name: str) -> np.float32:
    """``scaled.fit_alpha`` as it was before its float32 fast path: every chunk widened
    into copies and masked to its finite elements."""
    sums = np.zeros(2)
    for part in chunks.bounds(cur.size, chunks.CHUNK_ELEMS):
        a = widen(cur[part], dtype_name, np.empty(part.stop - part.start, _F32))
        b = widen(ref[part], dtype_name, np.empty_like(a))
        keep = np.isfinite(a) & np.isfinite(b)
        with np.errstate(all="ignore"):
            sums += [float(np.dot(a[keep], b[keep])), float(np.dot(b[keep], b[keep]))]
    with np.errstate(all="ignore"):
        alpha = float(sums[0] / sums[1]) if sums[1] > 0 else 1.0
        fitted = np.float32(alpha)
    return fitted if np.isfinite(alpha) and np.isfinite(fitted) else np.float32(1.0)


def scale_reference(ref: np.ndarray, alpha: np.float32, dtype_name: str) -> np.ndarray:
    """``scaled.scale_reference`` in numpy passes: ``ref + float32(widen(ref) * (alpha -
    1))``, added as a decode adds (``add_values``)."""
    step = widen(ref, dtype_name, np.empty(ref.size, _F32))
    with np.errstate(all="ignore"):
        np.multiply(step, np.float32(alpha - np.float32(1.0)), out=step)
    out = np.empty_like(ref)
    NumpyOps(domains.LINEAR, dtype_name).add_values(step, ref, out)
    return out
