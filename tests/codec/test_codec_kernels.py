"""The compiled kernels (issue 17) against the numpy codec they replaced (``codec_oracle``).

The blob format is the contract: for every dtype, domain, representative, width and coder,
on adversarial values (NaN, Inf, zeros, -0.0, subnormals, extremes) and at tiny and
chunk-boundary sizes, the kernels must write the very bytes the numpy codec wrote and
reconstruct, and decode, the very same values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ckptd.daemon import codec
from ckptd.daemon.codec import chunks, domains, kernels, scaled
from codec_oracle import decode_delta as oracle_decode
from codec_oracle import encode_delta as oracle_encode
from codec_oracle import fit_alpha as oracle_fit_alpha
from codec_oracle import scale_reference as oracle_scale
from hypothesis import given, settings
from hypothesis import strategies as st

_HOLDERS = {"float32": np.float32, "float16": np.float16, "float64": np.float64,
            "bfloat16": np.uint16}
_SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-40,
                      -1.1754942e-38, 1.1754944e-38, 3.4028235e38, -3.4028235e38, 6.1e-5,
                      65504.0, 65520.0, -2.0], np.float32)
_CHUNK = chunks.CHUNK_ELEMS
_SIZES = st.one_of(st.integers(1, 70), st.integers(71, 5000),
                   st.sampled_from([_CHUNK - 1, _CHUNK, _CHUNK + 1]))


def _bf16(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).view(
        torch.int16).numpy().view(np.uint16)


def _pair(dtype: str, domain: str, size: int, seed: int,
          specials: float) -> tuple[np.ndarray, np.ndarray]:
    """(reference, current): a small random step, with a share of special values in both."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-30, 4, size) if domain == "log" else 1.0
    reference = rng.standard_normal(size) * scale
    if domain == "log":
        reference = np.abs(reference)
    current = reference * (1 + rng.standard_normal(size) * 10.0 ** rng.integers(-6, 0))
    if domain == "scaled":  # a decay, as Adam's first moment between saves
        current *= rng.uniform(0.2, 1.0)
    if rng.random() < 0.3:  # jumps of many octaves (the log domain's error bound)
        jump = rng.random(size) < 0.05
        current[jump] *= 2.0 ** rng.integers(-20, 21, int(jump.sum()))
    for array in (reference, current):
        hit = rng.random(size) < specials
        array[hit] = _SPECIALS[rng.integers(0, _SPECIALS.size, int(hit.sum()))]
    if rng.random() < 0.3:  # elements that do not change at all
        same = rng.random(size) < 0.5
        current[same] = reference[same]
    if dtype == "bfloat16":
        return _bf16(reference), _bf16(current)
    with np.errstate(over="ignore"):
        return reference.astype(_HOLDERS[dtype]), current.astype(_HOLDERS[dtype])


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(list(_HOLDERS)), domain=st.sampled_from(["linear", "log", "scaled"]),
       representative=st.sampled_from(["mean", "midrange"]),
       bits=st.one_of(st.integers(1, 8), st.just("auto")),
       coder=st.sampled_from(["zstd", "huffman"]), size=_SIZES,
       seed=st.integers(0, 2**32 - 1), specials=st.sampled_from([0.0, 0.01, 0.3]))
def test_kernels_write_the_numpy_codecs_bytes(  # noqa: PLR0917 (hypothesis draws them)
        dtype: str, domain: str, representative: str, bits: int | str, coder: str, size: int,
        seed: int, specials: float) -> None:
    reference, current = _pair(dtype, domain, size, seed, specials)
    options = {"bits": bits, "representative": representative, "coder": coder,
               "bfloat16": dtype == "bfloat16", "domain": domain}
    blob, recon = codec.encode_delta(current, reference, **options)  # type: ignore[arg-type]
    expected_blob, expected_recon = oracle_encode(current, reference, **options)
    assert blob == expected_blob
    assert recon.tobytes() == expected_recon.tobytes()
    assert codec.decode_delta(blob, reference).tobytes() == recon.tobytes()
    assert oracle_decode(blob, reference).tobytes() == recon.tobytes()


def test_golden_blobs_decode_as_the_numpy_codec_does() -> None:
    golden = Path(__file__).parent / "golden"
    decoded = 0
    for path in sorted(golden.glob("*delta*.ckpd")):
        blob = path.read_bytes()
        info = codec.blob_info(blob)
        holder = np.uint16 if info.dtype == "bfloat16" else np.dtype(info.dtype)
        rng = np.random.default_rng(len(blob))
        reference = rng.standard_normal(info.shape).astype(np.float32).astype(holder)
        if info.domain == "log":
            reference = np.abs(reference)
        assert codec.decode_delta(blob, reference).tobytes() == oracle_decode(
            blob, reference).tobytes()
        decoded += 1
    assert decoded >= 6


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """The kernel's ``-0.0 + values`` rounded to ``dtype``: exactly ``values`` rounded."""
    ops = domains.Ops(domains.LINEAR, dtype)
    holder = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    negative_zero = np.full(values.size, -0.0, np.float32)
    ref = _bf16(negative_zero) if dtype == "bfloat16" else negative_zero.astype(holder)
    out = np.empty(values.size, holder)
    ops.add_values(values.astype(np.float32), ref, out)
    return out


