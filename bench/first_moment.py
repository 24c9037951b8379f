"""How to code Adam's first moment lossily: which reference keeps the restored update close.

``bench/second_moment.py`` settled ``exp_avg_sq`` (the log domain). This measures the first
moment ``m`` (``exp_avg``) the same way, offline: train a workload with Adam(W) once, take
its state every K steps, run each tensor's chain through the codec the way the daemon does
(the first checkpoint exact, every later one a delta against the previous reconstruction;
tensors under ``min_lossy_elements`` exact; ``v`` always in the log domain, as the client's
built-in rule stores it), and compare ways of coding ``m``:

* ``exact``: lossless (what is left is ``v``'s share of the error);
* ``linear``: the LC delta ``m - ref`` (the daemon's path before this measurement);
* ``scaled-ls``: ``m - alpha * ref`` with one per-tensor least-squares ``alpha``
  (``<m, ref> / <ref, ref>``): the codec's ``domain="scaled"``, what ckptd ships for
  ``exp_avg``. A dropped element decays by ``alpha`` instead of staying at its old value
  (Adam's ``m <- beta1^K m`` where no gradient arrives);
* ``scaled-med``: the same with ``alpha`` the median of ``m / ref``;
* ``scaled-rows``: one least-squares ``alpha`` per row (first dimension), 4 bytes a row;
* ``sign-log``: ``|m|`` in the log domain, the signs lossless (their flips, zstd-coded);
* ``update-linear`` / ``update-scaled`` (issue 16, i16n): ``m`` in the update's units,
  ``w = m / (sqrt(v) + delta)`` with ``v`` the exact ``exp_avg_sq`` at save time, coded as
  ``linear`` / ``scaled-ls`` code ``m``, and restored as ``m = w_hat * (sqrt(v_hat) + delta)``
  with the *restored* ``v_hat``: the restored update's error is then ``w``'s quantization
  error whatever ``v_hat``'s, and ``w``'s elements (about +/-1 at most) span few octaves,
  where ``m``'s LC delta drops the small-``m``, small-``v`` elements whose updates are large.

What must come back close is the Adam update ``m / (sqrt(v) + eps)``: per tensor group it
reports the relative L2 error of that (bias-corrected) update after a restore, with the
restored ``m`` and ``v``; and ``m``'s stored bits per element (over all of ``m``'s
elements; tensors under 1024 elements are exact in every option). ``--v-exact`` stores ``v``
losslessly, to tell ``m``'s share of the error from ``v``'s.

    python -m bench.first_moment [--workload gpt] [--steps 200] [--every 10] [--bits auto:0.2]
        [--bits-v 3] [--options scaled-ls update-scaled] [--delta 1e-8]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import torch
from ckptd.daemon import codec

from bench.second_moment import _group, _update, error_stats, report, run_parser
from bench.update_units import UPDATE_EPS
from bench.workloads import make_workload

MIN_LOSSY_ELEMENTS = 1024
Alpha = Callable[[np.ndarray, np.ndarray], float]


def _alpha_median(cur: np.ndarray, ref: np.ndarray) -> float:
    nonzero = ref != 0
    if not nonzero.any():
        return 1.0
    return float(np.median(cur[nonzero].astype(np.float64) / ref[nonzero]))


def _rows(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0] if values.ndim > 1 else 1, -1)


def _scaled_rows(cur: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, int]:
    """``alpha_r * ref`` with one least-squares factor per row (first dimension); the
    factors' bytes (float32 each)."""
    c, r = _rows(cur).astype(np.float64), _rows(ref).astype(np.float64)
    den = np.einsum("ij,ij->i", r, r)
    num = np.einsum("ij,ij->i", c, r)
    alpha = np.where(den > 0, num / np.where(den > 0, den, 1), 1.0).astype(np.float32)
    return (alpha[:, None] * _rows(ref)).reshape(ref.shape).astype(np.float32), 4 * alpha.size


ALPHAS: dict[str, Alpha | str | None] = {"exact": "exact", "linear": None, "scaled-ls": "codec",
                                         "scaled-med": _alpha_median, "scaled-rows": "rows",
                                         "sign-log": "sign-log", "update-linear": None,
                                         "update-scaled": "codec"}


def _bits_kwargs(bits: str) -> dict:
    if bits.startswith("auto"):
        _, _, budget = bits.partition(":")
        return {"bits": "auto", "auto_max_error": float(budget or 0.2)}
    return {"bits": int(bits)}


