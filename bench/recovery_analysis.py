"""Turning raw recovery results into per-setting rows, chosen defaults and target verdicts.

Everything here reads the JSON that ``bench.recovery`` writes, so RESULTS.md can be
regenerated (``--report-only``) without training anything.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from ckptd.daemon.config import EngineConfig

from bench.recovery_protocol import scratch_rework

# The targets (issue 16), per workload: delta and 40-checkpoint history ratios vs
# torch.save (None: no target); every workload with one: rework <= REWORK_BOUND x exact.
REWORK_BOUND = 1.1
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "lenet": (15.0, 10.0), "lm": (15.0, None), "gpt": (20.0, 12.0), "gpt-bf16": (20.0, None)}
# Workloads that run only the default settings: they do not take part in choosing them.
DECODERS = frozenset({"gpt", "gpt-bf16"})
HISTORY_CHECKPOINTS = 40
# Rework ratios closer than this are within the noise of 10 failures (see RESULTS.md).
_REWORK_NOISE = 0.1
# A base interval is "as small as it can be" once its footprint is this close to the best.
_FOOTPRINT_SLACK = 0.9
_CODER_MAX_SLOWDOWN = 2.0
_KNOBS = ("interval", "bits", "representative", "coder", "base_interval", "optim")


def bits_key(bits: int | str | None) -> tuple[int, str]:
    """Sort key of a setting's bits: exact, fixed widths ascending, then adaptive ones."""
    if bits is None:
        return (0, "")
    return (1, f"{bits:02d}") if isinstance(bits, int) else (2, str(bits))


