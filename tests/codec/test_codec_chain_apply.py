"""``codec.apply_deltas`` (a chain's restore, chunk by chunk across the chain) against the
oracle: the numpy codec's ``decode_delta`` applied one delta at a time.

Every domain (linear, log, scaled), every dtype, widths 1..8, both coders, both modes of the
adaptive layout (packed chunks and split ones) and chunks smaller than the tensor, so the
chunk loop, the exceptions falling in each chunk and the tail of a chunk's packed bytes are
all crossed. The result must be the same bits, never merely close.
"""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.daemon import codec
from ckptd.daemon.codec import chunks, kernels, layouts
from codec_oracle import decode_delta as oracle_decode
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec_format import CASES, GOLDEN, LEGACY

_SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-40, 3.4028235e38, -2.0],
                     np.float32)
_DTYPES = ["float32", "float16", "bfloat16", "float64"]


def _chain(dtype: str, domain: str, *, seed: int, size: int, depth: int, changed: float,
           coder: str = "zstd") -> tuple[np.ndarray, list[bytes], np.ndarray]:
    """(base, delta blobs, the encoder's last reconstruction) of a chain ``depth`` long,
    each step changing about ``changed`` of the elements (little: split chunks)."""
    rng = np.random.default_rng(seed)
    value = np.abs(rng.standard_normal(size)) * 0.02
    value[rng.integers(0, size, size // 40 + 1)] = 0.0
    base = _as(value, dtype)
    blobs, recon = [], base.copy()
    for step in range(depth):
        moved = rng.random(size) < changed
        value = np.where(moved, value * (1.0 - 0.05 * step) + rng.standard_normal(size) * 1e-3,
                         value)
        current = _as(value, dtype)
        if step % 2:  # exceptions: non-finite values, negative ones in the log domain
            specials = _as(_SPECIALS.astype(np.float64), dtype)
            current[rng.integers(0, size, size // 30 + 1)] = specials[rng.integers(0, 9)]
        blob, recon = codec.encode_delta(current, recon, bits=int(rng.integers(1, 9)),
                                         coder=coder, domain=domain,
                                         bfloat16=dtype == "bfloat16")
        blobs.append(blob)
    return base, blobs, recon


def _as(values: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "bfloat16":
            return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return values.astype(dtype)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(_DTYPES), domain=st.sampled_from(["linear", "log", "scaled"]),
       seed=st.integers(0, 2**32 - 1), size=st.integers(1, 5000), depth=st.integers(1, 5),
       changed=st.sampled_from([0.03, 0.5, 1.0]), coder=st.sampled_from(["zstd", "huffman"]),
       chunk_elems=st.sampled_from([1024, 2048, chunks.CHUNK_ELEMS]))
def test_chain_equals_deltas_applied_one_at_a_time(  # noqa: PLR0917 (hypothesis draws them)
        dtype: str, domain: str, seed: int, size: int, depth: int, changed: float, coder: str,
        chunk_elems: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunks, "CHUNK_ELEMS", chunk_elems)  # the encoder's (huffman: 1024k)
        base, blobs, recon = _chain(dtype, domain, seed=seed, size=size, depth=depth,
                                    changed=changed, coder=coder)
    expected = base.copy()
    for blob in blobs:
        expected = oracle_decode(blob, expected)
    target, in_place = base.copy(), seed % 3 != 0
    applied = codec.apply_deltas(blobs, target, in_place=in_place, verified=seed % 2 == 0)
    assert np.shares_memory(applied, target) == in_place
    assert applied.tobytes() == expected.tobytes() == recon.tobytes()


@pytest.mark.parametrize("changed", [0.03, 1.0])
def test_both_adaptive_modes_are_crossed(changed: float) -> None:
    """The chains above hold split chunks (few changes) and packed ones (many)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunks, "CHUNK_ELEMS", 1000)
        _, blobs, _ = _chain("float32", "linear", seed=7, size=5000, depth=1, changed=changed)
    parsed = codec.delta.parse_delta(blobs[0], np.zeros(5000, np.float32))
    modes = {bytes(body[:1]) for body in parsed.bodies}
    assert (b"\x01" if changed < 0.5 else b"\x00") in modes


@pytest.mark.parametrize("name", sorted(name for name, case in {**CASES, **LEGACY}.items()
                                         if name.startswith(("delta", "legacy_delta"))))
def test_golden_delta_blobs_apply_as_they_decode(name: str) -> None:
    """Every layout the format has had (legacy ones through their values)."""
    reference = CASES[name][1] if name in CASES else LEGACY[name][0]
    assert reference is not None
    blob = (GOLDEN / f"{name}.ckpd").read_bytes()
    applied = codec.apply_deltas([blob, blob], np.array(reference(), copy=True), in_place=True)
    expected = codec.decode_delta(blob, codec.decode_delta(blob, reference()))
    assert applied.tobytes() == expected.tobytes()


def test_a_corrupt_blob_is_named_by_its_position() -> None:
    base, blobs, _ = _chain("float32", "linear", seed=3, size=2000, depth=3, changed=1.0)
    damaged = bytearray(blobs[1])
    damaged[-3] ^= 0xFF
    with pytest.raises(codec.ChainError, match="checksum") as caught:
        codec.apply_deltas([blobs[0], bytes(damaged), blobs[2]], base)
    assert caught.value.position == 1
    with pytest.raises(codec.ChainError, match="reference is float64") as caught:
        codec.apply_deltas(blobs, base.astype(np.float64))
    assert caught.value.position == 0
    read_only = base.copy()
    read_only.flags.writeable = False
    with pytest.raises(codec.ChainError, match="in place"):
        codec.apply_deltas(blobs, read_only, in_place=True)


@pytest.mark.parametrize("dtype", _DTYPES)
def test_kernels_refuse_symbols_outside_their_stream(dtype: str) -> None:
    """b = 3 packs symbols into nibbles: 8..15 are corrupt, in whole bytes and in the last."""
    fns = kernels.for_dtype(dtype, False)
    reps = np.zeros(256, np.float32)
    out = np.zeros(4, kernels.HOLDERS[dtype])
    assert fns.apply_packed(np.array([0x77, 0x07], np.uint8), 3, 3, reps, out)
    assert not fns.apply_packed(np.array([0x77, 0x08], np.uint8), 3, 3, reps, out)
    assert not fns.apply_packed(np.array([0x87], np.uint8), 2, 3, reps, out)


def test_adaptive_streams_refuse_an_unknown_mode() -> None:
    with pytest.raises(codec.CodecError, match="layout mode 7"):
        layouts.adaptive_streams(memoryview(b"\x07abc"), 4, 3, chunks.Scratch())


def test_a_chain_from_a_read_only_reference_leaves_it_alone() -> None:
    """Not in place (a restore from a raw base's view): a new array, the reference intact."""
    base, blobs, recon = _chain("bfloat16", "scaled", seed=5, size=3000, depth=3, changed=0.5)
    reference = base.copy()
    reference.flags.writeable = False
    applied = codec.apply_deltas(blobs, reference)
    assert not np.shares_memory(applied, reference)
    assert applied.tobytes() == recon.tobytes()
    assert reference.tobytes() == base.tobytes()


@pytest.mark.parametrize("depth", [0, 3])
def test_a_chain_writes_into_a_given_output(depth: int) -> None:
    """``out`` (a restore's reused buffer, stale bytes in it): the result lands there, the
    same bits as into a new array, the read-only reference intact."""
    base, blobs, recon = _chain("float32", "linear", seed=6, size=3000, depth=depth,
                                changed=0.5)
    reference = base.copy()
    reference.flags.writeable = False
    out = np.full(base.size, np.nan, np.float32)
    applied = codec.apply_deltas(blobs, reference, out=out)
    assert np.shares_memory(applied, out)
    assert applied.tobytes() == recon.tobytes() == out.tobytes()
    assert reference.tobytes() == base.tobytes()


def test_a_chain_refuses_an_output_it_cannot_fill() -> None:
    base, blobs, _ = _chain("float32", "linear", seed=7, size=3000, depth=2, changed=0.5)
    for out in (np.empty(base.size, np.float64), np.empty(base.size - 1, np.float32),
                np.empty(2 * base.size, np.float32)[::2], base):
        with pytest.raises(ValueError, match="out must be"):
            codec.apply_deltas(blobs, base, out=out)
