"""The serialized form is the contract: golden blobs, header layout, corruption handling.

Golden blobs in ``golden/`` were written by format version 1, except ``*_log`` (version 2,
the log domain) and ``*_scaled`` (version 4, the scaled reference). Decoding them must keep
working (and give the pinned reconstruction) for as long as version 1 is readable. Encoding
the same inputs must give the same bytes; if only a zstandard upgrade changes its output,
``test_golden_blobs_decode`` still passes and the files may be regenerated with
``python tests/codec/test_codec_format.py --regenerate``.

``legacy_*`` blobs were written with the zstd coder's original layouts (parameter 0 packed,
1 split), which the encoder no longer writes since the adaptive layout (2) replaced them:
they are decode-only, and never regenerated.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from ckptd.daemon.codec import (
    BlobInfo,
    CodecError,
    blob_info,
    decode_delta,
    decode_exact,
    encode_delta,
    encode_exact,
    raw_view,
)
from hypothesis import given, settings
from hypothesis import strategies as st

GOLDEN = Path(__file__).parent / "golden"


def _ref16() -> np.ndarray:
    return np.linspace(-1, 1, 16, dtype=np.float32)


def _cur16() -> np.ndarray:
    steps = (np.arange(16) % 5 - 2).astype(np.float32) * np.float32(0.01)
    return _ref16() + steps


def _bf16(values: np.ndarray) -> np.ndarray:
    """bfloat16 words by truncation (exact for these inputs, no torch needed)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _mostly_tiny() -> np.ndarray:
    """Four large steps of distinct exponents, twelve tiny ones: at b = 2 most symbols are 0,
    so the zstd coder picks its split layout."""
    steps = np.full(16, 1e-4, np.float32)
    steps[[1, 6, 11, 15]] = [0.5, -0.25, 0.125, 0.0625]
    return _ref16() + steps


def _sparse_pair() -> tuple[np.ndarray, np.ndarray]:
    """(reference, current) of 2048 elements: 12% large steps at scattered positions (an
    integer hash, no RNG), the rest tiny. At b = 2 the adaptive layout picks split."""
    h = np.arange(2048, dtype=np.uint64) * np.uint64(2654435761) % np.uint64(1 << 32)
    h ^= h >> np.uint64(15)
    h = h * np.uint64(2246822519) % np.uint64(1 << 32)
    h ^= h >> np.uint64(13)
    reference = np.linspace(-1, 1, 2048, dtype=np.float32)
    large = np.array([0.5, -0.25, 0.125], np.float32)[h % np.uint64(3)]
    return reference, reference + np.where(h % np.uint64(1000) < 120, large, np.float32(1e-4))


def _second_moment() -> tuple[np.ndarray, np.ndarray]:
    """(reference, current) for the log domain: zeros, a subnormal, 1e-30..1e3, a collapse
    to zero, NaN and a negative (the last two verbatim)."""
    reference = np.logspace(-30, 3, 16, dtype=np.float32)
    reference[0] = 0.0
    current = reference * np.float32(1.5)
    current[[1, 5, 9, 12]] = [np.float32(1e-40), 0.0, np.nan, -1.0]
    return reference, current


def _decayed() -> np.ndarray:
    """A tensor that decayed to 0.35x its reference (Adam's first moment over 10 steps), plus
    small changes and a NaN (left out of the fit, stored verbatim): the scaled domain."""
    current = _ref16() * np.float32(0.35) + ((np.arange(16) % 3 - 1) * 0.001).astype(np.float32)
    current[4] = np.nan
    return current


def _with_nan() -> np.ndarray:
    current = _cur16()
    current[[2, 9]] = [np.nan, -np.inf]
    return current


