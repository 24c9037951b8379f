"""The delta codec's numpy implementation, kept as the test oracle of the compiled kernels.

Until issue 17 this was the codec (``daemon/codec/delta.py``, ``quantize.py``, ``domains.py``):
about ten numpy passes per chunk. The daemon now runs ``daemon/codec/kernels.py``; the
tests check that both produce the same blob bytes and the same reconstruction, so the
format stays the one these functions define. Shared, unchanged pieces (statistics merge,
promotion, representatives, entropy coding, the blob layout) are imported from the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ckptd.daemon.codec import chunks, entropy, packing, quantize
from ckptd.daemon.codec.chunks import Scratch
from ckptd.daemon.codec.delta import (
    AUTO,
    _check_in_place,
    _check_options,
    _flat,
    _float_dtype,
    _little,
    _matching,
    _pack_exceptions,
    _read_exceptions,
)
from ckptd.daemon.codec.domains import DOMAIN_IDS, LINEAR
from ckptd.daemon.codec.format import (
    CODER_IDS,
    CODERS,
    KIND_DELTA,
    KIND_NAMES,
    REPRESENTATIVE_IDS,
    CodecError,
    Header,
    Reader,
    build_blob,
    domain_flags,
    read_chunks,
    unpack_header,
    verify_payload,
    write_chunks,
)

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
class Ops:
    """The two operations encode and decode run per chunk, for one domain and dtype."""

    domain: int
    dtype_name: str

    def delta32(self, cur: np.ndarray, ref: np.ndarray, out: np.ndarray,
                scratch: Scratch) -> None:
        """Writes the float32 delta of ``cur`` against ``ref`` into ``out``."""
        if self.domain == LINEAR:
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
        if self.domain == LINEAR:
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
        """``mask`` plus, in the log domain, the elements zero in ``cur`` but not in
        ``recon``: they are stored verbatim, so that a zero always survives."""
        if self.domain == LINEAR:
            return mask
        signed = _SIGNED[self.dtype_name]
        lost = np.equal(cur.view(signed), 0, out=scratch.get("lost", cur.size, np.bool_))
        lost &= recon.view(signed) != 0
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


def encode_delta(current: np.ndarray, reference: np.ndarray, *, bits: int | str,
                 representative: str, coder: str, bfloat16: bool, domain: str = "linear",
                 auto_max_error: float = quantize.AUTO_MAX_ERROR,
                 ) -> tuple[bytes, np.ndarray]:
    """``ckptd.daemon.codec.encode_delta`` in numpy."""
    _check_options(bits, representative, coder, domain, auto_max_error)
    current = np.asarray(current)
    dtype = _float_dtype(current, bfloat16)
    cur = _flat(current, dtype)
    ref = _flat(_matching(reference, current), dtype)
    out = chunks.empty_output(cur.size, dtype.holder)
    parts = chunks.bounds(cur.size, chunks.CHUNK_ELEMS)
    ops = Ops(DOMAIN_IDS[domain], dtype.name)
    pool = chunks.ScratchPool()
    with chunks.mapper(len(parts)) as run:
        stats = run(lambda s: _analyze(cur[s], ref[s], out[s], ops,
                                       representative=representative, scratch=pool.get()), parts)
        merged = quantize.merge(stats, representative)
        # The width is chosen between the passes: pass 1's statistics do not depend on it.
        bits = (quantize.auto_bits(merged, auto_max_error, representative) if bits == AUTO
                else int(bits))
        plan = quantize.make_plan(merged, bits, representative)
        enc = entropy.encoder(coder, plan.sym_counts, bits, cur.size)
        table = packing.ValueTable.build(plan.reps, bits)
        coded = run(lambda i: _encode_chunk(cur[parts[i]], ref[parts[i]], out[parts[i]], ops,
                                            plan=plan, table=table, enc=enc,
                                            nonfinite=stats[i].nonfinite, scratch=pool.get()),
                    range(len(parts)))
    bodies = [body for body, _ in coded]
    index = [idx + s.start for (_, idx), s in zip(coded, parts, strict=True) if idx is not None]
    flat_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    payload = [
        plan.reps[1:].astype(_F32).tobytes(),
        len(enc.params).to_bytes(4, "little"), enc.params,
        _pack_exceptions(flat_index, cur[flat_index], pool.get()),
        *write_chunks(bodies),
    ]
    header = Header(KIND_DELTA, dtype, tuple(current.shape), bits, CODER_IDS[coder],
                    REPRESENTATIVE_IDS[representative], domain_flags(ops.domain),
                    chunks.CHUNK_ELEMS, cur.size)
    return build_blob(header, payload), out.reshape(current.shape)


def decode_delta(blob: bytes | memoryview, reference: np.ndarray, *,
                 in_place: bool = False) -> np.ndarray:
    """``ckptd.daemon.codec.decode_delta`` in numpy."""
    view = memoryview(blob).cast("B")
    header = unpack_header(view)
    if header.kind != KIND_DELTA:
        raise CodecError(f"decode_delta got a {KIND_NAMES[header.kind]} blob; use decode_exact")
    reference = np.asarray(reference)
    if _little(reference.dtype) != header.dtype.holder or reference.shape != header.shape:
        raise CodecError(f"reference is {reference.dtype}{list(reference.shape)}, the blob needs "
                         f"{header.dtype.name} ({header.dtype.holder}){list(header.shape)}")
    reader = Reader(verify_payload(view, header))
    reps = np.concatenate([np.array([-0.0], _F32),
                           reader.array(_F32, (1 << header.bits) - 1, "representatives")])
    params = reader.take(reader.u32("coder parameter length"), "coder parameters")
    pool = chunks.ScratchPool()
    index, values = _read_exceptions(reader, header, pool.get())
    bodies = read_chunks(reader, header.nchunks)
    reader.at_end()
    parts = chunks.bounds(header.count, header.chunk_elems)
    values_of = entropy.decoder(CODERS[header.coder], params, header.bits, bodies,
                                [s.stop - s.start for s in parts], reps=reps)
    if in_place:
        _check_in_place(reference, header.dtype)
        ref = out = reference.reshape(-1)  # add_values may write over the values it reads
    else:
        ref = _flat(reference, header.dtype)
        out = chunks.empty_output(header.count, header.dtype.holder)
    ops = Ops(header.domain, header.dtype.name)

    def decode_chunk(i: int) -> None:
        scratch = pool.get()
        _decode_chunk(values_of(i, scratch), ref[parts[i]], ops, out=out[parts[i]],
                      scratch=scratch)

    with chunks.mapper(len(parts)) as run:
        run(decode_chunk, range(len(parts)))
    out[index] = values
    return out.reshape(header.shape)


def _analyze(cur: np.ndarray, ref: np.ndarray, out: np.ndarray, ops: Ops, *,
             representative: str, scratch: chunks.Scratch) -> quantize.Stats:
    """Pass 1 over a chunk: the delta (parked in ``out`` for float32) and its statistics."""
    with chunks.errstate_all_ignored():
        delta = out if ops.dtype_name == "float32" else scratch.get("delta", cur.size, _F32)
        ops.delta32(cur, ref, delta, scratch)
        return chunk_stats(delta, representative, scratch)


def _encode_chunk(cur: np.ndarray, ref: np.ndarray, out: np.ndarray, ops: Ops, *,
                  plan: quantize.Plan, table: packing.ValueTable, enc: entropy.ChunkEncoder,
                  nonfinite: int, scratch: chunks.Scratch) -> tuple[bytes, np.ndarray | None]:
    """Pass 2 over a chunk: symbols, their coded body, reconstruction, exceptions.

    The values added are looked up from the packed symbols (``table``), as the zstd
    decoder does: one gather per byte instead of one per symbol (2-8 symbols a byte at
    b <= 4), and the same float32 values ``reps[symbol]``, so the same reconstruction.
    """
    with chunks.errstate_all_ignored():
        if ops.dtype_name == "float32":
            delta = out  # pass 1 left the delta here
        else:
            delta = scratch.get("delta", cur.size, _F32)
            ops.delta32(cur, ref, delta, scratch)
        # intp keys and mode="wrap" (a no-op: keys are < 512) take numpy's fast gather, ~2.5x
        # faster than uint16 keys, which np.take converts and bounds-checks.
        keys = keys_of(delta, scratch.get("key_intp", cur.size, np.intp))
        symbols = np.take(plan.lut, keys, out=scratch.get("symbols", cur.size, np.uint8),
                          mode="wrap")
        body = enc.encode(symbols, scratch)
        values = table.lookup(packing.pack(symbols, table.bits, scratch), cur.size,
                              scratch, "contrib")
        ops.add_values(values, ref, out, scratch)
        mask = exception_mask(keys, out, ops.dtype_name, nonfinite, scratch)
        mask = ops.lost_zeros(cur, out, mask, scratch)
    if mask is None:
        return body, None
    index = np.flatnonzero(mask)
    out[index] = cur[index]
    return body, index


def _decode_chunk(values: np.ndarray, ref: np.ndarray, ops: Ops, *, out: np.ndarray,
                  scratch: chunks.Scratch) -> None:
    if values.size != out.size:
        raise CodecError(f"corrupt blob: chunk decodes to {values.size} symbols, expected "
                         f"{out.size}")
    with chunks.errstate_all_ignored():
        ops.add_values(values, ref, out, scratch)
