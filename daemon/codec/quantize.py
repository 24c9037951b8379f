"""Exponent-bucket quantization of a delta with priority promotion (LC-Checkpoint §3).

Every element of ``delta`` (float32) falls in the bucket keyed by ``bits >> 23`` of its IEEE-754
pattern: sign and biased exponent, 512 keys, no ``log2``. Priority promotion keeps the
``2^b - 1`` keys with the largest exponents (magnitude decides, not population; the two signs
of one exponent are two keys, and when only one of them fits the more populated one wins);
every other element becomes symbol 0. Keys with exponent field 0 (zeros and subnormals,
``|delta| < 2^-126``) and 255 (Inf/NaN, stored verbatim as exceptions) are never kept.

Symbol 0 adds ``-0.0``: ``x + (-0.0) == x`` bit for bit for every x (``+0.0`` would turn a
reference ``-0.0`` into ``+0.0``), so dropped elements keep their reference value exactly.

Finer buckets (``buckets_per_octave`` 2 or 4; the engine's default is 2): the key also takes
the top 1 or 2 mantissa bits (``bits >> 22`` or ``bits >> 21``; ``512 * buckets_per_octave``
keys), so a kept element decodes within a half or a quarter octave of its value instead of a
whole one, and promotion keeps the ``2^b - 1`` largest of these keys. Which key an element
falls in is an encoder's choice only: decode adds ``reps[symbol]`` whatever the buckets were,
so the blob format is unchanged (``bench/README.md``, "Finer buckets for the weights").

The per-element work (the delta, its statistics, symbols and the reconstruction) runs in
``kernels`` (``finekeys`` for the finer buckets); this module decides, from the merged
statistics, what every key becomes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NKEYS = 512
_EXP_MASK = 0xFF
_MANTISSA_BITS = 23
# bits="auto": the default relative L2 error the dropped buckets may add to a delta
# (``auto_bits``); chosen from bench/RESULTS.md.
AUTO_MAX_ERROR = 0.2
# What the budget of bits="auto" is relative to: "delta" (the change, the shipped rule) or
# "state" (the tensor the change is added to; bench/README.md, "State-relative auto budget").
AUTO_RELATIVE_TO = ("delta", "state")
# Buckets per octave of the delta's magnitude: 1 is LC-Checkpoint's (the codec's default;
# the engine ships 2, ``EngineConfig.buckets_per_octave``); 2 and 4
# add the top 1 or 2 mantissa bits to the key (``key_bits``).
BUCKETS_PER_OCTAVE = (1, 2, 4)
_F32 = np.dtype(np.float32)


@dataclass(frozen=True)
class Stats:
    """Per-key statistics of the deltas of one chunk (or of a whole tensor once merged)."""

    counts: np.ndarray  # int64[512]
    mantissa_sums: np.ndarray | None  # uint64[512] sums of the 23-bit mantissas, for "mean"
    lo: np.ndarray | None  # float32[512] per-key minimum, for "midrange"
    hi: np.ndarray | None  # float32[512] per-key maximum, for "midrange"
    # Mantissa bits in the key (0: octaves; the arrays then have 512 << key_bits entries).
    key_bits: int = 0


@dataclass(frozen=True)
class Plan:
    """The outcome of promotion: key -> symbol table and the symbol -> value table."""

    lut: np.ndarray  # uint8[512]: symbol of each key (0 = dropped)
    reps: np.ndarray  # float32[2^b]: value added for each symbol; reps[0] is -0.0
    sym_counts: np.ndarray  # int64[2^b]: how often each symbol occurs


def key_bits(buckets_per_octave: int) -> int:
    """The mantissa bits a key takes for ``buckets_per_octave`` (1, 2, 4 -> 0, 1, 2)."""
    return int(buckets_per_octave).bit_length() - 1


def merge(parts: list[Stats], representative: str) -> Stats:
    """Combines chunk statistics; integer sums, so the result is exact and order-free."""
    kb = parts[0].key_bits if parts else 0
    nkeys = NKEYS << kb
    counts = np.zeros(nkeys, np.int64)
    for part in parts:
        counts += part.counts
    if representative == "mean":
        sums = np.zeros(nkeys, np.uint64)
        for part in parts:
            assert part.mantissa_sums is not None
            sums += part.mantissa_sums
        return Stats(counts, sums, None, None, kb)
    lo = np.full(nkeys, np.inf, _F32)
    hi = np.full(nkeys, -np.inf, _F32)
    for part in parts:
        assert part.lo is not None and part.hi is not None
        np.minimum(lo, part.lo, out=lo)
        np.maximum(hi, part.hi, out=hi)
    return Stats(counts, None, lo, hi, kb)


def _exponents(keys: np.ndarray, kb: int) -> np.ndarray:
    return (keys >> kb) & _EXP_MASK


def promote(stats: Stats, bits: int) -> np.ndarray:
    """The kept keys, in symbol order (symbol 1 first): priority promotion."""
    kb = stats.key_bits
    keys = np.flatnonzero(stats.counts)
    exponent = _exponents(keys, kb)
    keys = keys[(exponent != 0) & (exponent != _EXP_MASK)]
    # Largest magnitude (exponent, then the key's mantissa bits) first; between the two
    # signs of one magnitude the fuller bucket, then +.
    magnitude = keys & ((1 << (8 + kb)) - 1)
    order = np.lexsort((keys >> (8 + kb), -stats.counts[keys], -magnitude))
    return keys[order][: (1 << bits) - 1]


def _means(stats: Stats, kept: np.ndarray) -> np.ndarray:
    """Exact bucket means: +-2^(e-127) * (1 + sum(mantissa) / (count * 2^23)), in float64
    (the sums are of the whole 23-bit mantissas, whatever part of them the key holds)."""
    assert stats.mantissa_sums is not None
    kb = stats.key_bits
    counts = stats.counts[kept].astype(np.float64)
    fraction = stats.mantissa_sums[kept].astype(np.float64) / (counts * (1 << _MANTISSA_BITS))
    magnitude = np.ldexp(1.0 + fraction, _exponents(kept, kb) - 127)
    return np.where(kept >> (8 + kb), -magnitude, magnitude)


def auto_bits(stats: Stats, max_error: float, representative: str, max_bits: int = 8,
              state_energy: float | None = None, *,
              ranked: np.ndarray | None = None) -> int:
    """The smallest width (1..``max_bits``) whose dropped buckets hold at most
    ``max_error`` of the delta's L2 norm: ``sqrt(sum dropped d^2 / sum d^2) <= max_error``.

    With ``state_energy`` (``sum r^2`` of the tensor the delta is added to) the budget is
    relative to the state instead: ``sqrt(sum dropped d^2 / sum r^2) <= max_error``. The
    delta-relative budget is scale-free in the delta, so it keeps as many buckets of a tiny
    change between frequent saves as of a large one between sparse saves; the
    state-relative one drops more of the tiny change (harmless to the state) and less of
    the large one. A zero state keeps everything (``max_bits``) unless nothing is dropped.

    A dropped element is restored as no change, so this is the relative L2 error the
    width adds to the reconstructed change; with octave buckets the kept buckets' own error
    (each bucket spans a factor of 2 and decodes to one value) is not counted: it is
    bounded below by the octave, and counting it would push every width to the maximum.
    With finer buckets (``stats.key_bits`` > 0) it is counted, as a uniform spread over the
    bucket (``count * width^2 / 12``): the restored error is then what the budget bounds,
    and a width is chosen for the error the finer buckets can reach.
    Each bucket's energy is estimated as ``count * representative^2`` from the statistics
    of pass 1, which do not depend on the width: choosing costs no second encode. A
    tensor with nothing changed gets 1.

    ``ranked``: the keys in the order the encoder's widths keep them (width b the first
    ``2^b - 1``; ``domains.Ops.ranked``), priority promotion's by default. The log domain
    keeps its own (``domains.promote_log``), so the buckets counted as dropped are the
    ones its encoder drops. There a dropped bucket's steps over the bound are stored
    verbatim rather than lost; they are counted all the same, so that a width is not
    chosen that turns a populous bucket into exceptions, each ~12 bytes before zstd
    against a few bits for a symbol (``bench/README.md``, "bits=auto counts the buckets
    the log domain drops").
    """
    # The first 2^b - 1 are kept at width b.
    order = promote(stats, max_bits) if ranked is None else ranked[: (1 << max_bits) - 1]
    exponent = _exponents(np.arange(stats.counts.size), stats.key_bits)
    normal = np.flatnonzero(stats.counts * ((exponent != 0) & (exponent != _EXP_MASK)))
    values = _means(stats, normal) if representative == "mean" else _midranges(stats, normal)
    energy = dict(zip(normal.tolist(), (stats.counts[normal] * values ** 2).tolist(),
                      strict=True))
    total = sum(energy.values())
    kept = np.concatenate([[0.0], np.cumsum([energy[int(k)] for k in order])])
    spread = np.zeros(order.size + 1)
    if stats.key_bits:
        widths = np.ldexp(1.0, _exponents(order, stats.key_bits) - 127 - stats.key_bits)
        spread[1:] = np.cumsum(stats.counts[order] * widths ** 2 / 12)
    budget = max_error * max_error * (total if state_energy is None else state_energy)
    for bits in range(1, max_bits):
        held = min((1 << bits) - 1, order.size)
        if total - kept[held] + spread[held] <= budget:
            return bits
    return max_bits


def _midranges(stats: Stats, keys: np.ndarray) -> np.ndarray:
    assert stats.lo is not None and stats.hi is not None
    return (stats.lo[keys].astype(np.float64) + stats.hi[keys]) / 2


def make_plan(stats: Stats, bits: int, representative: str,
              kept: np.ndarray | None = None) -> Plan:
    """Promotion plus representatives: what every key becomes. ``kept`` (in symbol order, at
    most ``2^b - 1`` normal keys) replaces priority promotion (the log domain's own:
    ``domains.promote_log``)."""
    if kept is None:
        kept = promote(stats, bits)
    lut = np.zeros(stats.counts.size, np.uint8)
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.uint8)
    reps = np.zeros(1 << bits, _F32)
    reps[0] = -0.0
    values = _means(stats, kept) if representative == "mean" else _midranges(stats, kept)
    reps[1:kept.size + 1] = values.astype(_F32)
    sym_counts = np.bincount(lut, weights=stats.counts, minlength=1 << bits)
    return Plan(lut, reps, sym_counts.astype(np.int64))
