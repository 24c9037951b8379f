"""Where one ``encode_delta``'s CPU goes, stage by stage (``codec_speed.py --stages``).

cProfile names functions; this names the method's stages: each codec function that is one
stage (pass 1, the plan, pass 2, packing, zstd, the adaptive layout's trial, exceptions,
the blob's checksum and join) is wrapped in a timer of the calling thread's CPU time, and a
stage's *own* time excludes the stages it calls (zstd inside the split layout, ...). The
codec runs on one thread (``chunks.MAX_THREADS = 1``), so thread CPU time is the work
itself, less distorted by the other jobs on a shared machine than the wall clock.

Each encode runs twice: into a fresh output (as the first delta after a base) and into
that output again (``out=``, mapped already, as a recycled chain head); the difference of
pass 2 between the two is the page faults of the fresh output. Functions the code does not
have (an older ``ckptd`` on ``PYTHONPATH``) are left out, so both sides can be profiled.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

# (module, attribute, stage). A class method is "Class.method".
STAGES = (
    ("scaled", "fit_alpha", "scaled: fit alpha"),
    ("scaled", "scale_reference", "scaled: alpha * reference"),
    ("chunks", "empty_output", "output allocation"),
    ("chunks", "populate", "output: pages populated"),
    ("domains", "Ops.stats", "pass 1: delta + statistics"),
    ("quantize", "merge", "plan: merge statistics"),
    ("quantize", "auto_bits", "plan: bits=auto"),
    ("quantize", "make_plan", "plan: promotion, representatives"),
    ("domains", "Ops.encode", "pass 2: symbols, reconstruction, exceptions"),
    ("layouts", "encode_adaptive", "entropy: layout choice, bitmap, join"),
    ("layouts", "_packed_body", "entropy: packed body"),
    ("layouts", "_split_body", "entropy: split body (bitmap, non-zeros)"),
    ("packing", "pack", "entropy: packing"),
    ("zstdio", "compress_bare", "entropy: zstd"),
    ("delta", "_pack_exceptions", "exceptions"),
    ("delta", "build_blob", "blob: checksum + join"),
)
TRIAL = "entropy: adaptive trial (sample, both layouts)"


class StageTimer:
    """Own and inclusive thread-CPU seconds per stage, nested calls subtracted."""

    def __init__(self) -> None:
        self.own: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, seconds of nested stages]
        self._trial_depth = 0

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = TRIAL if self._trial_depth else stage
            self._stack.append([time.thread_time(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, nested = self._stack.pop()
                spent = time.thread_time() - start
                self.own[name] = self.own.get(name, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1][1] += spent
        return timed

    def wrap_trial(self, fn: Callable[..., Any], trial_elems: int) -> Callable[..., Any]:
        """Layout bodies of a sample (``symbols.size <= trial_elems`` in a larger chunk)
        count as the trial, with everything they call."""
        @functools.wraps(fn)
        def timed(symbols: Any, *args: Any, **kwargs: Any) -> Any:
            if symbols.size > trial_elems:
                return fn(symbols, *args, **kwargs)
            self._trial_depth += 1
            try:
                return fn(symbols, *args, **kwargs)
            finally:
                self._trial_depth -= 1
        return timed


def _install(timer: StageTimer) -> None:
    import importlib

    for module_name, attr, stage in STAGES:
        try:
            module = importlib.import_module(f"ckptd.daemon.codec.{module_name}")
        except ImportError:
            continue
        owner: Any = module
        name = attr
        if "." in attr:
            cls, name = attr.split(".")
            owner = getattr(module, cls, None)
        if owner is None or not hasattr(owner, name):
            continue
        setattr(owner, name, timer.wrap(stage, getattr(owner, name)))
    layouts = importlib.import_module("ckptd.daemon.codec.layouts")
    if hasattr(layouts, "TRIAL_ELEMS"):
        # A chunk of at most FULL_TRIAL_ELEMS tries both layouts whole and keeps one: its
        # bodies are the trial and the result at once, so only samples count as trial.
        for name in ("_packed_body", "_split_body"):
            if hasattr(layouts, name):
                setattr(layouts, name, timer.wrap_trial(getattr(layouts, name),
                                                        layouts.TRIAL_ELEMS))


def stages(cur: Any, ref: Any, options: dict[str, Any], reps: int) -> dict[str, Any]:
    """Median own thread-CPU ns per element of each stage, fresh output and mapped one."""
    from ckptd.daemon import codec
    from ckptd.daemon.codec import chunks

    chunks.MAX_THREADS = 1
    timer = StageTimer()
    _install(timer)
    blob, recon = codec.encode_delta(cur, ref, **options)  # compile/load, touch the inputs
    runs: dict[str, list[dict[str, float]]] = {"fresh": [], "mapped": []}
    for _ in range(reps):
        for side, samples in runs.items():
            timer.own = {}
            began = time.thread_time()
            if side == "fresh":
                blob, recon = codec.encode_delta(cur, ref, **options)
            else:
                blob, _ = codec.encode_delta(cur, ref, out=recon, **options)
            total = time.thread_time() - began
            own = dict(timer.own)
            own["other (Python, glue)"] = total - sum(own.values())
            own["total"] = total
            samples.append(own)
    n = cur.size
    result: dict[str, Any] = {"elements": n, "blob_bytes": len(blob)}
    for side, samples in runs.items():
        names = sorted({k for s in samples for k in s}, key=_order)
        result[side] = {k: 1e9 * statistics.median(s.get(k, 0.0) for s in samples) / n
                        for k in names}
    return result


def _order(stage: str) -> int:
    names = [s for _, _, s in STAGES] + [TRIAL, "other (Python, glue)", "total"]
    return names.index(stage) if stage in names else len(names)


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One table: a row per stage, a column per case (fresh output; pass 2 into a mapped
    output and the fresh output's page faults as extra rows)."""
    cases = list(results)
    names = sorted({k for r in results.values() for k in r["fresh"]}, key=_order)
    lines = ["| stage (ns/element, thread CPU) | " + " | ".join(cases) + " |",
             "|---" * (len(cases) + 1) + "|"]
    for name in names:
        cells = [f"{r['fresh'].get(name, 0.0):.2f}" for r in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pass2 = "pass 2: symbols, reconstruction, exceptions"
    cells = [f"{r['mapped'].get('total', 0.0):.2f}" for r in results.values()]
    lines.append("| total into a mapped output (`out=`) | " + " | ".join(cells) + " |")
    cells = [f"{r['fresh'].get(pass2, 0.0) - r['mapped'].get(pass2, 0.0):.2f}"
             for r in results.values()]
    lines.append("| of which the fresh output's page faults (pass 2, fresh - mapped) | "
                 + " | ".join(cells) + " |")
    return "\n".join(lines)
