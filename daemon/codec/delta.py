"""The lossy delta path: ``encode_delta`` / ``decode_delta`` (the method: ``ckptd.daemon.codec``).

Encode makes two passes over the chunks, each one compiled loop per chunk (``kernels``,
through ``domains.Ops``). Pass 1 computes the float32 delta and its per-key statistics,
storing nothing per element. Between the passes the merged statistics decide promotion
and representatives for the whole tensor. Pass 2 recomputes the delta (cheaper than a
stored copy's memory traffic), maps keys to symbols, reconstructs and finds the
exceptions; the symbols are then entropy-coded. Reconstruction and decode end in the same
arithmetic on ``reps[symbol]``, so decode returns the encoder's reconstruction bit for
bit. The domain (linear, log for tensors that must stay non-negative, or scaled for tensors
that decay) changes only the delta and that addition; promotion, representatives and coding
are the same. The scaled domain is the linear passes against ``alpha * reference``, written
into the output buffer chunk by chunk just before pass 1 reads it (``scaled``).

A fresh output's pages are populated in pass 1, one ``madvise`` per chunk from the thread
that will write it in pass 2 (``chunks.populate``), instead of one fault per 4 KiB page.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import chunks, domains, entropy, kernels, quantize, scaled
from .format import (
    CODER_IDS,
    CODERS,
    KIND_DELTA,
    KIND_NAMES,
    REPRESENTATIVE_IDS,
    CodecError,
    DType,
    Header,
    Reader,
    build_blob,
    domain_flags,
    dtype_of,
    read_chunks,
    unpack_header,
    verify_payload,
    write_chunks,
)

AUTO = "auto"
_F32 = np.dtype("<f4")
_U64 = np.dtype("<u8")


def encode_delta(current: np.ndarray, reference: np.ndarray, *, bits: int | str,
                 representative: str, coder: str, bfloat16: bool, domain: str = "linear",
                 auto_max_error: float = quantize.AUTO_MAX_ERROR,
                 auto_relative_to: str = "delta", buckets_per_octave: int = 1,
                 out: np.ndarray | None = None,
                 ops_type: type[domains.Ops] = domains.Ops) -> tuple[bytes, np.ndarray]:
    """See ``ckptd.daemon.codec.encode_delta``. ``ops_type`` runs the per-chunk passes (the
    tests substitute the numpy codec, their oracle, to compare the bytes)."""
    _check_options(bits, representative, coder, domain, auto_max_error,
                   auto_relative_to=auto_relative_to, buckets_per_octave=buckets_per_octave)
    current = np.asarray(current)
    dtype = _float_dtype(current, bfloat16)
    cur = _flat(current, dtype)
    ref = _flat(_matching(reference, current), dtype)
    fresh = out is None
    if out is None:
        out = chunks.empty_output(cur.size, dtype.holder)
    else:
        out = _output(out, dtype, cur, ref)
    parts = chunks.bounds(cur.size, chunks.CHUNK_ELEMS)
    key_bits = quantize.key_bits(buckets_per_octave)
    ops = ops_type(domains.DOMAIN_IDS[domain], dtype.name, key_bits)
    alpha: list[np.float32] = []
    unscaled = ref
    if ops.domain == domains.SCALED:  # pass 2 overwrites the scaled reference element by element
        alpha = [scaled.fit_alpha(cur, ref, dtype.name)]
        ref = out  # each chunk's scaled reference, written just before pass 1 reads it
    pool = chunks.ScratchPool()

    def analyze(s: slice) -> quantize.Stats:
        if fresh:  # pass 2 writes it: its pages now, from this thread, one call per chunk
            chunks.populate(out[s])
        if alpha:
            scaled.scale_reference(unscaled[s], alpha[0], dtype.name, out[s])
        return ops.stats(cur[s], ref[s], representative)

    with chunks.mapper(len(parts)) as run:
        stats = run(analyze, parts)
        merged = quantize.merge(stats, representative)
        # The width is chosen between the passes: pass 1's statistics do not depend on it.
        if bits == AUTO:
            bits = quantize.auto_bits(merged, auto_max_error, representative,
                                      state_energy=_state_energy(ref, ops, auto_relative_to),
                                      ranked=ops.ranked(merged))
        else:
            bits = int(bits)
        plan = ops.plan(merged, bits, representative)
        enc = entropy.encoder(coder, plan.sym_counts, bits, cur.size)
        coded = run(lambda s: _encode_chunk(cur[s], ref[s], out[s], ops, plan=plan, enc=enc,
                                            scratch=pool.get()), parts)
    bodies = [body for body, _ in coded]
    index = [idx + s.start for (_, idx), s in zip(coded, parts, strict=True) if idx is not None]
    flat_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    payload = [
        *(a.tobytes() for a in alpha),
        plan.reps[1:].astype(_F32).tobytes(),
        len(enc.params).to_bytes(4, "little"), enc.params,
        _pack_exceptions(flat_index, cur[flat_index], pool.get()),
        *write_chunks(bodies),
    ]
    header = Header(KIND_DELTA, dtype, tuple(current.shape), bits, CODER_IDS[coder],
                    REPRESENTATIVE_IDS[representative], domain_flags(ops.domain),
                    chunks.CHUNK_ELEMS, cur.size)
    return build_blob(header, payload), out.reshape(current.shape)


def decode_delta(blob: bytes | memoryview, reference: np.ndarray, *, in_place: bool = False,
                 ops_type: type[domains.Ops] = domains.Ops) -> np.ndarray:
    """See ``ckptd.daemon.codec.decode_delta`` (``ops_type``: as for ``encode_delta``)."""
    reference = np.asarray(reference)
    parsed = parse_delta(blob, reference)
    header = parsed.header
    if in_place:
        check_in_place(reference, header.dtype)
        ref = out = reference.reshape(-1)  # add_values may write over the values it reads
    else:
        ref = _flat(reference, header.dtype)
        out = chunks.empty_output(header.count, header.dtype.holder)
    if header.domain == domains.SCALED:  # then decoded in place against it
        ref = scaled.scale_reference(ref, parsed.alpha, header.dtype.name, out)
    ops = ops_type(header.domain, header.dtype.name)
    values_of = parsed.values_decoder()
    pool = chunks.ScratchPool()

    def decode_chunk(i: int) -> None:
        part = parsed.parts[i]
        ops.add_values(values_of(i, pool.get()), ref[part], out[part])

    with chunks.mapper(len(parsed.parts)) as run:
        run(decode_chunk, range(len(parsed.parts)))
    out[parsed.index] = parsed.values
    return out.reshape(header.shape)


@dataclass(frozen=True)
class ParsedDelta:
    """A delta blob's payload, checked and split into its fields (views of the blob)."""

    header: Header
    alpha: np.float32  # 1.0 unless scaled
    reps: np.ndarray  # 2^b float32 values of the symbols, -0.0 first
    params: memoryview  # the coder's
    index: np.ndarray  # the exceptions' positions (as written: ascending) ...
    values: np.ndarray  # ... and their values, in the holder dtype
    bodies: list[memoryview]  # the chunks' coded symbols
    parts: list[slice]  # the chunks' element ranges

    def values_decoder(self) -> Callable[[int, chunks.Scratch], np.ndarray]:
        """``(chunk index, scratch) -> float32 reps[symbols]`` of that chunk (in ``scratch``)."""
        sizes = [s.stop - s.start for s in self.parts]
        values_of = entropy.decoder(CODERS[self.header.coder], self.params, self.header.bits,
                                    self.bodies, sizes, reps=self.reps)

        def checked(i: int, scratch: chunks.Scratch) -> np.ndarray:
            values = values_of(i, scratch)
            if values.size != sizes[i]:
                raise CodecError(f"corrupt blob: chunk {i} decodes to {values.size} symbols, "
                                 f"expected {sizes[i]}")
            return values

        return checked