# name -> (encode the blob, reference for decode or None, sha256 of the decoded bytes)
CASES: dict[str, tuple[Callable[[], bytes], Callable[[], np.ndarray] | None, str]] = {
    "delta_f32_b3_zstd_mean": (
        lambda: encode_delta(_cur16(), _ref16())[0], _ref16,
        "7d68cb2a9ac46ea4794ee2e1c12aa8e3e870cbc374e8c74d16997b72c05cefb1"),
    "delta_f32_b2_zstd_split": (
        lambda: encode_delta(_sparse_pair()[1], _sparse_pair()[0], bits=2)[0],
        lambda: _sparse_pair()[0],
        "6141fead1ebb95f580b8997844f80806a42978f9add0668d48a1b3cb404df4f3"),
    "delta_f16_b2_huffman_midrange": (
        lambda: encode_delta(_cur16().astype(np.float16), _ref16().astype(np.float16), bits=2,
                             coder="huffman", representative="midrange")[0],
        lambda: _ref16().astype(np.float16),
        "b3f3d8481a6c69e7b6f5c2cdb0771a0bb80e8fbf4f9631baf558201f06fa61f5"),
    "delta_bf16_b4_zstd_mean": (
        lambda: encode_delta(_bf16(_cur16()), _bf16(_ref16()), bits=4, bfloat16=True)[0],
        lambda: _bf16(_ref16()),
        "0a7a97f95b711cffc6d2640c2cbc9b0a8deb381d313b76f47b25420ee1fcb15c"),
    "delta_f32_nan_exceptions": (
        lambda: encode_delta(_with_nan(), _ref16())[0], _ref16,
        "c542633495314f81867b036de08cbcb7c4c72b4218839593be1c0f50dd7503f8"),
    "delta_f32_b3_zstd_log": (
        lambda: encode_delta(_second_moment()[1], _second_moment()[0], domain="log")[0],
        lambda: _second_moment()[0],
        "609654cd02d3dbc658cfefc2a05abea993ac5d5754385628834f8f1ce2983743"),
    "delta_f32_b3_zstd_scaled": (
        lambda: encode_delta(_decayed(), _ref16(), domain="scaled")[0], _ref16,
        "81751c26125314adc49e9caf40128b54110c8816a55d8696e3b9680230716a32"),
    "exact_int64_2x3": (
        lambda: encode_exact(np.arange(6, dtype=np.int64).reshape(2, 3)), None,
        "f190072c5052f4f440d4a607c25f5bced487c420806c9aab4ca5b0653e72da61"),
    "exact_f32_planes": (
        lambda: encode_exact(_ref16()), None,
        "188268261dd42de28aa6bb914cdb0d67980f3790ea5225a3dda9936cfd2181b3"),
    "exact_bf16_0d": (
        lambda: encode_exact(np.array(0x3F80, np.uint16), bfloat16=True), None,
        "b9c205bdac187f20bf876cea369cb6032ad1bf69043b31d716b36b8defbffdf2"),
}


# Decode-only blobs of the original zstd layouts: name -> (reference, sha256 of the decoded bytes).
LEGACY: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    "legacy_delta_f32_b3_zstd_packed": (
        _ref16, "7d68cb2a9ac46ea4794ee2e1c12aa8e3e870cbc374e8c74d16997b72c05cefb1"),
    "legacy_delta_f32_b2_zstd_split": (
        _ref16, "69b81a94db18fa6ff39214477fda6f6468fdf194d1bb5d0422f1dc36a6eab44b"),
    "legacy_delta_bf16_b4_zstd_packed": (
        lambda: _bf16(_ref16()),
        "0a7a97f95b711cffc6d2640c2cbc9b0a8deb381d313b76f47b25420ee1fcb15c"),
}


def _decode(blob: bytes, reference: Callable[[], np.ndarray] | None) -> np.ndarray:
    return decode_exact(blob) if reference is None else decode_delta(blob, reference())


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_blobs_decode(name: str) -> None:
    _, reference, digest = CASES[name]
    decoded = _decode((GOLDEN / f"{name}.ckpd").read_bytes(), reference)
    assert hashlib.sha256(decoded.tobytes()).hexdigest() == digest


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_legacy_blobs_decode(name: str) -> None:
    reference, digest = LEGACY[name]
    decoded = decode_delta((GOLDEN / f"{name}.ckpd").read_bytes(), reference())
    assert hashlib.sha256(decoded.tobytes()).hexdigest() == digest


