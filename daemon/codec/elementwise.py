"""The arithmetic of one element, as the format defines it, for the compiled kernels.

float16 and bfloat16 arrive as their uint16 words (numba has no float16 arithmetic): they
widen to float32 exactly and round back to nearest even by bit pattern, as numpy's casts
do. ``delta_of`` is one element's float32 delta in its domain (the log domain's: the
difference of the integer bit patterns, NaN outside ``[+0.0, largest finite]``), and
``store`` is the addition both encode (the reconstruction) and decode end in, so a decode
returns the encoder's reconstruction bit for bit. Every function here is inlined into the
loops of ``kernels`` and ``finekeys`` (``inline``), which compile with the dtype
(``F32``/``F16``/``BF16``/``F64``) and domain as constants, so the other branches fold away.
"""

# numba compiles positional parameters only (no keyword-only ones).
# ruff: noqa: PLR0917

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

F32 = 0
F16 = 1
BF16 = 2
F64 = 3
KINDS = {"float32": F32, "float16": F16, "bfloat16": BF16, "float64": F64}

_F = TypeVar("_F", bound=Callable[..., Any])


def jit(fn: _F) -> _F:
    """``njit(nogil, cache)``; without a writable cache location, uncached."""
    try:
        return cast(_F, numba.njit(nogil=True, cache=True)(fn))
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return cast(_F, numba.njit(nogil=True)(fn))


def inline(fn: _F) -> _F:
    return cast(_F, numba.njit(inline="always")(fn))


@inline
def bits_of(x: Any) -> Any:
    return np.float32(x).view(np.uint32)


@inline
def _half_to_f32(word: Any) -> Any:
    """float16 word -> float32, exactly (subnormals, Inf and NaN included)."""
    h = np.int64(word)
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:
        tiny = np.float32(mantissa) * np.float32(5.9604644775390625e-08)  # m * 2^-24
        return -tiny if sign else tiny
    if exponent == 0x1F:
        bits = sign | 0x7F800000 | (mantissa << 13)
    else:
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13)
    return np.uint32(bits).view(np.float32)


@inline
def _f32_to_half(value: Any) -> Any:
    """float32 -> float16 word, rounded to nearest even (as numpy's cast)."""
    x = np.int64(bits_of(value))
    sign = (x >> 16) & 0x8000
    magnitude = x & 0x7FFFFFFF
    if magnitude >= 0x7F800000:
        return np.uint16(sign | 0x7C00 | (0x200 if magnitude > 0x7F800000 else 0))
    if magnitude >= 0x477FF000:  # 65520 and above round to Inf
        return np.uint16(sign | 0x7C00)
    if magnitude < 0x38800000:  # below 2^-14: a subnormal half (or zero, or 2^-14)
        scaled = np.float64(np.abs(value)) * 16777216.0  # exact: a power of two
        return np.uint16(sign | np.int64(np.rint(scaled)))
    half = (magnitude - 0x38000000) >> 13
    rest = magnitude & 0x1FFF
    if rest > 0x1000 or (rest == 0x1000 and (half & 1)):
        half += 1
    return np.uint16(sign | half)


@inline
def _bf16_to_f32(word: Any) -> Any:
    return np.uint32(np.int64(word) << 16).view(np.float32)


@inline
def _f32_to_bf16(value: Any) -> Any:
    """Round-to-nearest-even of a float32 to a bfloat16 word (NaN: an exception anyway)."""
    w = np.int64(bits_of(value))
    return np.uint16(((w + 0x7FFF + ((w >> 16) & 1)) & 0xFFFFFFFF) >> 16)


@inline
def widen(word: Any, kind: int) -> Any:
    """float32 value of a float16/bfloat16 word."""
    return _half_to_f32(word) if kind == F16 else _bf16_to_f32(word)


@inline
def delta_of(c: Any, r: Any, kind: int, log: bool, limit: int) -> Any:
    """float32 delta of one element (log: of its patterns; NaN outside the domain)."""
    if log:
        a = np.int64(c)
        b = np.int64(r)
        if a < 0 or b < 0 or a >= limit or b >= limit:
            return np.float32(np.nan)
        return np.float32(a - b)
    if kind in (F32, F64):
        return np.float32(c - r)
    return widen(c, kind) - widen(r, kind)


@inline
def log_step(value: Any, limit: int) -> Any:
    """The log domain's integer pattern step of a float32 representative."""
    return np.int64(np.rint(min(max(np.float64(value), -np.float64(limit)), np.float64(limit))))


@inline
def log_add(r: Any, step: Any, limit: int) -> Any:
    """A pattern plus a step, clamped to ``[+0.0, largest finite]``."""
    return min(max(np.int64(r) + step, 0), limit - 1)


@inline
def store(out: Any, i: int, value: Any, r: Any, kind: int, log: bool, limit: int) -> bool:
    """``out[i] = r (+) value`` in the dtype (log: as a pattern); whether it is non-finite.

    Each branch stores its own result: one return type for all dtypes would round the
    int64 patterns of float64 through float64.
    """
    if log:
        out[i] = log_add(r, log_step(value, limit), limit)
        return False
    if kind == F32:
        single = np.float32(r + value)
        out[i] = single
        return not np.isfinite(single)
    if kind == F64:
        double = np.float64(r) + np.float64(value)
        out[i] = double
        return not np.isfinite(double)
    if kind == F16:
        half = _f32_to_half(_half_to_f32(r) + value)
        out[i] = half
        return (half & 0x7C00) == 0x7C00
    word = _f32_to_bf16(_bf16_to_f32(r) + value)
    out[i] = word
    return (word & 0x7F80) == 0x7F80