def parse_delta(blob: bytes | memoryview, reference: np.ndarray, *,
                verified: bool = False) -> ParsedDelta:
    """Checks a delta blob against its reference's dtype and shape, and splits its payload.

    ``verified``: the caller checked the whole blob's bytes already (a restore compares
    each blob's xxh3_64 with its manifest), so the payload is not hashed a second time; its
    structure is checked all the same.
    """
    view = memoryview(blob).cast("B")
    header = unpack_header(view)
    if header.kind != KIND_DELTA:
        raise CodecError(f"decode_delta got a {KIND_NAMES[header.kind]} blob; use decode_exact")
    if _little(reference.dtype) != header.dtype.holder or reference.shape != header.shape:
        raise CodecError(f"reference is {reference.dtype}{list(reference.shape)}, the blob needs "
                         f"{header.dtype.name} ({header.dtype.holder}){list(header.shape)}")
    reader = Reader(view[header.size:] if verified else verify_payload(view, header))
    alpha = (reader.array(_F32, 1, "alpha")[0] if header.domain == domains.SCALED
             else np.float32(1.0))
    reps = np.concatenate([np.array([-0.0], _F32),
                           reader.array(_F32, (1 << header.bits) - 1, "representatives")])
    params = reader.take(reader.u32("coder parameter length"), "coder parameters")
    index, values = _read_exceptions(reader, header, chunks.Scratch())
    bodies = read_chunks(reader, header.nchunks)
    reader.at_end()
    return ParsedDelta(header, alpha, reps, params, index, values, bodies,
                       chunks.bounds(header.count, header.chunk_elems))


