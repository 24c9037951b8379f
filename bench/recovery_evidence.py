"""The "what the evidence says" part of RESULTS.md: the b x K grid at a glance and the
findings behind the chosen defaults, each sentence computed from the measured rows."""

from __future__ import annotations

from typing import Any

from bench.recovery_analysis import (
    REWORK_BOUND,
    TARGETS,
    bits_key,
    candidates,
    matching_rows,
)


def evidence(rows: list[dict[str, Any]], chosen: dict[str, Any], output: dict[str, Any]) -> str:
    parts = ["## What the evidence says", "", _grid(rows), ""]
    bullets = [*_optimizer(rows), *_sizes(rows, chosen, output), *_runner_up(rows, chosen)]
    parts += [f"* {b}" for b in bullets]
    return "\n".join(parts)


def tradeoff_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per workload with a delta target: the best compression within the rework bound and
    the best overall, with what it costs in rework (the curve is the first plot)."""
    targets = {name: delta for name, (delta, _) in TARGETS.items() if delta is not None}
    out = []
    for workload, target in targets.items():
        for k in sorted({r["interval"] for r in rows if r["workload"] == workload}):
            mine = [r for r in rows if (r["workload"], r["interval"]) == (workload, k)
                    and r["bits"] is not None and r["rework_ratio"] is not None]
            if not mine:
                continue
            safe = [r for r in mine if r["rework_ratio"] <= REWORK_BOUND
                    and not r["diverged"] and not r["censored"]]
            top = max(mine, key=lambda r: r["delta_ratio"])
            text = f"**{workload} K={k}** (target {target:g}x): "
            if safe:
                best = max(safe, key=lambda r: r["delta_ratio"])
                text += (f"best within the bound `{best['name']}` {best['delta_ratio']:.1f}x "
                         f"(rework {best['rework_ratio']:.2f}); ")
            else:
                text += "no setting within the bound; "
            met = any(r["delta_ratio"] >= target for r in safe)
            text += (f"best overall `{top['name']}` {top['delta_ratio']:.1f}x (rework "
                     f"{top['rework_ratio']:.2f}, {top['diverged']} diverged, "
                     f"{top['censored']} capped of {top['failures']}). Target "
                     + ("met" if met else "not met") + " within the bound.")
            out.append(text)
    return out


def _grid(rows: list[dict[str, Any]]) -> str:
    """Delta ratio and rework ratio for every (workload, K, b) of the grid."""
    grid = [r for r in rows if r["group"] == "grid"]
    bits = sorted({r["bits"] for r in grid}, key=bits_key)
    lines = ["b x K grid (optimizer state by the built-in rules, other knobs at the sweep's "
             "centre; `auto<share>`: bits=\"auto\" with that budget): delta ratio "
             "vs torch.save / rework ratio vs exact (+/-2se; NaN = diverged restores).", "",
             "| workload | K | " + " | ".join(f"b={b}" for b in bits) + " |",
             "|---|---:|" + "---|" * len(bits)]
    for workload in sorted({r["workload"] for r in grid}):
        for k in sorted({r["interval"] for r in grid}):
            cells = []
            for b in bits:
                row = next((r for r in grid if (r["workload"], r["interval"], r["bits"])
                            == (workload, k, b)), None)
                cells.append("-" if row is None or row["rework_ratio"] is None else
                             f"{row['delta_ratio']:.1f}x / {row['rework_ratio']:.2f} +/- "
                             f"{row['rework_ratio_2se']:.2f}"
                             + (f" ({row['diverged']} NaN)" if row["diverged"] else ""))
            lines.append(f"| {workload} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _optimizer(rows: list[dict[str, Any]]) -> list[str]:
    """Divergence with lossy Adam moments, and what keeping them exact costs."""
    out = []
    for workload in sorted({r["workload"] for r in rows}):
        mine = [r for r in rows if r["workload"] == workload and r["failures"]]
        lossy = [r for r in mine if r["bits"] is not None and r["optim"] not in
                 ("exact", "sq-exact")]
        safe = [r for r in mine if r["optim"] in ("exact", "sq-exact")]
        diverged = sum(r["diverged"] for r in lossy)
        if not diverged:
            continue
        negative = sum(r["diverged_negative"] for r in lossy)
        out.append(
            f"**{workload}: lossy optimizer state is the weak point.** {diverged} of "
            f"{sum(r['failures'] for r in lossy)} restores with lossy optimizer state diverged "
            f"({negative} of them restored negative `exp_avg_sq` elements); with the second "
            f"moment or the whole optimizer state exact, {sum(r['diverged'] for r in safe)} of "
            f"{sum(r['failures'] for r in safe)} did. " + _optimizer_cost(mine))
    return out


def _optimizer_cost(rows: list[dict[str, Any]]) -> str:
    named = {r["name"]: r for r in rows}
    sentences = []
    for b in (3, 4):
        for k in sorted({r["interval"] for r in rows}):
            base = named.get(f"b{b}-K{k}")
            sq, exact = named.get(f"b{b}-K{k}-optim-sq-exact"), named.get(f"b{b}-K{k}-optim-exact")
            if base and sq and exact:
                sentences.append(
                    f"At b={b}, K={k} a delta is {base['delta_ratio']:.1f}x smaller than "
                    f"torch.save with AUTO, {sq['delta_ratio']:.1f}x with `exp_avg_sq` exact and "
                    f"{exact['delta_ratio']:.1f}x with all optimizer state exact (rework "
                    f"{_ratio(base)} / {_ratio(sq)} / {_ratio(exact)}).")
    return " ".join(sentences) + (
        " Exact tensors are stored whole in every checkpoint, so an exact policy costs the "
        "full size of what it covers." if sentences else "")


def _ratio(row: dict[str, Any]) -> str:
    text = f"{row['rework_ratio']:.2f}"
    return text + (f", {row['diverged']} NaN" if row["diverged"] else "")


def _sizes(rows: list[dict[str, Any]], chosen: dict[str, Any], output: dict[str, Any]) -> list[str]:
    """Why the size targets are (not) met: what one delta holds at the chosen defaults."""
    targets = {name: delta for name, (delta, _) in TARGETS.items() if delta is not None}
    out = []
    for row in sorted(matching_rows(rows, chosen), key=lambda r: (r["workload"], r["interval"])):
        if row["workload"] not in targets or row["interval"] != min(
                r["interval"] for r in rows if r["workload"] == row["workload"]):
            continue
        result = next(r for r in output["results"] if r["workload"] == row["workload"]
                      and r["setting"]["name"] == row["name"])
        parts = result.get("delta_breakdown") or {}
        if not parts.get("lossy_elements"):
            continue
        lossy = parts.get("model_lossy", 0) + parts.get("optim_lossy", 0)
        exact = parts.get("model_exact", 0) + parts.get("optim_exact", 0)
        budget = row["torch_save_bytes"] / targets[row["workload"]]
        # The last delta's own parts (the median delta is another step, maybe another seed).
        floor = row["torch_save_bytes"] / (exact + parts["manifest"])
        out.append(
            f"**{row['workload']} delta size at the chosen defaults:** "
            f"{row['delta_bytes'] / 1024:.1f} KiB against the {budget / 1024:.1f} KiB the "
            f"{targets[row['workload']]:g}x target allows. Its lossy tensors cost "
            f"{8 * lossy / parts['lossy_elements']:.2f} bits per element "
            f"({lossy / 1024:.1f} KiB for {parts['lossy_elements']} elements); exact tensors "
            f"{exact / 1024:.1f} KiB ({parts.get('exact_elements', 0)} elements); the "
            f"manifest {parts['manifest'] / 1024:.1f} KiB for {parts['tensors']} tensors"
            f". Even if its lossy tensors cost nothing, the "
            f"delta would be only {floor:.1f}x smaller than torch.save.")
    return out


def _runner_up(rows: list[dict[str, Any]], chosen: dict[str, Any]) -> list[str]:
    """The better-compressing candidate the rule passed over, and why."""
    found = candidates(rows)
    first = [c for c in found if c["passes"][c["first"]]]
    if not first:
        return []
    best = max(first, key=lambda c: c["compression"])
    pick = next((c for c in found if (c["bits"], c["optim"]) == (chosen["bits"],
                                                                 chosen["optim"])), None)
    if pick is None or best is pick:
        return []
    later = ", ".join(f"K={k} worst ratio {v:.2f}" for k, v in best["worst"].items()
                      if k != best["first"])
    larger = (f"but not at larger K ({later}; {best['failed']} diverged or capped restores)"
              if later else "but was not measured at larger K")
    return [f"**Runner-up:** bits={best['bits']} with optimizer state {best['optim']} compresses "
            f"{best['compression']:.1f}x (mean over workloads at K={best['first']}) against "
            f"{pick['compression']:.1f}x for the chosen bits={pick['bits']} / {pick['optim']}, "
            f"and stays within the bound at K={best['first']}, {larger}. It is the candidate "
            "to re-measure "
            "with more failures; until then it suits only jobs that checkpoint often."]
