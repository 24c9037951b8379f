"""What a lossy delta is taken of: the values, their logarithm, or the values against a
scaled reference.

* **linear** (format code 0): ``delta = current - reference`` in float32 and
  ``reconstruction = reference + reps[symbol]`` rounded to the dtype (``quantize.delta32``,
  ``quantize.add_values``). The error is absolute: it can push a small element of a tensor
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
  collapsing to zero) is an exception (``log_exceptions``), as is an element whose
  reconstruction would be more than ``LOG_MAX_ERROR_OCTAVES`` off (a jump of many octaves,
  whose bucket is right only to a factor of 2 of the step). Subnormals are the patterns
  just above 0 (there the step is absolute, below every normal value).

  Every operation is integer arithmetic or IEEE-754 rounding of a float (no ``log``/``exp``,
  whose results differ between numpy's SIMD paths), so a decode on any host reproduces the
  encoder's reconstruction bit for bit.

  Elements outside the domain, in ``current`` or ``reference`` (sign bit set, ``-0.0``
  included, Inf, NaN), get a NaN delta and so become exceptions stored verbatim, as
  non-finite elements do in the linear domain.
* **scaled** (format code 2): the linear domain against ``alpha * reference``, one float32
  factor per tensor fitted by the encoder and stored in the blob (``scaled``): a value that
  decays between saves (Adam's first moment) decays where its delta is dropped instead of
  staying stale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quantize, scaled
from .chunks import Scratch

LINEAR = 0
LOG = 1
SCALED = 2
DOMAINS = {LINEAR: "linear", LOG: "log", SCALED: "scaled"}
DOMAIN_IDS = {name: code for code, name in DOMAINS.items()}

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
_ONE = np.float32(1.0)

# Signed integer view of each float holder, and the pattern of +Inf: in-domain patterns are
# 0 <= p < inf; the sign bit makes a pattern negative in the signed view.
_SIGNED: dict[str, np.dtype] = {"float32": np.dtype("<i4"), "float16": np.dtype("<i2"),
           "bfloat16": np.dtype("<i2"), "float64": np.dtype("<i8")}
_INF_PATTERN = {"float32": 0x7F800000, "float16": 0x7C00, "bfloat16": 0x7F80,
                "float64": 0x7FF0000000000000}
# The log domain stores an element verbatim when its reconstruction is more than this many
# octaves (factors of 2) from the value (``Ops.log_exceptions``); one octave is 2^(mantissa
# bits) pattern steps. Chosen from bench/first_moment.py.
LOG_MAX_ERROR_OCTAVES = 1.0
_MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7, "float64": 52}
_LOG_MAX_STEP = {name: int(LOG_MAX_ERROR_OCTAVES * (1 << bits))
                 for name, bits in _MANTISSA_BITS.items()}


@dataclass(frozen=True)
class Ops:
    """The two operations encode and decode run per chunk, for one domain and dtype."""

    domain: int
    dtype_name: str
    alpha: np.float32 = _ONE  # the scaled domain's factor; unused by the others

    def delta32(self, cur: np.ndarray, ref: np.ndarray, out: np.ndarray,
                scratch: Scratch) -> None:
        """Writes the float32 delta of ``cur`` against ``ref`` into ``out``."""
        if self.domain == SCALED:
            ref = scaled.scale_reference(ref, self.alpha, self.dtype_name, scratch)
        if self.domain != LOG:
            quantize.delta32(cur, ref, self.dtype_name, out, scratch)
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
        if self.domain == SCALED:
            ref = scaled.scale_reference(ref, self.alpha, self.dtype_name, scratch)
        if self.domain != LOG:
            quantize.add_values(values, ref, self.dtype_name, out=out, scratch=scratch)
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

    def log_exceptions(self, cur: np.ndarray, recon: np.ndarray, mask: np.ndarray | None,
                   scratch: Scratch) -> np.ndarray | None:
        """``mask`` plus, in the log domain, the elements stored verbatim because their
        reconstruction is too far off: zero in ``cur`` but not in ``recon`` (so that a zero
        always survives), or more than ``LOG_MAX_ERROR_OCTAVES`` from ``cur``.

        The bound is why: a kept bucket's step is right to within a factor of 2 *of the
        step*, so an element whose value jumped by many octaves (an idle embedding row's
        second moment when the row sees a gradient again) would come back off by octaves,
        and the restored Adam update ``m / sqrt(v)`` by a large factor. Such jumps are
        rare (``bench/first_moment.py``), so storing them verbatim costs little.
        """
        if self.domain != LOG:
            return mask
        signed = _SIGNED[self.dtype_name]
        lost = np.equal(cur.view(signed), 0, out=scratch.get("lost", cur.size, np.bool_))
        lost &= recon.view(signed) != 0
        far = self._far_off(cur, recon, scratch)
        lost |= far
        if not lost.any():
            return mask
        return lost if mask is None else mask | lost

    def _far_off(self, cur: np.ndarray, recon: np.ndarray, scratch: Scratch) -> np.ndarray:
        """In-domain elements whose reconstruction's pattern is more than the bound away
        from ``cur``'s (elements outside the domain are exceptions already)."""
        a = self._patterns(cur, scratch.get("pattern_a", cur.size, _I64))
        b = self._patterns(recon, scratch.get("pattern_b", cur.size, _I64))
        far = self._outside(a, scratch.get("far", cur.size, np.bool_))
        np.logical_not(far, out=far)
        np.subtract(a, b, out=a)
        np.abs(a, out=a)
        far &= a > _LOG_MAX_STEP[self.dtype_name]
        return far

    def _patterns(self, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.copyto(out, values.view(_SIGNED[self.dtype_name]), casting="unsafe")
        return out

    def _outside(self, patterns: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Negative (sign bit) or non-finite (exponent all ones) patterns."""
        np.greater_equal(patterns, _INF_PATTERN[self.dtype_name], out=out)
        out |= patterns < 0
        return out