def _encode_chunk(cur: np.ndarray, ref: np.ndarray, out: np.ndarray, ops: domains.Ops, *,
                  plan: quantize.Plan, enc: entropy.ChunkEncoder,
                  scratch: chunks.Scratch) -> tuple[bytes, np.ndarray | None]:
    """Pass 2 over a chunk: its coded body, the reconstruction and the exceptions."""
    symbols, index = ops.encode(cur, ref, out, plan, scratch)
    return enc.encode(symbols, scratch), index


def _pack_exceptions(index: np.ndarray, values: np.ndarray, scratch: chunks.Scratch) -> bytes:
    """``u64 m, u64 z`` and ``z`` bytes of zstd(indices || raw values); z = 0 when m = 0."""
    if index.size == 0:
        return bytes(16)
    body = entropy.zstd_compress(index.astype(_U64).tobytes() + values.tobytes(), scratch)
    return index.size.to_bytes(8, "little") + len(body).to_bytes(8, "little") + body


def _read_exceptions(reader: Reader, header: Header,
                     scratch: chunks.Scratch) -> tuple[np.ndarray, np.ndarray]:
    count = reader.u64("exception count")
    body = reader.take(reader.u64("exception length"), "exceptions")
    if count == 0:
        if len(body):
            raise CodecError("corrupt blob: exception bytes without exceptions")
        return np.zeros(0, np.intp), np.zeros(0, header.dtype.holder)
    if count > header.count:
        raise CodecError(f"corrupt blob: {count} exceptions in {header.count} elements")
    itemsize = header.dtype.holder.itemsize
    raw = entropy.zstd_decompress(body, count * (8 + itemsize), scratch)
    index = np.frombuffer(raw, _U64, count)
    if int(index.max()) >= header.count:
        raise CodecError(f"corrupt blob: exception index {int(index.max())} out of range")
    return index.astype(np.intp), np.frombuffer(raw, header.dtype.holder, count, count * 8)


def _state_energy(ref: np.ndarray, ops: domains.Ops, relative_to: str) -> float | None:
    """The energy a state-relative budget is a share of; None keeps the delta-relative one.

    Linear: ``sum r^2`` of the reference (scaled: of ``alpha * reference``, what the delta
    is added to), non-finite elements (stored verbatim) left out. Log: its delta is a step
    of the bit pattern, ``~2^m * log2`` of the ratio (m mantissa bits), a relative change
    already; ``count * (2^m / ln 2)^2`` makes dropped steps of RMS at most ``max_error``
    a relative error of the state of at most that, the meaning of the linear budget. The
    linear sum is a separate pass over the reference, not a pass-1 statistic: enough for
    measuring the rule (``bench/auto_budget.py``)."""
    if relative_to != "state":
        return None
    if ops.domain == domains.LOG:
        return ref.size * (2.0 ** kernels.MANTISSA_BITS[ops.dtype_name] / math.log(2.0)) ** 2
    total = 0.0
    scratch = chunks.Scratch()
    for part in chunks.bounds(ref.size, chunks.CHUNK_ELEMS):
        values = scaled.widen(ref[part], ops.dtype_name,
                              scratch.get("energy", part.stop - part.start, _F32))
        finite = np.isfinite(values)
        with np.errstate(all="ignore"):
            total += float(np.dot(values[finite], values[finite]))
    return total


