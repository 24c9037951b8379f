"""bits="auto": per tensor and per save, the smallest width within the error budget.

The budget is the relative L2 error the dropped buckets add to the reconstructed change;
the width is chosen from pass 1's bucket statistics and recorded in the blob's header.
"""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.daemon.codec import AUTO_MAX_ERROR, CodecError, blob_info, decode_delta, encode_delta


def _dropped_error(current: np.ndarray, reference: np.ndarray, recon: np.ndarray) -> float:
    """Relative L2 error of the change over the elements the delta dropped (restored as
    their reference value)."""
    change = current.astype(np.float64) - reference
    dropped = recon == reference
    return float(np.linalg.norm(change[dropped]) / np.linalg.norm(change))


def _delta_of(magnitudes: list[tuple[float, int]], seed: int = 0) -> np.ndarray:
    """A shuffled delta with ``count`` elements of each exact magnitude, random signs."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([np.full(count, value, np.float32) for value, count in magnitudes])
    values *= rng.choice(np.array([-1, 1], np.float32), values.size)
    return rng.permutation(values)


def test_a_flat_change_gets_few_bits_and_a_busy_one_more() -> None:
    reference = np.zeros(20_000, np.float32)
    flat = _delta_of([(1.5, 20_000)])  # one exponent, two signs: 2 buckets
    busy = np.random.default_rng(1).standard_normal(20_000).astype(np.float32)
    flat_blob, flat_recon = encode_delta(flat, reference, bits="auto")
    busy_blob, _ = encode_delta(busy, reference, bits="auto")
    assert blob_info(flat_blob).bits == 2
    assert np.array_equal(flat_recon, flat)  # both buckets kept, each of one value
    assert blob_info(busy_blob).bits >= 3  # a Gaussian spans many exponents


@pytest.mark.parametrize("budget", [0.0, 0.02, 0.1, 0.3, 0.6])
def test_the_chosen_width_is_the_smallest_within_the_budget(budget: float) -> None:
    # Exact powers of two: every bucket holds one value, so the estimate is exact.
    reference = np.zeros(30_000, np.float32)
    current = _delta_of([(8.0, 2_000), (2.0, 6_000), (0.5, 8_000), (0.125, 8_000),
                         (2.0 ** -5, 6_000)])
    blob, recon = encode_delta(current, reference, bits="auto", auto_max_error=budget)
    bits = blob_info(blob).bits
    assert _dropped_error(current, reference, recon) <= budget + 1e-6
    if bits > 1:
        _, narrower = encode_delta(current, reference, bits=bits - 1)
        assert _dropped_error(current, reference, narrower) > budget
    assert np.array_equal(decode_delta(blob, reference), recon)


def test_a_larger_budget_never_takes_more_bits() -> None:
    rng = np.random.default_rng(2)
    reference = rng.standard_normal(50_000).astype(np.float32)
    current = reference + (rng.standard_t(3, 50_000) * 1e-3).astype(np.float32)
    widths = [blob_info(encode_delta(current, reference, bits="auto",
                                     auto_max_error=budget)[0]).bits
              for budget in (0.0, 0.01, 0.05, AUTO_MAX_ERROR, 0.3, 0.9)]
    assert widths == sorted(widths, reverse=True)
    assert widths[0] == 8 and widths[-1] < widths[0]


@pytest.mark.parametrize("domain", ["linear", "log"])
def test_auto_chains_decode_bit_for_bit(domain: str) -> None:
    rng = np.random.default_rng(3)
    true = np.abs(rng.standard_normal(4096)).astype(np.float32)
    held = true.copy()
    seen = set()
    for step in range(6):
        true = np.abs(true + rng.standard_normal(4096).astype(np.float32) * 0.1 * (step + 1))
        blob, recon = encode_delta(true, held, bits="auto", domain=domain)
        assert np.array_equal(decode_delta(blob, held), recon)
        seen.add(blob_info(blob).bits)
        held = recon
    assert all(1 <= b <= 8 for b in seen)


def test_an_unchanged_tensor_gets_one_bit() -> None:
    values = np.arange(2048, dtype=np.float32)
    blob, recon = encode_delta(values, values, bits="auto")
    assert blob_info(blob).bits == 1 and np.array_equal(recon, values)


@pytest.mark.parametrize(("bits", "budget", "needle"), [
    ("Auto", AUTO_MAX_ERROR, "got 'Auto'"), ("auto", 1.0, "auto_max_error"),
    ("auto", float("nan"), "auto_max_error"), ("auto", -0.1, "auto_max_error")])
def test_bad_auto_options_are_refused(bits: str, budget: float, needle: str) -> None:
    values = np.zeros(16, np.float32)
    with pytest.raises(CodecError, match=needle):
        encode_delta(values, values, bits=bits, auto_max_error=budget)  # type: ignore[arg-type]


def test_a_state_relative_budget_gives_a_larger_change_more_bits() -> None:
    """The same change pattern at two scales: relative to the delta the widths are equal
    (the rule is scale-free in the delta); relative to the state the tiny change between
    frequent saves gets fewer bits than the large one between sparse saves."""
    rng = np.random.default_rng(4)
    reference = rng.standard_normal(50_000).astype(np.float32)
    pattern = rng.standard_t(3, 50_000)
    widths = {}
    for relative_to in ("delta", "state"):
        for scale in (1e-4, 1e-2):
            current = reference + (pattern * scale).astype(np.float32)
            blob, recon = encode_delta(current, reference, bits="auto", auto_max_error=0.01,
                                       auto_relative_to=relative_to)  # type: ignore[arg-type]
            assert np.array_equal(decode_delta(blob, reference), recon)
            widths[relative_to, scale] = blob_info(blob).bits
    assert widths["delta", 1e-4] == widths["delta", 1e-2]
    assert widths["state", 1e-4] < widths["state", 1e-2]


@pytest.mark.parametrize("budget", [0.001, 0.01, 0.05])
def test_the_state_relative_width_is_the_smallest_within_the_budget(budget: float) -> None:
    # Exact powers of two against a reference of norm 100: the estimate is exact.
    reference = np.full(10_000, 1.0, np.float32)
    change = _delta_of([(2.0 ** -3, 2_000), (2.0 ** -5, 4_000), (2.0 ** -7, 4_000)])
    current = reference + change
    blob, recon = encode_delta(current, reference, bits="auto", auto_max_error=budget,
                               auto_relative_to="state")
    bits = blob_info(blob).bits
    norm = float(np.linalg.norm(reference))

    def dropped(recon: np.ndarray) -> float:
        return float(np.linalg.norm(change[recon == reference]))

    assert dropped(recon) <= budget * norm + 1e-6
    if bits > 1:
        assert dropped(encode_delta(current, reference, bits=bits - 1)[1]) > budget * norm


def test_the_log_domain_budget_is_a_relative_error_of_the_state() -> None:
    """Its delta is a log-step, a relative change of the state already: under "state" the
    dropped log-steps' RMS stays within the budget, so a 100x smaller relative change gets
    fewer bits, while "delta" gives both the same."""
    rng = np.random.default_rng(6)
    reference = np.abs(rng.standard_normal(20_000)).astype(np.float32) + 0.1
    pattern = rng.standard_t(3, 20_000)
    widths = {}
    for relative_to in ("delta", "state"):
        for scale in (1e-4, 1e-2):
            current = reference * np.exp(pattern * scale).astype(np.float32)
            blob, recon = encode_delta(current, reference, bits="auto", domain="log",
                                       auto_max_error=0.01,
                                       auto_relative_to=relative_to)  # type: ignore[arg-type]
            steps = np.log(current.astype(np.float64)) - np.log(reference)
            dropped = steps[recon == reference]
            if relative_to == "state":
                assert np.sqrt(np.sum(dropped ** 2) / steps.size) <= 0.01 * 1.01
            widths[relative_to, scale] = blob_info(blob).bits
    assert widths["delta", 1e-4] == widths["delta", 1e-2]
    assert widths["state", 1e-4] < widths["state", 1e-2]


def test_a_bad_auto_reference_is_refused() -> None:
    values = np.zeros(16, np.float32)
    with pytest.raises(CodecError, match=r"auto_relative_to must be one of.*'tensor'"):
        encode_delta(values, values, bits="auto", auto_relative_to="tensor")  # type: ignore[arg-type]