def code(cur: np.ndarray, prev: np.ndarray | None, bits: str, domain: codec.Domain = "linear",
         alpha: Alpha | str | None = None) -> tuple[int, np.ndarray]:
    """(stored bytes, reconstruction) of one link of a tensor's chain."""
    if prev is None or cur.size < MIN_LOSSY_ELEMENTS:
        return len(codec.encode_exact(cur)), cur
    if alpha == "exact":
        return len(codec.encode_exact(cur)), cur
    if alpha == "codec":  # the codec's scaled domain (a least-squares alpha): what ckptd ships
        blob, out = codec.encode_delta(cur, prev, domain="scaled", **_bits_kwargs(bits))
        return len(blob), out
    if alpha == "rows":
        ref, extra = _scaled_rows(cur, prev)
        blob, out = codec.encode_delta(cur, ref, **_bits_kwargs(bits))
        return len(blob) + extra, out
    if alpha == "sign-log":
        # |m| in the log domain against |ref|; the signs lossless (the flips, zstd-coded).
        blob, mag = codec.encode_delta(np.abs(cur), np.abs(prev), domain="log",
                                       **_bits_kwargs(bits))
        flips = np.packbits(np.signbit(cur) != np.signbit(prev))
        signs = len(codec.encode_exact(flips))
        return len(blob) + signs, np.where(np.signbit(cur), -mag, mag).astype(np.float32)
    assert alpha is None or callable(alpha)
    ref = prev if alpha is None else (np.float32(alpha(cur, prev)) * prev).astype(np.float32)
    blob, out = codec.encode_delta(cur, ref, domain=domain, **_bits_kwargs(bits))
    return len(blob) + (4 if alpha is not None else 0), out


def code_update(m: np.ndarray, v: np.ndarray, v_rec: np.ndarray, prev: np.ndarray | None, *,
                bits: str, alpha: Alpha | str | None, delta: float = UPDATE_EPS
                ) -> tuple[int, np.ndarray, np.ndarray]:
    """(stored bytes, restored ``m``, reconstruction of ``w``) of ``m`` coded in the
    update's units: the chain runs on ``w = m / (sqrt(v) + delta)`` (``v`` exact, as the
    saving trainer holds it), the restore multiplies by ``sqrt(v_rec) + delta``."""
    w = (m.astype(np.float64) / (np.sqrt(v.astype(np.float64)) + delta)).astype(np.float32)
    size, w_rec = code(w, prev, bits, alpha=alpha)
    scale = np.sqrt(v_rec.astype(np.float64)) + delta
    return size, (w_rec * scale).astype(np.float32), w_rec


def _checkpoints(workload: str, steps: int, every: int
                 ) -> Iterator[tuple[int, tuple[float, float], dict]]:
    """(step, betas, {param name: (w, m, v)}) every ``every`` steps."""
    trainer = make_workload(workload).trainer(seed=0)
    # The optimizer state's index i is the i-th parameter of its param groups, in order: the
    # decoder's AdamW groups matrices before vectors, so model order would mislabel them.
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    named = [(names[id(p)], p) for g in trainer.optimizer.param_groups for p in g["params"]]
    betas = trainer.optimizer.param_groups[0]["betas"]
    for step in range(1, steps + 1):
        trainer.train_step()
        if step % every == 0:
            state = trainer.optimizer.state_dict()["state"]
            yield step, betas, {
                name: (p.detach().numpy().copy(), state[i]["exp_avg"].numpy().copy(),
                       state[i]["exp_avg_sq"].numpy().copy())
                for i, (name, p) in enumerate(named)}