def _check_options(bits: int | str, representative: str, coder: str, domain: str,
                   auto_max_error: float, *, auto_relative_to: str = "delta",
                   buckets_per_octave: int = 1) -> None:
    if bits == AUTO:
        if not 0.0 <= auto_max_error < 1.0:  # also refuses NaN
            raise CodecError(f"auto_max_error must be in [0, 1), got {auto_max_error!r}")
        if auto_relative_to not in quantize.AUTO_RELATIVE_TO:
            raise CodecError(f"auto_relative_to must be one of {quantize.AUTO_RELATIVE_TO}, "
                             f"got {auto_relative_to!r}")
    elif isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 1 <= bits <= 8:
        raise CodecError(f"bits must be an integer in 1..8, got {bits!r} (or 'auto')")
    if representative not in REPRESENTATIVE_IDS or representative == "none":
        raise CodecError(f"representative must be 'mean' or 'midrange', got {representative!r}")
    if coder not in CODER_IDS or coder == "raw":  # raw: lossless blobs only
        raise CodecError(f"coder must be one of {sorted(set(CODER_IDS) - {'raw'})}, "
                         f"got {coder!r}")
    if domain not in domains.DOMAIN_IDS:
        raise CodecError(f"domain must be one of {sorted(domains.DOMAIN_IDS)}, got {domain!r}")
    if (isinstance(buckets_per_octave, bool)
            or buckets_per_octave not in quantize.BUCKETS_PER_OCTAVE):
        raise CodecError(f"buckets_per_octave must be one of {quantize.BUCKETS_PER_OCTAVE}, "
                         f"got {buckets_per_octave!r}")
    if buckets_per_octave != 1 and domain == "log":
        raise CodecError(f"buckets_per_octave {buckets_per_octave} needs the linear or scaled "
                         "domain; the log domain keys by octave (pass 1)")


def _float_dtype(current: np.ndarray, bfloat16: bool) -> DType:
    dtype = dtype_of(current, bfloat16=bfloat16)
    if not dtype.is_float:
        raise CodecError(f"encode_delta takes float32/float16/bfloat16/float64 tensors, got "
                         f"{dtype.name}; store it with encode_exact")
    return dtype


def _matching(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    reference, current = np.asarray(reference), np.asarray(current)
    if _little(reference.dtype) != _little(current.dtype) or reference.shape != current.shape:
        raise CodecError(f"reference is {reference.dtype}{list(reference.shape)}, current is "
                         f"{current.dtype}{list(current.shape)}: they must match")
    return reference


def _output(out: np.ndarray, dtype: DType, cur: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``out`` as the flat output of an encode of ``cur`` against ``ref``, or ``CodecError``:
    pass 2 reads ``cur`` and ``ref`` chunk by chunk while it writes, so no overlap."""
    return chunks.given_output(out, dtype.holder, cur.size,
                               {"current": cur, "reference": ref}, CodecError)


def check_in_place(reference: np.ndarray, dtype: DType) -> None:
    """Raises ``CodecError`` unless a delta of ``dtype`` can be decoded over ``reference``."""
    flags = reference.flags
    if reference.dtype != dtype.holder or not (flags.c_contiguous and flags.writeable):
        raise CodecError(f"decoding in place needs a writeable C-contiguous {dtype.holder} "
                         f"reference, got {reference.dtype} (contiguous "
                         f"{flags.c_contiguous}, writeable {flags.writeable})")


def _little(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def _flat(array: np.ndarray, dtype: DType) -> np.ndarray:
    """Contiguous little-endian 1-D view (a copy only for strided or big-endian input)."""
    return np.ascontiguousarray(array, dtype=dtype.holder).reshape(-1)
