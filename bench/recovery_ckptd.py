"""One sweep setting run through the real ckptd daemon and client.

For each setting a daemon is started in-process (``serve_in_thread``, port 0, storage in a
fresh directory, so on-disk sizes belong to this setting alone) with the setting's engine
config. The reference run's checkpoints are saved in order through a ``Checkpointer`` (the
same calls a trainer makes), then the committed chain is listed for sizes, a few restores
are timed, and every planned failure is restored and continued (``recovery_protocol``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ckptd.client import Checkpointer
from ckptd.daemon.codec import blob_info
from ckptd.daemon.config import AUTO_BITS, DaemonConfig, EngineConfig
from ckptd.daemon.server.app import serve_in_thread
from ckptd.daemon.store.manifest import MANIFEST_NAME, Manifest

from bench.recovery_protocol import Reference, parameter_groups, plan_failures, resume
from bench.update_units import PREFIXES, from_update_units, to_update_units, uses_update_units
from bench.workloads import Workload

_RESTORE_REPEATS = 3
# A state this big is restored once per timing (the decoder's take seconds each).
_ONE_REPEAT_BYTES = 64 << 20
# ``Setting.optim``'s prefix that also marks every model tensor exact.
_EXACT_MODEL = "exactmodel-"
# A ``fixed:`` form's ``<group><width>`` part: that parameter group's first moment's width.
_GROUP_WIDTH = re.compile(r"([a-z]+?)(\d+|exact)")


@dataclass(frozen=True)
class Setting:
    """One point of the sweep.

    Attributes:
        name: Unique label (``"b3-K10"``, ``"b3-K10-midrange"``...).
        group: Which part of the sweep it belongs to (``grid``, ``exact``, ``representative``,
            ``coder``, ``base_interval``, ``optim``, ``chosen``).
        interval: K, training steps between two checkpoints.
        bits: Bit width of lossy tensors (``Checkpointer(bits=...)``: every built-in width
            and the daemon's default); ``"auto:<share>"`` the daemon's adaptive width with
            that error budget (``auto_bits_max_error``); ``"shipped"`` what a user gets
            with no settings (no ``bits=``, the daemon's ``EngineConfig`` defaults); None
            stores everything exactly (the baseline).
        max_delta_fraction: The engine's other base trigger: a new base once the deltas
            since the last one outweigh this fraction of it.
        min_lossy_elements: Float tensors smaller than this are stored exactly under AUTO.
        auto_relative_to: What the adaptive width's budget is relative to: ``"delta"`` (the
            shipped rule) or ``"state"`` (``auto_bits_relative_to``; ``bench/auto_budget.py``).
        optim: Policy of optimizer tensors: ``"builtin"`` (the client's built-in rules for
            the optimizer saved: ``ckptd.client.policies.builtin_rules``; the shipped
            default), ``"sq-log"`` (older runs: the built-in rules before they depended on
            the optimizer: Adam's ``exp_avg_sq`` lossy-log, ``exp_avg`` lossy-scaled),
            ``"auto"`` (the daemon's rule for all, ``exp_avg_sq`` lossy in the linear
            domain), ``"exact"``, ``"lossy:<bits>"``, ``"sq-exact"`` (only Adam's
            ``exp_avg_sq`` exact) or ``"fixed:<bits>"`` (the built-in domains at that fixed
            width, SGD's momentum linear). Under these last four the weights are stored as
            the built-in set says: the daemon's width (adaptive under ``bits="auto"``) for
            SGD, the Adam set's b3 for Adam (``fixed:`` runs made before that set, such as
            ``bench/auto_budget.py``'s in bench/README.md, had the daemon's for both);
            ``"fixed:<bits>-sq<b>"`` the same with ``exp_avg_sq`` at its own width;
            either width may be ``exact`` (``fixed:2-sqexact``: ``exp_avg_sq`` exact,
            ``fixed:exact-sq3``: the first moment exact). The prefix ``exactmodel-``
            (``exactmodel-fixed:2``) also stores the model's tensors exactly, so that only
            the optimizer state is lossy: ``weights="exact"`` as ``bench/auto_budget.py
            --optim`` can say it (which group costs rework);
            ``"upd:<bits>[-sq<b>]"`` (``"updlin:..."``) as ``fixed`` with Adam's ``exp_avg``
            saved in the update's units, lossy-scaled (linear) (``bench/update_units.py``).
        buckets_per_octave: The daemon's buckets per octave for the tensors it decides
            about (policy AUTO: the weights; ``EngineConfig.buckets_per_octave``; 1 is the
            shipped octave buckets, 2 or 4 finer; ``bench/auto_budget.py --fine``).
        weights: A policy spec for the model's tensors (a ``("model/*", spec)`` rule
            ahead of the built-in ones), e.g. ``"lossy:2"``; ``""``: the built-in rules'.
        measure_rework: Restore and continue at the failure points (off where only sizes
            and restore times differ, e.g. base-interval variations).

    The defaults of the knobs are the shipped ones (``EngineConfig``), so a setting differs
    from what a user gets only in what it names.
    """

    name: str
    group: str
    interval: int
    bits: int | str | None
    representative: str = "mean"
    coder: str = "zstd"
    base_interval: int = 50
    max_delta_fraction: float = 8.0
    min_lossy_elements: int = EngineConfig.min_lossy_elements
    auto_relative_to: str = EngineConfig.auto_bits_relative_to
    optim: str = "builtin"
    measure_rework: bool = True
    buckets_per_octave: int = EngineConfig.buckets_per_octave
    weights: str = ""

    @property
    def fixed_bits(self) -> int | None:
        """The client's bit width: None for the exact baseline and the adaptive width."""
        return self.bits if isinstance(self.bits, int) else None


def client_policies(setting: Setting, force_lossy: bool,
                    groups: Mapping[int, str] | None = None) -> list[tuple[str, str]]:
    """The ``Checkpointer`` policy rules of a setting.

    Adam's step counters stay exact whatever the optimizer policy says (a 0-dim float
    bias-correction counter is not something to quantize). ``force_lossy`` makes every other
    tensor lossy, for models whose tensors are all under the daemon's AUTO size threshold
    when the setting's threshold is above 1. ``groups`` (optimizer-state index ->
    parameter group, ``parameter_groups``) is needed by a ``fixed:`` form that gives one
    group's first moment its own width (``fixed:2-sq2-head3``: ``exp_avg`` at b3 for the
    head's parameters, b2 elsewhere).
    """
    if setting.bits is None:
        return [("*", "exact")]
    optim, weights_spec = setting.optim, setting.weights
    if optim.startswith(_EXACT_MODEL):  # the command line's spelling of weights="exact"
        optim, weights_spec = optim.removeprefix(_EXACT_MODEL), "exact"
    weights = [("model/*", weights_spec)] if weights_spec else []
    if optim == "builtin":
        # Exactly what a user gets: the client's per-optimizer rules (Adam's step counters
        # exact, SGD's weights lossy under the daemon's threshold of 1); forcing every
        # tensor lossy here would override them.
        return weights
    rules = [("optim/state/*/step", "exact"), *weights]
    if optim == "sq-exact":
        rules.append(("optim/state/*/exp_avg_sq", "exact"))
    elif optim == "sq-log":
        # The built-in rules before they depended on the optimizer: the moments in their
        # domains at the daemon's width, every other tensor the daemon's (not the Adam
        # set's b3 catch-all, which would pin the weights whatever the daemon's width).
        rules += [("optim/state/*/exp_avg_sq", "lossy-log"),
                  ("optim/state/*/exp_avg", "lossy-scaled")]
    elif optim.startswith(("fixed:", *PREFIXES)):
        bits, sq_bits, tokens = _fixed_form(optim)
        by_group = {}
        for token in tokens:
            match = _GROUP_WIDTH.fullmatch(token)
            if match is None or groups is None:
                raise ValueError(f"optimizer policy {optim!r}: {token!r} is not <group><bits> "
                                 "or no parameter groups were given")
            by_group[match[1]] = match[2]
        first = "lossy" if optim.startswith("updlin:") else "lossy-scaled"

        def spec(domain: str, width: str) -> str:
            return "exact" if width == "exact" else f"{domain}:{width}"

        rules.append(("optim/state/*/exp_avg_sq", spec("lossy-log", sq_bits)))
        rules += [(f"optim/state/{index}/exp_avg", spec(first, by_group[group]))
                  for index, group in sorted((groups or {}).items()) if group in by_group]
        rules += [("optim/state/*/exp_avg", spec(first, bits)),
                  ("optim/state/*", spec("lossy", bits))]
    elif optim == "auto":
        pass  # the daemon's rule for every tensor (exp_avg_sq lossy in the linear domain)
    else:
        rules.append(("optim/*", optim))
    if force_lossy and setting.min_lossy_elements > 1:
        # Under a threshold of 1 the daemon makes them lossy itself (at its buckets).
        rules.append(("*", "lossy"))
    if optim in ("sq-log", "auto"):
        rules.append(("*", "auto"))  # the rest the daemon's, ahead of the Adam set's b3 catch-all
    return rules


def _fixed_form(optim: str) -> tuple[str, str, list[str]]:
    """A ``fixed:`` (or ``upd:``, ``updlin:``) form's widths: the optimizer state's,
    ``exp_avg_sq``'s and the per-group first-moment parts (``fixed:2-sq3-head3`` -> ``2``,
    ``3``, ``[head3]``)."""
    bits, *more = optim.partition(":")[2].split("-")
    sq_bits = next((t[2:] for t in more if t.startswith("sq")), bits)
    return bits, sq_bits, [t for t in more if not t.startswith("sq")]


def _groups(workload: Workload, setting: Setting, seed: int) -> dict[int, str] | None:
    """Optimizer-state index -> parameter group of ``workload``'s model where the setting's
    policy names groups (a fresh trainer: the indices follow the model's structure);
    None otherwise, so other settings build nothing more."""
    optim = setting.optim.removeprefix(_EXACT_MODEL)
    if not optim.startswith(("fixed:", *PREFIXES)) or not _fixed_form(optim)[2]:
        return None
    return parameter_groups(workload.trainer(seed))


def daemon_config(setting: Setting, storage: Path) -> DaemonConfig:
    auto = isinstance(setting.bits, str) and setting.bits.startswith("auto")
    engine = EngineConfig(
        base_interval=setting.base_interval,
        max_delta_fraction=setting.max_delta_fraction,
        min_lossy_elements=setting.min_lossy_elements,
        default_bits=AUTO_BITS if auto else setting.fixed_bits or EngineConfig.default_bits,
        auto_bits_max_error=(float(str(setting.bits).partition(":")[2]) if auto
                             else EngineConfig.auto_bits_max_error),
        auto_bits_relative_to=setting.auto_relative_to,
        buckets_per_octave=setting.buckets_per_octave,
        representative=setting.representative,
        coder=setting.coder,
    )
    return DaemonConfig(storage_url=str(storage), listen="127.0.0.1:0", engine=engine,
                        log_level="warning")


def run_setting(
    workload: Workload,
    reference: Reference,
    setting: Setting,
    *,
    failures_per_seed: int,
    workdir: Path,
    force_lossy: bool,
) -> dict[str, Any]:
    """Saves the reference's checkpoints under ``setting`` and measures sizes, restore
    times and (when ``setting.measure_rework``) the rework cost of failures after delta
    checkpoints: a base restores exactly, so failures right after one would only dilute
    what the lossy codec costs (how often a restore hits a base follows from the chain
    policy, whose footprint side is measured separately)."""
    storage = workdir / f"{workload.name}-{setting.name}-s{reference.seed}"
    update_units = uses_update_units(setting.optim.removeprefix(_EXACT_MODEL))
    run = f"{workload.name}-{setting.name}-seed{reference.seed}"
    with serve_in_thread(daemon_config(setting, storage)) as daemon, Checkpointer(
        daemon.address, run, bits=setting.fixed_bits,
        policies=client_policies(setting, force_lossy,
                                 _groups(workload, setting, reference.seed)),
        staging_buffers=4,
    ) as checkpointer:
        steps = list(range(setting.interval, reference.steps + 1, setting.interval))
        save_calls, save_total = _save_all(
            checkpointer, reference, steps, to_update_units if update_units else None)
        infos = checkpointer.step_infos()
        timings = _restore_timings(
            checkpointer, infos, 1 if reference.raw_bytes > _ONE_REPEAT_BYTES else _RESTORE_REPEATS)
        resumes = []
        restore = _restorer(checkpointer, update_units)
        if setting.measure_rework:
            candidates = [i.step for i in infos if i.kind == "delta" or setting.bits is None]
            failures = plan_failures(candidates, reference.steps, setting.interval,
                                     failures_per_seed, reference.seed)
            resumes = [
                asdict(resume(workload, reference, failure, setting.interval, restore))
                for failure in failures
            ]
    breakdown = _breakdown(storage, infos)
    disk_bytes = _disk_bytes(storage)
    shutil.rmtree(storage, ignore_errors=True)  # the decoder's chains take GBs
    return {
        "setting": asdict(setting),
        "workload": workload.name,
        "seed": reference.seed,
        "steps": [
            {"step": i.step, "kind": i.kind, "stored_bytes": i.stored_bytes,
             "raw_bytes": i.raw_bytes, "chain_depth": i.chain_depth,
             "torch_save_bytes": reference.torch_save_bytes[i.step]}
            for i in infos
        ],
        "disk_bytes": disk_bytes,
        "delta_breakdown": breakdown,
        "save_call_seconds_median": statistics.median(save_calls),
        "save_to_durable_seconds": save_total,
        "restore_seconds": timings,
        "resumes": resumes,
    }


def _restorer(checkpointer: Checkpointer,
              update_units: bool) -> Callable[[int], dict[str, Any]]:
    """The restore the resumed runs train from: ``checkpointer.restore``, and with
    ``update_units`` each restored ``w_hat`` turned back into Adam's ``exp_avg``."""
    if not update_units:
        return checkpointer.restore

    def restore(step: int) -> dict[str, Any]:
        return from_update_units(checkpointer.restore(step))
    return restore


def _save_all(
    checkpointer: Checkpointer, reference: Reference, steps: list[int],
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[list[float], float]:
    """Saves each step as a trainer would (``prepare``: a bench-level transform of the
    state, e.g. ``to_update_units``; inside the stall, as a trainer would pay it); returns
    each ``save`` call's duration (the trainer's stall) and the time until all were
    durable."""
    calls = []
    started = time.perf_counter()
    for step in steps:
        before = time.perf_counter()
        state = reference.snapshots[step]
        handle = checkpointer.save(step, prepare(state) if prepare else state)
        calls.append(time.perf_counter() - before)
        if handle.skipped:
            raise RuntimeError(f"step {step} was skipped: {handle.skip_reason}")
    checkpointer.wait()
    return calls, time.perf_counter() - started


def _restore_timings(checkpointer: Checkpointer, infos: list[Any],
                     repeats: int) -> dict[str, Any]:
    """Best of a few restores of the latest step (served from the daemon's memory), the
    oldest step, and the step deepest in a chain other than the latest (base + most deltas,
    from storage)."""
    deepest = max(infos[:-1] or infos, key=lambda i: (i.chain_depth, -i.step))
    targets = {"latest": None, "oldest": infos[0].step, "deepest": deepest.step}
    out: dict[str, Any] = {"deepest_step": deepest.step, "deepest_depth": deepest.chain_depth}
    for label, step in targets.items():
        best = float("inf")
        for _ in range(repeats):
            before = time.perf_counter()
            checkpointer.restore(step)
            best = min(best, time.perf_counter() - before)
        out[label] = best
    return out


def _disk_bytes(root: Path) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(root)
        for name in names
    )


def _breakdown(storage: Path, infos: list[Any]) -> dict[str, int]:
    """Where the bytes of the last delta go: manifest, and blobs by part (model/optim) and
    encoding (lossy delta or exact). Reads the local backend's manifest files, so it is
    empty if the storage layout changes (the sizes above do not depend on it)."""
    deltas = [i.step for i in infos if i.kind == "delta"]
    if not deltas:
        return {}
    for path in storage.rglob(MANIFEST_NAME):
        manifest = Manifest.from_bytes(path.read_bytes(), str(path))
        if manifest.key.step != deltas[-1]:
            continue
        out = {"manifest": path.stat().st_size, "tensors": len(manifest.tensors)}
        for entry in manifest.tensors:
            part = entry.spec.name.split("/", 1)[0]
            kind = "lossy" if entry.encoding == "delta" else "exact"
            if kind == "lossy" and (storage / entry.blob_key).is_file():
                # The width the blob was written with (bits="auto" picks it per tensor),
                # overall and per tensor group (model, or the optimizer state's kind).
                bits = blob_info((storage / entry.blob_key).read_bytes()).bits
                group = part if part != "optim" else entry.spec.name.rsplit("/", 1)[-1]
                for key in (f"bits{bits}_elements", f"{group}_bits{bits}_elements"):
                    out[key] = out.get(key, 0) + math.prod(entry.spec.shape)
            for key, value in ((f"{part}_{kind}", entry.blob_bytes),
                               (f"{kind}_elements", math.prod(entry.spec.shape))):
                out[key] = out.get(key, 0) + value
        return out
    return {}
