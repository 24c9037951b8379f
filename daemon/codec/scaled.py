"""The scaled-reference domain: a linear delta against ``alpha * reference``.

Adam's first moment decays between saves where no gradient arrives (``m <- beta1^K m``): a
linear delta against the previous reconstruction drops those small changes, so dropped
elements keep a *stale* ``m`` while the second moment decays, and the restored update
``m / sqrt(v)`` grows. Coding ``current - alpha * reference`` with one least-squares factor
per tensor predicts the decay: a dropped element comes back as ``alpha * reference``
(``bench/first_moment.py`` measures it: same bytes, smaller update error).

``alpha`` is fitted by the encoder only and stored in the blob as a float32, so the decoder
never recomputes it: the scaled reference is a pure function of the stored ``alpha`` and the
reference, computed by ``scale_reference`` on both sides (``ref + (alpha - 1) * ref`` in
float32, rounded to the tensor's dtype by the linear kernels' own addition; one fused
compiled pass, ``kernels.Kernels.scale``), and a decode stays bit-exact. ``delta`` writes it
into the output buffer, so the linear passes then run against it with no tensor-sized
temporary.
"""

from __future__ import annotations

import math

import numpy as np

from . import chunks, kernels
from .chunks import Scratch

_F32 = np.dtype(np.float32)


def fit_alpha(cur: np.ndarray, ref: np.ndarray, dtype_name: str) -> np.float32:
    """The least-squares factor ``<cur, ref> / <ref, ref>`` as a float32.

    Non-finite elements (stored verbatim anyway) are left out of the fit. 1.0 (a plain
    linear delta) when the reference is zero there or the fit overflows: a factor is only
    a prediction, so a bad one costs bytes, never correctness.

    float32 chunks are dotted as they are, with no copy and no mask: a non-finite element
    makes its chunk's dot products non-finite (NaN and Inf propagate through the sum), so
    finite dots prove that no element needed masking, and only a chunk with a non-finite
    dot takes the masked path (the same sums as before: the same values, dotted in order).
    """
    num = den = 0.0
    scratch = Scratch()
    for part in chunks.bounds(cur.size, chunks.CHUNK_ELEMS):
        if dtype_name == "float32":
            with np.errstate(all="ignore"):
                dots = float(np.dot(cur[part], ref[part])), float(np.dot(ref[part], ref[part]))
            if math.isfinite(dots[0]) and math.isfinite(dots[1]):
                num += dots[0]
                den += dots[1]
                continue
        n = part.stop - part.start
        a = widen(cur[part], dtype_name, scratch.get("fit_a", n, _F32))
        b = widen(ref[part], dtype_name, scratch.get("fit_b", n, _F32))
        finite = np.isfinite(a, out=scratch.get("fit_ok", n, np.bool_))
        finite &= np.isfinite(b)
        if not finite.all():
            a, b = a[finite], b[finite]
        with np.errstate(all="ignore"):
            num += float(np.dot(a, b))
            den += float(np.dot(b, b))
    alpha = num / den if den > 0 else 1.0
    with np.errstate(over="ignore"):
        stored = np.float32(alpha)
    return stored if math.isfinite(alpha) and np.isfinite(stored) else np.float32(1.0)


def scale_reference(ref: np.ndarray, alpha: np.float32, dtype_name: str,
                    out: np.ndarray) -> np.ndarray:
    """``out = alpha * ref`` in ``ref``'s holder dtype (one compiled pass, ``kernels``);
    ``out`` may be ``ref``.

    Computed as ``ref + (alpha - 1) * ref``: the step in float32, added by the linear
    kernels' own addition (``kernels.Kernels.scale``). A NaN or Inf here becomes a NaN delta
    and so an exception, as in the linear domain.
    """
    view = kernels.HOLDERS[dtype_name]
    factor = np.float32(alpha - np.float32(1.0))
    kernels.for_dtype(dtype_name, False).scale(ref.view(view), factor, out.view(view))
    return out


def widen(values: np.ndarray, dtype_name: str, out: np.ndarray) -> np.ndarray:
    """float32 of float16/bfloat16 (its uint16 words)/float32/float64 holders, into ``out``."""
    if dtype_name == "bfloat16":
        np.left_shift(values, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        with np.errstate(all="ignore"):
            np.copyto(out, values, casting="unsafe")
    return out