@pytest.mark.parametrize("name", sorted(name for name, case in {**CASES, **LEGACY}.items()
                                         if name.startswith(("delta", "legacy_delta"))))
def test_golden_delta_blobs_decode_in_place(name: str) -> None:
    """In place (a chain's restore) gives the same bytes, in the reference's own buffer."""
    reference = (CASES[name][1] if name in CASES else LEGACY[name][0])
    assert reference is not None
    blob = (GOLDEN / f"{name}.ckpd").read_bytes()
    target = np.array(reference(), copy=True)
    decoded = decode_delta(blob, target, in_place=True)
    assert np.shares_memory(decoded, target)
    assert decoded.tobytes() == decode_delta(blob, reference()).tobytes()


def test_legacy_split_matches_the_current_encoder() -> None:
    """Same input, old layout and new: the same reconstruction, the new blob no larger."""
    legacy = (GOLDEN / "legacy_delta_f32_b2_zstd_split.ckpd").read_bytes()
    blob, reconstruction = encode_delta(_mostly_tiny(), _ref16(), bits=2)
    assert np.array_equal(decode_delta(legacy, _ref16()).view(np.uint32),
                          reconstruction.view(np.uint32))
    assert len(blob) <= len(legacy)


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoding_reproduces_golden_bytes(name: str) -> None:
    encode, _, _ = CASES[name]
    assert encode() == (GOLDEN / f"{name}.ckpd").read_bytes()


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("delta")))
def test_encoding_into_used_memory_reproduces_golden_bytes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``out=`` (the daemon passes a replaced head's memory, full of old bytes) changes
    neither the blob nor the reconstruction; the reconstruction is ``out``."""
    fresh = encode_delta
    written = []

    def into_used_memory(current: np.ndarray, reference: np.ndarray,
                         **options: Any) -> tuple[bytes, np.ndarray]:
        out = np.empty_like(np.ascontiguousarray(current))
        out.reshape(-1).view(np.uint8)[:] = 0xA5
        blob, reconstruction = fresh(current, reference, out=out, **options)
        assert np.shares_memory(reconstruction, out)
        expected = fresh(current, reference, **options)[1]
        assert reconstruction.tobytes() == expected.tobytes()
        written.append(blob)
        return blob, reconstruction

    monkeypatch.setattr(sys.modules[__name__], "encode_delta", into_used_memory)
    encode, _, _ = CASES[name]
    assert encode() == (GOLDEN / f"{name}.ckpd").read_bytes()
    assert len(written) == 1


def test_exact_header_layout() -> None:
    blob = encode_exact(np.arange(3, dtype=np.int32))
    expected_prefix = bytes.fromhex(
        "434b5044"  # magic CKPD
        "01"  # version
        "02"  # kind exact
        "07"  # dtype int32
        "01"  # ndim
        "00"  # bits
        "01"  # coder zstd
        "00"  # representative none
        "00"  # flags: no byte planes for integers
        "00000400"  # chunk_elems 2^18
        "0300000000000000"  # count
    )
    assert blob[:24] == expected_prefix
    payload_len, payload_hash, dim0, crc = struct.unpack_from("<QQQI", blob, 24)
    assert dim0 == 3 and len(blob) == 52 + payload_len
    assert payload_hash == xxhash.xxh3_64_intdigest(blob[52:])
    assert crc == zlib.crc32(blob[:48])


def _coder_bytes(name: str) -> bytes:
    """Coder parameter length + parameter, then the first chunk body's mode byte (1-d, one
    chunk, no exceptions): right after the 2^b - 1 representatives."""
    blob = (GOLDEN / f"{name}.ckpd").read_bytes()
    start = 52 + ((1 << blob[8]) - 1) * 4
    return blob[start:start + 5] + blob[start + 5 + 16 + 4:start + 5 + 16 + 4 + 1]


def test_zstd_layouts_are_pinned() -> None:
    """Parameter 2 (adaptive) with chunk mode 0 (packed) or 1 (split); legacy 0 and 1."""
    assert _coder_bytes("delta_f32_b3_zstd_mean") == b"\x01\x00\x00\x00\x02\x00"
    assert _coder_bytes("delta_f32_b2_zstd_split") == b"\x01\x00\x00\x00\x02\x01"
    assert _coder_bytes("legacy_delta_f32_b3_zstd_packed")[:5] == b"\x01\x00\x00\x00\x00"
    assert _coder_bytes("legacy_delta_f32_b2_zstd_split")[:5] == b"\x01\x00\x00\x00\x01"


def test_log_domain_header_is_version_2() -> None:
    blob = (GOLDEN / "delta_f32_b3_zstd_log.ckpd").read_bytes()
    assert blob[4] == 2 and blob[11] == 2  # version, flags: log domain
    assert blob_info(blob).domain == "log"
    assert all((GOLDEN / f"{name}.ckpd").read_bytes()[4] == 1
               for name in (*CASES, *LEGACY) if not name.endswith(("_log", "_scaled")))


def test_scaled_domain_header_is_version_4_with_alpha_first() -> None:
    blob = (GOLDEN / "delta_f32_b3_zstd_scaled.ckpd").read_bytes()
    assert blob[4] == 4 and blob[11] == 4  # version, flags: scaled reference
    assert blob_info(blob).domain == "scaled"
    alpha = np.frombuffer(blob, np.float32, 1, 52)[0]  # the payload's first field
    assert abs(alpha - 0.35) < 0.01
    np.testing.assert_array_equal(  # dropped elements decay with alpha: within the steps
        np.abs(decode_delta(blob, _ref16()) - _decayed())[np.arange(16) != 4] <= 0.002, True)


def test_scaled_flag_is_refused_where_it_cannot_be() -> None:
    scaled = bytearray((GOLDEN / "delta_f32_b3_zstd_scaled.ckpd").read_bytes())
    for version, flags, message in ((3, 4, "flags 0x04 in a version 3"),
                                    (4, 6, "flags 0x06 in a version 4")):
        edited = bytearray(scaled)
        edited[4], edited[11] = version, flags  # before 4; together with the log domain
        with pytest.raises(CodecError, match=message):
            decode_delta(_reseal(bytes(edited)), _ref16())
    exact_blob = bytearray(encode_exact(_ref16()))
    exact_blob[4], exact_blob[11] = 4, exact_blob[11] | 4
    with pytest.raises(CodecError, match="version 4 exact blob"):
        decode_exact(_reseal(bytes(exact_blob)))


def test_log_flag_is_refused_where_it_cannot_be() -> None:
    log_blob = bytearray((GOLDEN / "delta_f32_b3_zstd_log.ckpd").read_bytes())
    log_blob[4] = 1  # a version-1 blob cannot be log-domain
    with pytest.raises(CodecError, match="flags 0x02 in a version 1"):
        decode_delta(_reseal(bytes(log_blob)), _second_moment()[0])
    exact_blob = bytearray(encode_exact(_ref16()))
    exact_blob[4], exact_blob[11] = 2, exact_blob[11] | 2
    with pytest.raises(CodecError, match="version 2 exact blob"):
        decode_exact(_reseal(bytes(exact_blob)))


def test_golden_blob_info() -> None:
    info = blob_info((GOLDEN / "delta_f16_b2_huffman_midrange.ckpd").read_bytes())
    assert info == BlobInfo("delta", "float16", (16,), 2, "huffman", "midrange", 32)
    info = blob_info((GOLDEN / "exact_bf16_0d.ckpd").read_bytes())
    assert info == BlobInfo("exact", "bfloat16", (), 0, "zstd", "none", 2)


def _sample_blobs() -> list[tuple[bytes, Callable[[], np.ndarray] | None]]:
    rng = np.random.default_rng(7)
    reference = rng.standard_normal(300).astype(np.float32)
    current = reference + rng.standard_normal(300).astype(np.float32) * np.float32(0.01)
    current[5] = np.nan
    return [
        (encode_delta(current, reference)[0], lambda: reference),
        (encode_delta(current, reference, coder="huffman", bits=5)[0], lambda: reference),
        (encode_delta(current, reference, bits=2)[0], lambda: reference),
        (encode_delta(_sparse_pair()[1], _sparse_pair()[0], bits=2)[0],
         lambda: _sparse_pair()[0]),  # adaptive layout, split mode
        ((GOLDEN / "legacy_delta_f32_b2_zstd_split.ckpd").read_bytes(), _ref16),
        (encode_exact(current), None),
        (encode_exact(np.arange(40, dtype=np.int16)), None),
    ]


def test_every_truncation_is_a_codec_error() -> None:
    for blob, reference in _sample_blobs():
        for length in range(len(blob)):
            with pytest.raises(CodecError):
                _decode(blob[:length], reference)
            with pytest.raises(CodecError):
                blob_info(blob[:length])


def test_every_single_bit_flip_is_a_codec_error() -> None:
    for blob, reference in _sample_blobs():
        for position in range(len(blob)):
            for bit in range(8):
                corrupt = bytearray(blob)
                corrupt[position] ^= 1 << bit
                with pytest.raises(CodecError):
                    _decode(bytes(corrupt), reference)


def test_trailing_bytes_are_a_codec_error() -> None:
    for blob, reference in _sample_blobs():
        with pytest.raises(CodecError, match="does not match its header"):
            _decode(blob + b"\0", reference)


def _reseal(blob: bytes) -> bytes:
    """Recomputes both checksums, as a buggy or malicious writer would."""
    end = 40 + 8 * blob[7]
    if end + 4 > len(blob):
        return blob
    data = bytearray(blob)
    struct.pack_into("<Q", data, 32, xxhash.xxh3_64_intdigest(bytes(data[end + 4:])))
    struct.pack_into("<I", data, end, zlib.crc32(bytes(data[:end])))
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 6), edits=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_sealed_garbage_never_crashes(which: int, edits: list[tuple[int, int]]) -> None:
    """Even with valid checksums, bad structure is a CodecError, never an IndexError & co."""
    blob, reference = _sample_blobs()[which]
    data = bytearray(blob)
    for position, value in edits:
        data[position % len(data)] = value
    if data[4] != 1:
        data[4] = 1  # keep the version valid so that the structure is parsed
    with contextlib.suppress(CodecError):
        _decode(_reseal(bytes(data)), reference)


def test_unknown_version_is_reported() -> None:
    blob = bytearray(encode_exact(np.arange(4)))
    blob[4] = 5
    with pytest.raises(CodecError, match="unsupported codec format version 5"):
        decode_exact(_reseal(bytes(blob)))
    with pytest.raises(CodecError, match="version 5"):
        blob_info(bytes(blob))


@pytest.mark.parametrize("array", [
    np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100),
    np.arange(7, dtype=np.int64), np.zeros((0, 3), np.float16), np.array(2.5),
])  # fmt: skip
def test_raw_exact_blob_round_trips_as_version_3(array: np.ndarray) -> None:
    blob = encode_exact(array, compress=False)
    info = blob_info(blob)
    assert (blob[4], info.kind, info.coder) == (3, "exact", "raw")
    assert len(blob) == 44 + 8 * array.ndim + array.nbytes  # header and the bytes, no more
    out = decode_exact(blob)
    assert out.dtype == array.dtype and out.shape == array.shape and out.flags.writeable
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("array", [
    np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.arange(7, dtype=np.int64),
    np.zeros((0, 3), np.float16), np.array(2.5),
])  # fmt: skip
def test_raw_view_is_the_raw_blobs_tensor_without_a_copy(array: np.ndarray) -> None:
    blob = encode_exact(array, compress=False)
    view = raw_view(blob)
    assert view is not None and not view.flags.writeable
    assert view.dtype == array.dtype and view.shape == array.shape
    np.testing.assert_array_equal(view, decode_exact(blob))
    if array.nbytes:
        assert np.shares_memory(view, np.frombuffer(blob, np.uint8))
    assert raw_view(encode_exact(array)) is None  # a coded exact blob
    delta, _ = encode_delta(np.ones(8, np.float32), np.zeros(8, np.float32))
    assert raw_view(delta) is None


def test_raw_blob_refused_where_it_cannot_be() -> None:
    raw = bytearray(encode_exact(np.arange(4, dtype=np.float32), compress=False))
    raw[4] = 2  # an older version cannot hold the raw coder
    with pytest.raises(CodecError, match="raw coder in a version 2 blob"):
        decode_exact(_reseal(bytes(raw)))
    raw[4], raw[11] = 3, 1  # byte planes on a raw blob
    with pytest.raises(CodecError, match="got a exact blob with flags 0x01"):
        decode_exact(_reseal(bytes(raw)))
    delta, _ = encode_delta(np.ones(8, np.float32), np.zeros(8, np.float32))
    forged = bytearray(delta)
    forged[9] = 3  # a delta blob claiming the raw coder
    with pytest.raises(CodecError, match="got a delta blob with flags"):
        decode_delta(_reseal(bytes(forged)), np.zeros(8, np.float32))
    short = bytearray(encode_exact(np.arange(4, dtype=np.float32), compress=False))
    struct.pack_into("<Q", short, 16, 5)  # count 5, shape (4,): caught before the payload
    with pytest.raises(CodecError, match="does not hold 5 elements"):
        decode_exact(_reseal(bytes(short)))


def test_not_a_blob() -> None:
    with pytest.raises(CodecError, match="not a ckptd codec blob"):
        decode_exact(b"PK\x03\x04" + bytes(60))
    with pytest.raises(CodecError, match="truncated"):
        blob_info(b"")


def test_kind_mismatch_is_reported() -> None:
    reference = _ref16()
    delta_blob = encode_delta(_cur16(), reference)[0]
    with pytest.raises(CodecError, match="use decode_delta"):
        decode_exact(delta_blob)
    with pytest.raises(CodecError, match="use decode_exact"):
        decode_delta(encode_exact(reference), reference)


def test_reference_mismatch_is_reported() -> None:
    reference = _ref16()
    blob = encode_delta(_cur16(), reference)[0]
    with pytest.raises(CodecError, match=r"blob needs float32"):
        decode_delta(blob, reference[:8])
    with pytest.raises(CodecError, match=r"blob needs float32"):
        decode_delta(blob, reference.astype(np.float64))
    with pytest.raises(CodecError, match="must match"):
        encode_delta(_cur16(), reference[:8])
    with pytest.raises(CodecError, match="must match"):
        encode_delta(_cur16(), reference.astype(np.float16))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 0}, "bits must be an integer in 1..8, got 0"),
    ({"bits": 9}, "got 9"),
    ({"bits": True}, "got True"),
    ({"bits": 3.0}, "got 3.0"),
    ({"representative": "median"}, "'median'"),
    ({"coder": "gzip"}, "'gzip'"),
])
def test_invalid_options(kwargs: dict, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        encode_delta(_cur16(), _ref16(), **kwargs)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.uint8])
def test_delta_rejects_non_float(dtype: type) -> None:
    values: np.ndarray = np.zeros(4, dtype)
    with pytest.raises(CodecError, match="store it with encode_exact"):
        encode_delta(values, values)


def _regenerate() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, (encode, reference, _) in sorted(CASES.items()):
        blob = encode()
        (GOLDEN / f"{name}.ckpd").write_bytes(blob)
        digest = hashlib.sha256(_decode(blob, reference).tobytes()).hexdigest()
        print(f"{name}: {len(blob)} bytes, decoded sha256 {digest}")


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate"]:
    _regenerate()
