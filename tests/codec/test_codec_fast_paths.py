"""The codec's fast paths (issue 17) against the straightforward code they replaced.

Each fast path must give the very same numbers: decode's values looked up from packed
bytes, and a decode in place. (The compiled encode kernels are checked against the numpy
codec in ``test_codec_kernels.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.daemon import codec
from ckptd.daemon.codec import packing
from ckptd.daemon.codec.chunks import Scratch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

_SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-40,
                      -1.1754942e-38, 1.1754944e-38, 3.4028235e38, -3.4028235e38, 1.0, -2.0],
                     np.float32)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 200), data=st.data())
def test_packed_lookup_equals_per_symbol_take(bits: int, n: int, data: st.DataObject) -> None:
    symbols = data.draw(hnp.arrays(np.uint8, n, elements=st.integers(0, (1 << bits) - 1)))
    reps = data.draw(hnp.arrays(np.float32, 1 << bits))  # NaN, inf, -0.0 and subnormals too
    reps[0] = -0.0
    scratch = Scratch()
    table = packing.ValueTable.build(reps, bits)
    values = table.lookup(packing.pack(symbols, bits, scratch), n, scratch, "contrib")
    np.testing.assert_array_equal(values.view(np.uint32), reps[symbols].view(np.uint32))


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["float32", "float16", "float64", "bfloat16"]),
       domain=st.sampled_from(["linear", "log"]), bits=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1), size=st.integers(1, 5000))
def test_decode_in_place_equals_a_fresh_decode(dtype: str, domain: str, bits: int, seed: int,
                                               size: int) -> None:
    rng = np.random.default_rng(seed)
    holder = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    words = rng.integers(0, 1 << 16, size, dtype=np.uint16)
    if dtype == "bfloat16":
        reference, current = words, words ^ rng.integers(0, 1 << 6, size, dtype=np.uint16)
    else:
        reference = rng.standard_normal(size).astype(holder)
        current = (reference + rng.standard_normal(size) * 1e-3).astype(holder)
        with np.errstate(over="ignore"):  # float16 takes the float32 extremes as Inf
            current[rng.integers(0, size, size // 50 + 1)] = _SPECIALS[rng.integers(0, 15)]
    blob, recon = codec.encode_delta(current, reference, bits=bits, domain=domain,
                                     bfloat16=dtype == "bfloat16")
    target = reference.copy()
    decoded = codec.decode_delta(blob, target, in_place=True)
    assert np.shares_memory(decoded, target)
    assert decoded.tobytes() == recon.tobytes() == codec.decode_delta(blob, reference).tobytes()


def test_decode_in_place_refuses_what_it_cannot_overwrite() -> None:
    reference = np.linspace(0, 1, 64, dtype=np.float32)
    blob, _ = codec.encode_delta(reference + 1, reference, bits=2)
    strided = np.repeat(reference, 2)[::2]
    read_only = np.frombuffer(reference.tobytes(), np.float32)
    for target in (strided, read_only):
        with pytest.raises(codec.CodecError, match="in place"):
            codec.decode_delta(blob, target, in_place=True)
    assert codec.decode_delta(blob, strided).tobytes() == codec.decode_delta(
        blob, reference).tobytes()
