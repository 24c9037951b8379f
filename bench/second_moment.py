"""How to code Adam's second moment lossily: which domain keeps the restored update close.

Trains a workload with Adam(W), takes its state every K steps and runs each tensor's chain
through the codec the way the daemon does (the first checkpoint exact, every later one a
delta against the previous reconstruction). For the second moment ``v`` (``exp_avg_sq``) it
compares coding domains at the same bit width:

* ``exact``: lossless (ckptd's rule before the log domain);
* ``linear``: today's LC delta of ``v`` (absolute error, can go negative);
* ``sqrt``: LC delta of ``sqrt(v)``, decoded squared;
* ``log-eps``: LC delta of ``log(v + eps)`` (float32 log/exp), decoded ``max(exp - eps, 0)``;
* ``log``: the codec's log domain (``encode_delta(domain="log")``: bit patterns).

What must come back close is the Adam update ``m / (sqrt(v) + eps)``: for each checkpoint
and tensor group it reports the relative L2 error of that update (bias-corrected) after a
restore, with ``m`` exact (the second moment's own effect) and with ``m`` a linear LC delta
(what a restore gives), the fraction of negative ``v`` elements, and ``v``'s stored bits per
element.

    python -m bench.second_moment [--workload lm|lenet-adam] [--steps 200] [--every 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from ckptd.daemon import codec

from bench.workloads import make_workload

ADAM_EPS = 1e-8
LOG_EPS = np.float32(2.0**-126)
Chain = Callable[[np.ndarray, np.ndarray | None], tuple[int, np.ndarray]]


def _linear(bits: int) -> Chain:
    def step(v: np.ndarray, prev: np.ndarray | None) -> tuple[int, np.ndarray]:
        if prev is None:
            return len(codec.encode_exact(v)), v
        blob, out = codec.encode_delta(v, prev, bits=bits)
        return len(blob), out
    return step


def _transformed(bits: int, forward: Callable[[np.ndarray], np.ndarray],
                 inverse: Callable[[np.ndarray], np.ndarray]) -> Chain:
    """LC delta in a transformed domain; the reference is the transform of the previous
    reconstruction, as a decoder holding only reconstructions would compute it."""
    def step(v: np.ndarray, prev: np.ndarray | None) -> tuple[int, np.ndarray]:
        if prev is None:
            return len(codec.encode_exact(v)), v
        with np.errstate(all="ignore"):
            blob, out = codec.encode_delta(forward(v), forward(prev), bits=bits)
            return len(blob), inverse(out).astype(np.float32)
    return step


def _log_domain(bits: int) -> Chain:
    def step(v: np.ndarray, prev: np.ndarray | None) -> tuple[int, np.ndarray]:
        if prev is None:
            return len(codec.encode_exact(v)), v
        blob, out = codec.encode_delta(v, prev, bits=bits, domain="log")
        return len(blob), out
    return step


def _exact(v: np.ndarray, prev: np.ndarray | None) -> tuple[int, np.ndarray]:
    return len(codec.encode_exact(v)), v


def options(bits: int) -> dict[str, Chain]:
    return {
        "exact": _exact,
        "linear": _linear(bits),
        "sqrt": _transformed(bits, np.sqrt, np.square),
        "log-eps": _transformed(bits, lambda v: np.log(v + LOG_EPS),
                                lambda u: np.maximum(np.exp(u) - LOG_EPS, 0)),
        "log": _log_domain(bits),
    }


def _checkpoints(workload: str, steps: int, every: int) -> Iterator[tuple[int, dict]]:
    """(step, {param name: (m, v)}) every ``every`` steps, with the parameter names."""
    if workload == "lenet-adam":
        base = make_workload("lenet")
        work = dataclasses.replace(base, build_optimizer=lambda m: torch.optim.Adam(
            m.parameters(), lr=1e-3))
    else:
        work = make_workload(workload)
    trainer = work.trainer(seed=0)
    names = [name for name, _ in trainer.model.named_parameters()]
    for step in range(1, steps + 1):
        trainer.train_step()
        if step % every == 0:
            state = trainer.optimizer.state_dict()["state"]
            yield step, {names[i]: (s["exp_avg"].numpy().copy(), s["exp_avg_sq"].numpy().copy())
                         for i, s in state.items()}


def _group(name: str) -> str:
    """Tensor group: the parameter name without layer numbers (``blocks.*.attn...``)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def _update(m: np.ndarray, v: np.ndarray, step: int, betas: tuple[float, float]) -> np.ndarray:
    m_hat = m.astype(np.float64) / (1 - betas[0] ** step)
    v_hat = v.astype(np.float64) / (1 - betas[1] ** step)
    with np.errstate(invalid="ignore"):
        return m_hat / (np.sqrt(v_hat) + ADAM_EPS)