def test_float16_rounding_matches_numpy() -> None:
    # Every half, the midpoints between neighbours (ties) and one float32 ulp either side.
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    halves = np.sort(halves[np.isfinite(halves)])
    mids = ((halves[1:] + halves[:-1]) / 2).astype(np.float32)
    values = np.concatenate([halves.astype(np.float32), mids, np.nextafter(mids, np.inf),
                             np.nextafter(mids, -np.inf), _SPECIALS,
                             np.float32([65519.996, 65520.0, 65536.0, 1e-8, 3e-8, 2.9802322e-08])])
    finite = np.isfinite(values)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    assert _rounded(values, "float16")[finite].tobytes() == expected[finite].tobytes()
    random = np.random.default_rng(3).integers(0, 2**32, 200_000, dtype=np.uint64)
    values = random.astype(np.uint32).view(np.float32)
    finite = np.isfinite(values)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    assert _rounded(values, "float16")[finite].tobytes() == expected[finite].tobytes()


def test_bfloat16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(4)
    words = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    words[:4] = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF]  # ties, near-max
    values = words.view(np.float32)
    finite = np.isfinite(values)
    expected = _bf16(values[finite])
    assert _rounded(values, "bfloat16")[finite].tobytes() == expected.tobytes()


def _reference_stats(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts and mantissa sums per key by a plain masked scatter."""
    keys = (delta.view(np.uint32) >> 23).astype(np.intp)
    mantissas = (delta.view(np.uint32) & ((1 << 23) - 1)).astype(np.uint64)
    sums = np.zeros(kernels.NKEYS, np.uint64)
    np.add.at(sums, keys, mantissas)
    return np.bincount(keys, minlength=kernels.NKEYS).astype(np.int64), sums


@pytest.mark.parametrize("word", [0xFFFFFFFF, 0x7FFFFFFF, 0x007FFFFF, 0x0, 0x80000000])
def test_statistics_of_the_largest_keys_and_mantissas(word: int) -> None:
    delta = np.full(1 << 20, word, np.uint32).view(np.float32)
    delta[::7] = np.float32(1.5)
    # x - 0.0 == x bit for bit (-0.0 and NaN payloads too): the deltas are these words.
    stats = domains.Ops(domains.LINEAR, "float32").stats(delta, np.zeros_like(delta),
                                                         "mean")
    counts, sums = _reference_stats(delta)
    np.testing.assert_array_equal(stats.counts, counts)
    assert stats.mantissa_sums is not None
    np.testing.assert_array_equal(stats.mantissa_sums, sums)


@pytest.mark.slow
def test_kernels_work_without_a_writable_cache(tmp_path: Path) -> None:
    # No cache location at all (as with a read-only install and no writable home): the
    # kernels compile in the process instead, and the codec gives the same bytes.
    probe = (
        "import numba.core.caching as c\n"
        "c.CacheImpl._locator_classes = []\n"
        "import numpy as np\n"
        "from ckptd.daemon import codec\n"
        "from ckptd.daemon.codec import kernels\n"
        "assert kernels.for_dtype('float32', False).analyze._cache.__class__.__name__ "
        "== 'NullCache'\n"
        "ref = np.linspace(-1, 1, 1000, dtype=np.float32)\n"
        "blob, _ = codec.encode_delta(ref * np.float32(1.001), ref)\n"
        "print(blob.hex())\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "unused")}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, timeout=300, env=env)
    ref = np.linspace(-1, 1, 1000, dtype=np.float32)
    assert bytes.fromhex(result.stdout.strip()) == codec.encode_delta(
        ref * np.float32(1.001), ref)[0]
    assert not (tmp_path / "unused").exists()


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(sorted(_HOLDERS)), size=_SIZES, seed=st.integers(0, 2**32 - 1),
       specials=st.sampled_from([0.0, 0.01, 0.3]))
def test_scaled_reference_and_alpha_match_the_numpy_passes(dtype: str, size: int, seed: int,
                                                           specials: float) -> None:
    # The fused scale kernel and fit_alpha's float32 path without copies or masks (issue 17,
    # encode CPU) against the numpy passes they replaced, special values included.
    reference, current = _pair(dtype, "scaled", size, seed, specials)
    alpha = scaled.fit_alpha(current, reference, dtype)
    assert alpha.tobytes() == oracle_fit_alpha(current, reference, dtype).tobytes()
    expected = oracle_scale(reference, alpha, dtype)
    out = np.empty_like(reference)
    scaled.scale_reference(reference, alpha, dtype, out)
    assert out.tobytes() == expected.tobytes()
    scaled.scale_reference(reference, alpha, dtype, reference)  # in place
    assert reference.tobytes() == expected.tobytes()