def measure(workload: str, steps: int, every: int, bits: str, *, v_exact: bool = False,
            bits_v: str | None = None, options: list[str] | None = None,
            delta: float = UPDATE_EPS) -> dict:
    """``bits`` codes the weights and ``m`` (or ``w``), ``bits_v`` (default ``bits``) the
    second moment; ``options`` picks the ways of coding ``m`` (default: all)."""
    chosen = {o: ALPHAS[o] for o in (options or ALPHAS)}
    prev: dict[tuple[str, str], np.ndarray] = {}
    rows: dict[str, dict[str, list[float]]] = {o: defaultdict(list) for o in chosen}
    m_bits: dict[str, list[float]] = defaultdict(list)
    other_bits: dict[str, list[float]] = defaultdict(list)
    stale: dict[str, list[float]] = defaultdict(list)
    for step, betas, state in _checkpoints(workload, steps, every):
        sq_err: dict[tuple[str, str], float] = defaultdict(float)
        norm: dict[str, float] = defaultdict(float)
        m_bytes: dict[str, int] = defaultdict(int)
        w_bytes = v_bytes = count = 0
        first = not prev
        for name, (w, m, v) in state.items():
            size, prev[("w", name)] = code(w, prev.get(("w", name)), bits)
            w_bytes += size
            size, v_rec = code(v, prev.get(("v", name)), bits_v or bits, domain="log",
                               alpha="exact" if v_exact else None)
            prev[("v", name)] = v_rec
            v_bytes += size
            count += m.size
            true = _update(m, v, step, betas)
            group = _group(name)
            norm[group] += float(np.sum(true**2))
            for option, alpha in chosen.items():
                before = prev.get((option, name))
                if option.startswith("update-"):
                    size, m_rec, prev[(option, name)] = code_update(
                        m, v, v_rec, before, bits=bits, alpha=alpha, delta=delta)
                else:
                    size, m_rec = code(m, before, bits, alpha=alpha)
                    prev[(option, name)] = m_rec
                m_bytes[option] += size
                err = _update(m_rec, v_rec, step, betas) - true
                sq_err[(option, group)] += float(np.sum(err**2))
                if before is not None and option == "linear" and m.size >= MIN_LOSSY_ELEMENTS:
                    stale[group].append(float(np.mean(m_rec == before)))
        if first:
            continue
        other_bits["weights"].append(8 * w_bytes / count)
        other_bits["exp_avg_sq"].append(8 * v_bytes / count)
        for option in chosen:
            m_bits[option].append(8 * m_bytes[option] / count)
            for (opt, group), value in sq_err.items():
                if opt == option:
                    rows[option][group].append((value / norm[group]) ** 0.5)
    return {
        "workload": workload, "steps": steps, "every": every, "bits": bits,
        "bits_v": bits_v or bits, "delta": delta,
        "bits_per_element": {k: float(np.median(v)) for k, v in other_bits.items()},
        "linear_unchanged_fraction": {k: float(np.median(v)) for k, v in stale.items()},
        "options": {
            option: {
                "m_bits_per_element": float(np.median(m_bits[option])),
                **error_stats(rows[option]),
            }
            for option in chosen
        },
    }


def summary(result: dict) -> str:
    lines = [f"{result['workload']}: {result['steps']} steps, a checkpoint every "
             f"{result['every']}, bits={result['bits']} (exp_avg_sq "
             f"{result.get('bits_v', result['bits'])}); weights "
             f"{result['bits_per_element']['weights']:.2f}, exp_avg_sq (log) "
             f"{result['bits_per_element']['exp_avg_sq']:.2f} bits/element",
             "update rel. L2 error, median over delta checkpoints (max), per group:"]
    for option, row in result["options"].items():
        lines.append(f"  exp_avg {option:10s} {row['m_bits_per_element']:.2f} bits/element")
        for group, med in sorted(row["update_rel_err_median"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {group:40s} {med:8.3f} ({row['update_rel_err_max'][group]:.3f})")
    lines.append("linear: fraction of exp_avg elements left unchanged by a delta (median):")
    for group, frac in sorted(result["linear_unchanged_fraction"].items()):
        lines.append(f"    {group:40s} {frac:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = run_parser(__doc__, ("gpt", "lm", "gpt-bf16"))
    parser.add_argument("--bits", default="auto:0.2", help="'auto:<budget>' or a width")
    parser.add_argument("--v-exact", action="store_true",
                        help="store exp_avg_sq exact (to isolate exp_avg's share of the error)")
    parser.add_argument("--bits-v", help="exp_avg_sq's width (default: --bits)")
    parser.add_argument("--options", nargs="+", choices=tuple(ALPHAS),
                        help="the ways of coding exp_avg to compare (default: all)")
    parser.add_argument("--delta", type=float, default=UPDATE_EPS,
                        help="the update-* options' w = m / (sqrt(v) + delta)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.workload, args.steps, args.every, args.bits, v_exact=args.v_exact,
                     bits_v=args.bits_v, options=args.options, delta=args.delta)
    report(result, summary(result), args.json)


if __name__ == "__main__":
    main()
