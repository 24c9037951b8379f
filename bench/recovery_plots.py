"""PNG plots of the recovery benchmark (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from bench.recovery_analysis import (
    HISTORY_CHECKPOINTS,
    REWORK_BOUND,
    TARGETS,
    bits_key,
)
from bench.recovery_protocol import MIN_RESUME_STEPS, ema

_DPI = 110
_DELTA_TARGETS = {name: delta for name, (delta, _) in TARGETS.items() if delta is not None}
_PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


def write_plots(output: dict[str, Any], rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Draws every plot the data allows into ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    workloads = sorted({r["workload"] for r in rows})
    written = [_compression_vs_rework(rows, workloads, folder / "compression_vs_rework.png"),
               _loss_around_failure(output, workloads, folder / "loss_around_failure.png")]
    if any(r["group"] == "base_interval" for r in rows):
        written.append(_footprint_vs_base(rows, workloads,
                                          folder / "footprint_vs_base_interval.png"))
    return written


def _axes(count: int) -> tuple[Any, list[Any]]:
    figure, axes = plt.subplots(1, count, figsize=(4.6 * count, 3.8), squeeze=False)
    return figure, list(axes[0])


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)
    return path


def _compression_vs_rework(rows: list[dict[str, Any]], workloads: list[str], path: Path) -> Path:
    figure, axes = _axes(len(workloads))
    for ax, workload in zip(axes, workloads, strict=True):
        mine = [r for r in rows if r["workload"] == workload and r["rework_ratio"] is not None]
        for interval, colour in zip(sorted({r["interval"] for r in mine}), ("C0", "C1", "C2"),
                                    strict=False):
            grid = sorted((r for r in mine if r["group"] == "grid" and r["interval"] == interval),
                          key=lambda r: bits_key(r["bits"]))
            ax.plot([r["delta_ratio"] for r in grid], [r["rework_ratio"] for r in grid], "o-",
                    color=colour, label=f"K={interval}, optim AUTO")
            for r in grid:
                ax.annotate(f"b{r['bits']}" + (" NaN" if r["diverged"] else ""),
                            (r["delta_ratio"], r["rework_ratio"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
            optim = [r for r in mine if r["group"] == "optim" and r["interval"] == interval]
            for r in optim:
                marker = {"exact": "s", "sq-exact": "D"}.get(r["optim"], "^")
                ax.plot(r["delta_ratio"], r["rework_ratio"], marker, color=colour,
                        markerfacecolor="none")
                ax.annotate(f"b{r['bits']} optim {r['optim'].replace('lossy:', 'b')}"
                            + (" NaN" if r["diverged"] else ""),
                            (r["delta_ratio"], r["rework_ratio"]), textcoords="offset points",
                            xytext=(4, -10), fontsize=6)
        ax.axhline(REWORK_BOUND, color="red", linestyle="--", linewidth=1, label="bound")
        target = _DELTA_TARGETS.get(workload)
        if target is not None:
            ax.axvline(target, color="red", linestyle=":", linewidth=1,
                       label=f"delta target {target:g}x")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(_PLAIN)
            axis.set_minor_formatter(_PLAIN)
        ax.set_title(f"{workload} (open markers: optimizer-state policies; NaN: diverged)",
                     fontsize=9)
        ax.set_xlabel("delta checkpoint, x smaller than torch.save")
        ax.set_ylabel("rework / exact rework")
        ax.legend(fontsize=7)
    return _save(figure, path)


def _footprint_vs_base(rows: list[dict[str, Any]], workloads: list[str], path: Path) -> Path:
    figure, axes = _axes(len(workloads))
    for ax, workload in zip(axes, workloads, strict=True):
        mine = [r for r in rows if r["workload"] == workload and
                (r["name"] == "b3-K10" or r["group"] == "base_interval")]
        twin = ax.twinx()
        for fraction, style in zip(sorted({r["max_delta_fraction"] for r in mine}), ("-", "--"),
                                   strict=False):
            line = sorted((r for r in mine if r["max_delta_fraction"] == fraction),
                          key=lambda r: r["base_interval"])
            x = [r["base_interval"] for r in line]
            ax.plot(x, [r["history_ratio"] for r in line], "o" + style, color="C0",
                    label=f"footprint, max_delta_fraction {fraction:g}")
            twin.plot(x, [r["restore_deepest_ms"] for r in line], "s" + style, color="C3",
                      label=f"deepest restore, max_delta_fraction {fraction:g}")
        exact = [r for r in rows if r["workload"] == workload and r["name"] == "exact-K10"]
        if exact:
            ax.axhline(exact[0]["history_ratio"], color="grey", linestyle=":",
                       label="lossless chain (all exact)")
        ticks = sorted({r["base_interval"] for r in mine})
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(v) for v in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=0, top=1.35 * max([r["history_ratio"] for r in mine] + [1]))
        twin.set_ylim(bottom=0, top=1.35 * max([r["restore_deepest_ms"] for r in mine] + [1]))
        ax.set_xlabel("base interval (checkpoints)")
        ax.set_ylabel(f"{HISTORY_CHECKPOINTS}-checkpoint history, x smaller than torch.save",
                      color="C0", fontsize=8)
        twin.set_ylabel("restore of the deepest step (ms)", color="C3", fontsize=8)
        handles = ax.get_legend_handles_labels()
        twin_handles = twin.get_legend_handles_labels()
        ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=6,
                  loc="upper left", ncol=2)
        ax.set_title(f"{workload} (b=3, K=10)")
    return _save(figure, path)


def _loss_around_failure(output: dict[str, Any], workloads: list[str], path: Path) -> Path:
    """Top: one failure of the first seed at the smallest K (the middle one of the b=3 grid
    setting), EMA-smoothed held-out loss of the reference and of each grid setting that
    restored the same checkpoint. Bottom: excess loss after a restore (resumed EMA minus
    the reference's), mean over every failure of each grid setting."""
    figure, grid = plt.subplots(2, len(workloads), figsize=(4.8 * len(workloads), 7.2),
                                squeeze=False)
    for column, workload in enumerate(workloads):
        references = {r["seed"]: r for r in output["references"] if r["workload"] == workload}
        mine = [r for r in output["results"] if r["workload"] == workload and r["resumes"]
                and r["setting"]["group"] == "grid"]
        if not mine:  # sizes only (``--centre`` without ``--failures``): nothing resumed
            continue
        interval = min(r["setting"]["interval"] for r in mine)
        mine = sorted((r for r in mine if r["setting"]["interval"] == interval),
                      key=lambda r: bits_key(r["setting"]["bits"]))
        _example(grid[0][column], workload, references, mine, interval)
        _excess(grid[1][column], references, mine, interval)
    return _save(figure, path)


def _example(ax: Any, workload: str, references: dict[int, Any], results: list[Any],
             interval: int) -> None:
    seed = min(references)
    seeded = [r for r in results if r["seed"] == seed]
    anchor = next((r for r in seeded if r["setting"]["bits"] == 4), seeded[0])
    pick = anchor["resumes"][len(anchor["resumes"]) // 2]
    s, f = pick["restore_step"], pick["failed_at"]
    smooth = ema(references[seed]["eval_loss"], references[seed]["eval_loss"][0])
    lo, hi = max(0, s - 2 * interval), min(len(smooth) - 1, f + 4 * interval)
    ax.plot(range(lo, hi + 1), smooth[lo:hi + 1], color="black", linewidth=2,
            label="never failed (= exact restore)")
    for result in seeded:
        same = [r for r in result["resumes"] if r["restore_step"] == s]
        if same:
            curve = [smooth[s], *ema(same[0]["eval_loss"][1:], smooth[s])]
            end = min(len(curve), hi - s + 1)
            ax.plot(range(s, s + end), curve[:end], linewidth=1,
                    label=f"b={result['setting']['bits']}")
    ax.axvline(s, color="grey", linestyle=":")
    ax.axvline(f, color="red", linestyle=":")
    ax.axhline(smooth[f], color="red", linewidth=0.6)
    ax.set_title(f"{workload}: restore {s}, failure {f} (K={interval}, seed {seed})", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (EMA)")
    ax.legend(fontsize=7)


def _excess(ax: Any, references: dict[int, Any], results: list[Any], interval: int) -> None:
    horizon = MIN_RESUME_STEPS + 1
    for bits in sorted({r["setting"]["bits"] for r in results}, key=bits_key):
        gaps: list[list[float]] = [[] for _ in range(horizon)]
        for result in (r for r in results if r["setting"]["bits"] == bits):
            reference = references[result["seed"]]
            smooth = ema(reference["eval_loss"], reference["eval_loss"][0])
            for resume in result["resumes"]:
                s = resume["restore_step"]
                curve = [smooth[s], *ema(resume["eval_loss"][1:], smooth[s])]
                for i in range(min(horizon, len(curve), len(smooth) - s)):
                    gaps[i].append(curve[i] - smooth[s + i])
        means = [sum(g) / len(g) for g in gaps if g]
        ax.plot(range(len(means)), means, marker=".", label=f"b={bits}")
    ax.axhline(0, color="black", linewidth=1, label="exact restore")
    ax.set_xlabel("steps after the restore")
    ax.set_ylabel("excess held-out loss (EMA), mean")
    ax.set_title(f"first {MIN_RESUME_STEPS} steps after a restore, mean over all failures "
                 f"(K={interval})", fontsize=9)
    ax.legend(fontsize=7)
