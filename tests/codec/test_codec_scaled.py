"""The scaled-reference domain: a decaying tensor (Adam's first moment) decays where its
change is dropped, the decode is bit-exact, and bad factors cost bytes, never values."""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.daemon.codec import blob_info, decode_delta, encode_delta
from ckptd.daemon.codec.scaled import fit_alpha
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def _first_moment(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, current): 70% of the elements idle (``m <- 0.9^10 m``), the rest moved
    by fresh gradients, as an embedding's first moment between two saves at K=10."""
    rng = np.random.default_rng(seed)
    reference = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, -2, n)).astype(np.float32)
    current = reference * np.float32(0.9**10)
    active = rng.random(n) < 0.3
    current[active] += (rng.standard_normal(int(active.sum())) * 1e-2).astype(np.float32)
    return reference, current


def test_idle_elements_decay_instead_of_going_stale() -> None:
    reference, current = _first_moment(50_000, 0)
    idle = current == reference * np.float32(0.9**10)
    for bits in (2, 3, "auto"):
        blob, scaled = encode_delta(current, reference, bits=bits, domain="scaled")
        _, linear = encode_delta(current, reference, bits=bits)
        assert decode_delta(blob, reference).tobytes() == scaled.tobytes()
        assert blob_info(blob).domain == "scaled"

        def idle_error(recon: np.ndarray) -> float:
            return float(np.linalg.norm((recon - current)[idle]) / np.linalg.norm(current[idle]))
        # Linear: an idle element whose change is below the kept buckets keeps its old
        # value, 1 / 0.35 = 2.9x too large; scaled: it decays with the fitted factor.
        assert idle_error(linear) > 0.3
        assert idle_error(scaled) < 0.05


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_every_float_dtype_decodes_bit_exact_in_place(dtype: str) -> None:
    reference, current = _first_moment(3000, 1)
    if dtype == "bfloat16":
        ref, cur = ((v.view(np.uint32) >> 16).astype(np.uint16) for v in (reference, current))
    else:
        ref, cur = reference.astype(dtype), current.astype(dtype)
    blob, recon = encode_delta(cur, ref, domain="scaled", bfloat16=dtype == "bfloat16")
    assert decode_delta(blob, ref.copy(), in_place=True).tobytes() == recon.tobytes()
    assert decode_delta(blob, ref).tobytes() == recon.tobytes()


def test_adversarial_references_fall_back_or_go_verbatim() -> None:
    """A zero reference (no fit: factor 1), NaN/Inf in either tensor (left out of the fit,
    stored verbatim), a fit that overflows the scaled reference (those elements verbatim)."""
    zeros = np.zeros(2000, np.float32)
    ramp = np.linspace(-1, 1, 2000, dtype=np.float32)
    assert fit_alpha(ramp, zeros, "float32") == np.float32(1.0)
    blob, recon = encode_delta(ramp, zeros, domain="scaled")
    assert decode_delta(blob, zeros).tobytes() == recon.tobytes()

    reference, current = _first_moment(2000, 2)
    current[[3, 4]] = [np.nan, np.inf]
    reference[[5, 6]] = [-np.inf, np.nan]
    assert abs(fit_alpha(current, reference, "float32") - 0.9**10) < 0.1
    blob, recon = encode_delta(current, reference, domain="scaled")
    assert recon[[3, 4, 5, 6]].tobytes() == current[[3, 4, 5, 6]].tobytes()
    assert decode_delta(blob, reference).tobytes() == recon.tobytes()

    tiny = np.full(2000, 1e-38, np.float32)
    huge = np.full(2000, 3e38, np.float32)
    huge[0] = 1e-38
    blob, recon = encode_delta(huge, tiny, domain="scaled")  # alpha ~1e76: not a float32
    assert decode_delta(blob, tiny).tobytes() == recon.tobytes()
    assert np.all(np.isfinite(recon))


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(hnp.arrays(np.float32, 64, elements=st.floats(-1e6, 1e6, width=32)),
                      min_size=2, max_size=5),
       bits=st.integers(1, 8))
def test_scaled_chain_decodes_bit_exact(steps: list[np.ndarray], bits: int) -> None:
    """Whatever the values, a chain in the scaled domain decodes to the encoder's
    reconstruction bit for bit, and every reconstruction is finite."""
    held = steps[0]
    for state in steps[1:]:
        blob, recon = encode_delta(state, held, bits=bits, domain="scaled")
        assert decode_delta(blob, held).tobytes() == recon.tobytes()
        assert np.all(np.isfinite(recon))
        held = recon