def measure(workload: str, steps: int, every: int, bits: int) -> dict:
    betas = (0.9, 0.99) if workload == "lm" else (0.9, 0.999)
    chains = options(bits)
    prev: dict[tuple[str, str], np.ndarray] = {}
    prev_m: dict[str, np.ndarray] = {}
    m_chain = _linear(bits)
    rows: dict[str, dict[str, list[float]]] = {o: defaultdict(list) for o in chains}
    sizes: dict[str, list[float]] = defaultdict(list)
    negative: dict[str, int] = defaultdict(int)
    for step, state in _checkpoints(workload, steps, every):
        sq_err: dict[tuple[str, str, str], float] = defaultdict(float)
        norm: dict[str, float] = defaultdict(float)
        total_bytes: dict[str, int] = defaultdict(int)
        count = 0
        for name, (m, v) in state.items():
            _, m_rec = m_chain(m, prev_m.get(name))
            first = name not in prev_m
            prev_m[name] = m_rec
            true = _update(m, v, step, betas)
            group = _group(name)
            norm[group] += float(np.sum(true**2))
            count += v.size
            for option, chain in chains.items():
                size, v_rec = chain(v, prev.get((option, name)))
                prev[(option, name)] = v_rec
                total_bytes[option] += size
                negative[option] += int(np.sum(v_rec < 0))
                for m_kind, m_used in (("m-exact", m), ("m-lossy", m_rec)):
                    err = _update(m_used, v_rec, step, betas) - true
                    sq_err[(option, m_kind, group)] += float(np.nansum(err**2)) + (
                        np.inf if np.isnan(err).any() else 0.0)
        if first:
            continue  # the base: every option is exact there
        for option in chains:
            sizes[option].append(8 * total_bytes[option] / count)
            for (opt, m_kind, group), value in sq_err.items():
                if opt == option:
                    rows[option][f"{m_kind} {group}"].append((value / norm[group]) ** 0.5)
    return {
        "workload": workload, "steps": steps, "every": every, "bits": bits,
        "options": {
            option: {
                "v_bits_per_element": float(np.median(sizes[option])),
                "negative_elements": negative[option],
                **error_stats(rows[option]),
            }
            for option in chains
        },
    }


def error_stats(rows: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median and max over checkpoints of each group's update error."""
    return {"update_rel_err_median": {k: float(np.median(v)) for k, v in rows.items()},
            "update_rel_err_max": {k: float(np.max(v)) for k, v in rows.items()}}


def _summary(result: dict) -> str:
    lines = [f"{result['workload']}: {result['steps']} steps, a checkpoint every "
             f"{result['every']}, b={result['bits']} (update rel. error: median / max over "
             "delta checkpoints)"]
    for option, row in result["options"].items():
        errs = row["update_rel_err_median"]
        worst = row["update_rel_err_max"]
        for m_kind in ("m-exact", "m-lossy"):
            keys = [k for k in errs if k.startswith(m_kind)]
            med = max(errs[k] for k in keys)
            mx = max(worst[k] for k in keys)
            lines.append(f"  {option:8s} {m_kind}: worst group {med:.2e} / {mx:.2e}")
        lines.append(f"  {option:8s} v: {row['v_bits_per_element']:.2f} bits/element, "
                     f"{row['negative_elements']} negative elements restored")
    return "\n".join(lines)


def run_parser(doc: str, workloads: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options both moment studies take: the workload, its steps and the checkpoint
    interval, and ``--json``."""
    parser = argparse.ArgumentParser(description=doc.split("\n", maxsplit=1)[0])
    parser.add_argument("--workload", default=workloads[0], choices=workloads)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--json", help="also write the full result (per group) here")
    return parser


def report(result: dict[str, Any], text: str, json_path: str | None) -> None:
    """Prints the summary ``text``, and writes ``result`` to ``json_path`` if given."""
    print(text)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(result, out, indent=1, sort_keys=True)


def main() -> None:
    parser = run_parser(__doc__, ("lm", "lenet-adam"))
    parser.add_argument("--bits", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.workload, args.steps, args.every, args.bits)
    report(result, _summary(result), args.json)


if __name__ == "__main__":
    main()