def summarize(output: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (workload, setting), pooled over seeds; rework compared with an exact
    restore at the same failures (a replay of the reference, see ``replay_rework``)."""
    references = {(r["workload"], r["seed"]): r for r in output["references"]}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in output["results"]:
        groups[(result["workload"], result["setting"]["name"])].append(result)
    return [_row(items, references) for items in groups.values()]


def _row(items: list[dict[str, Any]], references: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"workload": items[0]["workload"], **items[0]["setting"],
                           "seeds": len(items), "rework_ratio": None}
    row.update(_sizes(items))
    row.update(_timings(items))
    resumes = [(references[(i["workload"], i["seed"])], r) for i in items for r in i["resumes"]]
    row["failures"] = len(resumes)
    if not resumes:
        row.update(rework_mean=None, scratch_mean=None, censored=0, diverged=0,
                   rework_ratio_2se=None)
        return row
    row["rework_mean"] = statistics.mean(r["rework"] for _, r in resumes)
    row["exact_mean"] = statistics.mean(r["exact_rework"] for _, r in resumes)
    row["rework_ratio"] = row["rework_mean"] / row["exact_mean"]
    differences = [r["rework"] - r["exact_rework"] for _, r in resumes]
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    row["rework_ratio_2se"] = 2 * spread / len(differences) ** 0.5 / row["exact_mean"]
    row["replays_exact"] = sum(r["rework"] == r["exact_rework"] and
                               not any(r["restored_error"].values()) for _, r in resumes)
    row["scratch_mean"] = statistics.mean(
        scratch_rework(ref["eval_loss"], r["failed_at"]) for ref, r in resumes)
    row["censored"] = sum(r["censored"] for _, r in resumes)
    row["diverged"] = sum(r["diverged"] for _, r in resumes)
    row["negative_restores"] = sum(r["negative_second_moments"] > 0 for _, r in resumes)
    row["diverged_negative"] = sum(r["diverged"] and r["negative_second_moments"] > 0
                                   for _, r in resumes)
    row["restore_error_model"] = statistics.median(r["restored_error"]["model"] for _, r in resumes)
    row["restore_error_optim"] = statistics.median(r["restored_error"]["optim"] for _, r in resumes)
    groups = sorted({g for _, r in resumes for g in r.get("update_error", {})})
    row["update_error"] = {g: statistics.median(r["update_error"][g] for _, r in resumes
                                                if g in r.get("update_error", {}))
                           for g in groups}
    row["restored_loss_jump"] = statistics.median(
        r["restored_eval_loss"] - ref["eval_loss"][r["restore_step"]] for ref, r in resumes)
    _final(row, resumes)
    return row


def _final(row: dict[str, Any], resumes: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Held-out loss/accuracy at the reference's last step of the resumed runs that got
    there, against the never-failing reference's."""
    pairs = []
    for ref, r in resumes:
        index = ref["steps"] - r["restore_step"]
        if index < len(r["eval_loss"]):
            pairs.append((r["eval_loss"][index], r["eval_accuracy"][index],
                          ref["eval_loss"][-1], ref["eval_accuracy"][-1]))
    if pairs:
        for i, key in enumerate(("final_loss", "final_accuracy", "reference_final_loss",
                                 "reference_final_accuracy")):
            row[key] = statistics.mean(p[i] for p in pairs)


def _sizes(items: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for item in items for s in item["steps"]]
    deltas = [s for s in steps if s["kind"] == "delta"] or steps
    bases = [s for s in steps if s["kind"] == "base"] or steps
    history = [_history(item["steps"][:HISTORY_CHECKPOINTS]) for item in items]
    whole = [_history(item["steps"]) for item in items]
    return {
        "delta_bytes": statistics.median(s["stored_bytes"] for s in deltas),
        "delta_ratio": statistics.median(s["torch_save_bytes"] / s["stored_bytes"] for s in deltas),
        "delta_ratio_raw": statistics.median(s["raw_bytes"] / s["stored_bytes"] for s in deltas),
        "base_bytes": statistics.median(s["stored_bytes"] for s in bases),
        "torch_save_bytes": statistics.median(s["torch_save_bytes"] for s in steps),
        "raw_bytes": statistics.median(s["raw_bytes"] for s in steps),
        "history_checkpoints": min(min(HISTORY_CHECKPOINTS, len(i["steps"])) for i in items),
        "history_ratio": statistics.mean(h[0] / h[1] for h in history),
        "history_bytes": statistics.mean(h[1] for h in history),
        "footprint_ratio": statistics.mean(h[0] / h[1] for h in whole),
        "disk_bytes": statistics.mean(item["disk_bytes"] for item in items),
        "bases": statistics.mean(
            sum(s["kind"] == "base" for s in i["steps"][:HISTORY_CHECKPOINTS]) for i in items),
        "mean_chain_depth": statistics.mean(s["chain_depth"] for s in steps),
    }


def _history(steps: list[dict[str, Any]]) -> tuple[int, int]:
    """(torch.save bytes, stored bytes) of a kept history, bases included."""
    return sum(s["torch_save_bytes"] for s in steps), sum(s["stored_bytes"] for s in steps)


def _timings(items: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(item["restore_seconds"][key] for item in items) * 1e3
    return {
        "restore_latest_ms": median("latest"),
        "restore_oldest_ms": median("oldest"),
        "restore_deepest_ms": median("deepest"),
        "deepest_depth": max(item["restore_seconds"]["deepest_depth"] for item in items),
        "save_call_ms": statistics.median(item["save_call_seconds_median"] for item in items) * 1e3,
        "durable_s": statistics.median(item["save_to_durable_seconds"] for item in items),
    }


# The setting every sweep varies one knob at a time from: what a user gets with no settings
# (``bits="shipped"``: no ``bits=``, the daemon's ``EngineConfig()``; ``optim="builtin"``:
# the client's per-optimizer built-in rules), so the targets are checked at the defaults.
_SHIPPED = EngineConfig()
SWEEP_CENTRE: dict[str, Any] = {
    "bits": "shipped", "representative": _SHIPPED.representative, "coder": _SHIPPED.coder,
    "base_interval": _SHIPPED.base_interval, "max_delta_fraction": _SHIPPED.max_delta_fraction,
    "min_lossy_elements": _SHIPPED.min_lossy_elements, "optim": "builtin", "weights": "",
    "buckets_per_octave": _SHIPPED.buckets_per_octave}
# What a row written before a knob existed had for it.
LEGACY = {"weights": "", "buckets_per_octave": 1}


def choose_defaults(output: dict[str, Any]) -> dict[str, Any]:
    """Picks each default by a fixed rule over the measured rows (RESULTS.md states the
    rules and the numbers behind each choice). Knobs the run did not vary keep the centre's."""
    rows = summarize(output)
    chosen: dict[str, Any] = dict(SWEEP_CENTRE)
    reasons: dict[str, str] = {}
    for rule in (_bits_and_optim, _representative, _coder, _min_lossy, _base_interval):
        found = rule(rows)
        if found is not None:
            values, reason = found
            chosen.update(values)
            reasons[", ".join(values)] = reason
    chosen["label"] = label(chosen)
    chosen["reasons"] = reasons
    return chosen


def label(values: dict[str, Any]) -> str:
    """A setting's knobs in words (the targets' and the chosen defaults' headings)."""
    bits = ("the shipped widths (daemon b4, 2 buckets per octave; Adam weights b3)"
            if values["bits"] == "shipped" else f"bits={values['bits']}")
    weights = f", weights {values['weights']}" if values.get("weights") else ""
    return (f"{bits}{weights}, {values['representative']}, {values['coder']}, "
            f"base_interval={values['base_interval']}, max_delta_fraction="
            f"{values['max_delta_fraction']:g}, min_lossy_elements="
            f"{values['min_lossy_elements']}, buckets_per_octave="
            f"{values.get('buckets_per_octave', 1)}, optimizer state "
            f"{_optim_words(values['optim'], values['bits'])}")


def shipped() -> dict[str, Any]:
    """The sweep's centre with its label: the defaults the targets are checked at."""
    return {**SWEEP_CENTRE, "label": label(SWEEP_CENTRE)}


def _optim_words(optim: str, bits: int | str) -> str:
    return {"auto": f"lossy at b={bits} (AUTO, linear)", "exact": "exact",
            "sq-log": "built-in rules (exp_avg_sq lossy-log, exp_avg lossy-scaled)",
            "builtin": "by the client's per-optimizer built-in rules (Adam: exp_avg "
                       "lossy-scaled b2, exp_avg_sq lossy-log b3, step exact; SGD: "
                       "momentum_buffer b2)",
            "sq-exact": "exp_avg_sq exact"}.get(optim, optim.replace("lossy:", "lossy at b="))


def _workloads(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["workload"] for r in rows})


def _named(rows: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    return {r["workload"]: r for r in rows if r["name"] == name}


def _bits_and_optim(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    """The (bits, optimizer policy) with the best compression at the smallest K among those
    whose rework stays within the bound, with no diverged or capped restore, on every
    workload: first among candidates that pass at every K measured, else among those
    passing at the smallest K (the reason then says what fails at the larger one)."""
    found = candidates(rows)
    if not found:
        return None
    every = [c for c in found if c["complete"] and all(c["passes"].values())]
    smallest = [c for c in found if c["passes"][c["first"]]]
    summary = "; ".join(
        f"b{c['bits']}/{c['optim']}: {c['compression']:.1f}x, worst ratio "
        + ", ".join(f"K{k} {v:.2f}" for k, v in c["worst"].items())
        + (f", {c['failed']} diverged/capped" if c["failed"] else "")
        for c in sorted(found, key=lambda c: -c["compression"]))
    if every:
        pick = max(every, key=lambda c: c["compression"])
        why = (f"best compression among the {len(every)} of {len(found)} candidates "
               f"within {REWORK_BOUND}x exact rework on every workload and K")
    elif smallest:
        pick = max(smallest, key=lambda c: c["compression"])
        why = (f"no candidate stays within {REWORK_BOUND}x at every K; best compression among "
               f"the {len(smallest)} within it at K={pick['first']}")
    else:
        pick = min(found, key=lambda c: c["worst"][c["first"]])
        why = f"no candidate stays within {REWORK_BOUND}x anywhere; lowest worst-case ratio"
    return {"bits": pick["bits"], "optim": pick["optim"]}, (
        f"{why}. Candidates (bits/optimizer policy: mean delta ratio vs torch.save at the "
        f"smallest K, worst rework ratio over workloads per K): {summary}")


def candidates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every measured (bits, optimizer policy) with its per-K verdicts and compression."""
    rows = [r for r in rows if r["workload"] not in DECODERS]
    workloads = set(_workloads(rows))
    intervals = sorted({r["interval"] for r in rows if r["group"] == "grid"})
    groups: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["group"] in ("grid", "optim") and r["rework_ratio"] is not None:
            groups[(str(r["bits"]), r["optim"])].append(r)
    out = []
    for (_, optim), group in groups.items():
        by_k = {k: [r for r in group if r["interval"] == k] for k in intervals}
        full = [k for k in intervals if {r["workload"] for r in by_k[k]} == workloads]
        if not full or full[0] != intervals[0]:
            continue
        out.append({
            "bits": group[0]["bits"], "optim": optim, "first": full[0],
            "complete": full == intervals,
            "passes": {k: all(r["rework_ratio"] <= REWORK_BOUND and not r["diverged"]
                              and not r["censored"] for r in by_k[k]) for k in full},
            "worst": {k: max(r["rework_ratio"] for r in by_k[k]) for k in full},
            "failed": sum(r["diverged"] + r["censored"] for r in group),
            "compression": statistics.mean(r["delta_ratio"] for r in by_k[full[0]]),
        })
    return out


def _representative(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    mean, mid = _named(rows, "b3-K10"), _named(rows, "b3-K10-midrange")
    both = sorted(set(mean) & set(mid))
    if not both:
        return None
    ratio = {k: statistics.mean(d[w]["rework_ratio"] or 0 for w in both)
             for k, d in (("mean", mean), ("midrange", mid))}
    error = {k: statistics.mean(d[w]["restore_error_model"] for w in both)
             for k, d in (("mean", mean), ("midrange", mid))}
    if abs(ratio["mean"] - ratio["midrange"]) >= _REWORK_NOISE:
        pick = min(ratio, key=lambda k: ratio[k])
        why = "lower rework"
    else:
        pick = min(error, key=lambda k: error[k])
        why = f"rework within noise ({_REWORK_NOISE}), so the lower restored-weight error decides"
    return {"representative": pick}, (
        f"{why}: rework ratio mean {ratio['mean']:.2f} vs midrange {ratio['midrange']:.2f}; "
        f"relative weight error mean {error['mean']:.2e} vs midrange {error['midrange']:.2e}")


def _coder(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    zstd, huffman = _named(rows, "b3-K10"), _named(rows, "b3-K10-huffman")
    both = sorted(set(zstd) & set(huffman))
    if not both:
        return None
    size = {k: sum(d[w]["delta_bytes"] for w in both) for k, d in
            (("zstd", zstd), ("huffman", huffman))}
    secs = {k: sum(d[w]["durable_s"] for w in both) for k, d in
            (("zstd", zstd), ("huffman", huffman))}
    pick = min(size, key=lambda k: size[k])
    other = "huffman" if pick == "zstd" else "zstd"
    if secs[pick] > _CODER_MAX_SLOWDOWN * secs[other]:
        pick, other = other, pick
    return {"coder": pick}, (
        f"delta bytes (sum over workloads) zstd {size['zstd']:.0f} vs huffman "
        f"{size['huffman']:.0f}; time to save the whole history zstd {secs['zstd']:.1f} s vs "
        f"huffman {secs['huffman']:.1f} s (a coder more than {_CODER_MAX_SLOWDOWN}x slower "
        "loses even when smaller)")


def _min_lossy(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    """Lossy small tensors too, when that makes deltas clearly smaller (>= 10 %) without
    pushing rework over the bound (or beyond the noise of the AUTO threshold's)."""
    auto, small = _named(rows, "b4-K10"), _named(rows, "b4-K10-minlossy1")
    both = sorted(set(auto) & set(small))
    if not both:
        return None
    size = {k: sum(d[w]["delta_bytes"] for w in both) for k, d in (("auto", auto), ("1", small))}
    worst = {k: max(d[w]["rework_ratio"] for w in both) for k, d in (("auto", auto), ("1", small))}
    diverged = sum(small[w]["diverged"] for w in both)
    ok = (size["1"] <= 0.9 * size["auto"] and not diverged
          and worst["1"] <= max(REWORK_BOUND, worst["auto"] + _REWORK_NOISE))
    threshold = 1 if ok else SWEEP_CENTRE["min_lossy_elements"]
    return {"min_lossy_elements": threshold}, (
        f"delta bytes (sum over workloads) with min_lossy_elements 1024: {size['auto']:.0f}, "
        f"with 1: {size['1']:.0f}; worst rework ratio {worst['auto']:.2f} vs {worst['1']:.2f}")


def _base_interval(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    """The shortest chains (fewest deltas to replay on restore) whose history footprint is
    within ``_FOOTPRINT_SLACK`` of the best measured: footprint saturates with chain length
    while the cost of restoring an old step grows with it."""
    by_policy: dict[tuple[int, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["name"] in ("b3-K10", "shipped-K10") or r["group"] == "base_interval":
            by_policy[(r["base_interval"], r["max_delta_fraction"])].append(r)
    if len(by_policy) < 2:
        return None
    ratio = {k: statistics.mean(r["history_ratio"] for r in g) for k, g in by_policy.items()}
    depth = {k: statistics.mean(r["mean_chain_depth"] for r in g) for k, g in by_policy.items()}
    deepest = {k: statistics.mean(r["restore_deepest_ms"] for r in g) for k, g in by_policy.items()}
    best = max(ratio.values())
    pick = min((k for k, v in ratio.items() if v >= _FOOTPRINT_SLACK * best),
               key=lambda k: (depth[k], k))
    table = "; ".join(f"{n}/{f:g}: {ratio[(n, f)]:.1f}x, mean depth {depth[(n, f)]:.1f}, "
                      f"deepest restore {deepest[(n, f)]:.0f} ms" for n, f in sorted(ratio))
    return {"base_interval": pick[0], "max_delta_fraction": pick[1]}, (
        f"the shortest chains whose {HISTORY_CHECKPOINTS}-checkpoint footprint is within "
        f"{_FOOTPRINT_SLACK:.0%} of the best measured (base_interval/max_delta_fraction: "
        f"footprint vs torch.save files, mean chain depth, deepest restore): {table}")


def matching_rows(rows: list[dict[str, Any]], chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows measured with exactly the chosen defaults (any K), preferring the
    ``chosen`` confirmation runs over an equal sweep setting."""
    keys = ("bits", "representative", "coder", "base_interval", "max_delta_fraction",
            "min_lossy_elements", "optim", "weights", "buckets_per_octave")
    found = [r for r in rows if r["bits"] is not None
             and all(r.get(k, LEGACY.get(k)) == chosen.get(k, LEGACY.get(k)) for k in keys)]
    found.sort(key=lambda r: r["group"] != "chosen")
    unique: dict[tuple[str, int], dict[str, Any]] = {}
    for r in found:
        unique.setdefault((r["workload"], r["interval"]), r)
    return list(unique.values())


def evaluate_targets(rows: list[dict[str, Any]], chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets at the chosen defaults: value, bound and PASS/FAIL per K."""
    out = []
    for r in sorted(matching_rows(rows, chosen) + _decoder_stand_ins(rows, chosen),
                    key=lambda r: (r["workload"], r["interval"])):
        if r["workload"] not in TARGETS:
            continue
        delta, history = TARGETS[r["workload"]]
        where = f"{r['workload']} K={r['interval']}"
        if r.get("stand_in"):
            where += f" (`{r['name']}`)"
        if delta is not None:
            out.append(_target(f"{where}: delta vs torch.save", r["delta_ratio"], delta, ">="))
        if history is not None and r["history_checkpoints"] >= HISTORY_CHECKPOINTS:
            out.append(_target(f"{where}: 40-checkpoint history vs 40 torch.save files",
                               r["history_ratio"], history, ">="))
        if r["rework_ratio"] is not None:
            out.append(_target(f"{where}: rework vs exact ({r['failures']} failures)",
                               r["rework_ratio"], REWORK_BOUND, "<="))
            out.append(_target(f"{where}: diverged or capped restores",
                               r["diverged"] + r["censored"], 0, "<="))
    return out


def _decoder_stand_ins(rows: list[dict[str, Any]],
                       chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """The decoders run only a few settings (never the confirmation): where none equals
    the chosen defaults, their adaptive-width rows stand in, named in the verdict."""
    measured = {(r["workload"], r["interval"]) for r in matching_rows(rows, chosen)}
    out = []
    for r in rows:
        if (r["workload"] in DECODERS and (r["workload"], r["interval"]) not in measured
                and r["group"] == "grid" and isinstance(r["bits"], str)
                and r["rework_ratio"] is not None):
            out.append({**r, "stand_in": True})
    return out


def _target(name: str, value: float, bound: float, op: str) -> dict[str, Any]:
    ok = value >= bound if op == ">=" else value <= bound
    return {"name": name, "value": value, "bound": bound, "op": op,
            "verdict": "PASS" if ok else "FAIL"}
