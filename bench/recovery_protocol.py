"""The LC-Checkpoint paper's recovery protocol ("rework cost"), independent of any store.

One *reference* run trains a workload for ``steps`` optimizer steps without failing,
evaluating on the fixed held-out set after every step and keeping the full training state
(weights and optimizer) every ``snapshot_every`` steps. Those are the checkpoints every
setting saves through ckptd. A *failure* at step ``f`` loses the live state; the run
restores the latest checkpoint ``s <= f`` and continues with the batches of ``s + 1, ...``
(data position = step). Its *rework cost* is the number of steps it needs from ``s`` to
get back to the loss the run had at ``f``.

Loss and threshold (fixed once, for every workload and setting):

* the loss is the held-out evaluation loss (no minibatch noise), smoothed by an EMA with
  ``EMA_ALPHA`` per step. The resumed run's EMA starts from the reference's EMA at ``s``:
  its history before ``s`` *is* the reference's;
* the rework cost is the first ``r >= 1`` with ``ema_resumed[s + r] <= ema_reference[f]``.
  A resumed run that has not got there after ``f - s + CAP_INTERVALS * K`` steps is
  *censored* (counted at the cap), one whose loss turns NaN is *diverged*;
* a restore from an exact checkpoint replays the reference bit for bit (same state, same
  batches, one torch thread), so its rework is read off the reference curve and paired
  with the lossy rework of the same failure (``replay_rework``);
* a restart from scratch replays the reference from step 0, so its cost is the first
  ``t >= 1`` with ``ema_reference[t] <= ema_reference[f]``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench.workloads import Trainer, Workload

EMA_ALPHA = 0.3
CAP_INTERVALS = 3
# Every resumed run trains at least this long, so the excess loss right after a restore
# can be averaged over all failures (runs that reach the target earlier would drop out).
MIN_RESUME_STEPS = 10
# Failures fall in [WARMUP, END] of the run: the first steps of a run (digits CNN's
# initial plateau) say little about a checkpoint, and the failure needs reference steps.
_FAILURE_WINDOW = (0.2, 0.9)
# A state bigger than this is kept as a torch.save file rather than in memory: the
# decoder's 40 checkpoints would hold ~11 GB per seed (bench/README.md, memory).
_SPILL_BYTES = 64 << 20


@dataclass
class Reference:
    """The never-failing run of one (workload, seed): curves, checkpoints, torch.save sizes."""

    workload: str
    seed: int
    steps: int
    snapshot_every: int
    eval_loss: list[float]  # index t: after t steps (0 = initialisation)
    eval_accuracy: list[float]
    train_loss: list[float]  # index t - 1: loss of the batch of step t
    torch_save_bytes: dict[int, int]  # step -> size of torch.save of that checkpoint
    raw_bytes: int  # bytes of every tensor of one checkpoint
    train_seconds: float
    snapshots: Mapping[int, dict[str, Any]] = field(repr=False)

    @property
    def smoothed(self) -> list[float]:
        return ema(self.eval_loss, self.eval_loss[0])

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (the snapshots stay in memory)."""
        keys = ("workload", "seed", "steps", "snapshot_every", "eval_loss", "eval_accuracy",
                "train_loss", "raw_bytes", "train_seconds")
        out = {key: getattr(self, key) for key in keys}
        out["torch_save_bytes"] = {str(k): v for k, v in self.torch_save_bytes.items()}
        return out


@dataclass(frozen=True)
class Failure:
    """A failure at ``failed_at``; ``restore_step`` is the latest checkpoint before it."""

    restore_step: int
    failed_at: int
    continue_to_end: bool  # also train on to the end of the run, for final loss/accuracy


@dataclass
class Resume:
    """What one restore-and-continue did, measured against the reference."""

    restore_step: int
    failed_at: int
    target: float  # the reference's smoothed loss at the failure
    rework: int  # steps from restore_step to the target (the cap when censored)
    exact_rework: int  # the same failure restored from an exact checkpoint (a replay)
    censored: bool
    diverged: bool
    restored_eval_loss: float  # held-out loss of the restored state, before any step
    restored_error: dict[str, float]  # relative L2 error of "model" / "optim" tensors
    negative_second_moments: int  # elements < 0 in the restored Adam exp_avg_sq tensors
    # Relative L2 error of the Adam update direction m_hat / (sqrt(v_hat) + eps) computed
    # from the restored moments, per parameter group (empty for SGD).
    update_error: dict[str, float]
    eval_loss: list[float]  # from restore_step (index 0) onwards
    eval_accuracy: list[float]
    restore_seconds: float

    @property
    def final(self) -> tuple[float, float]:
        return self.eval_loss[-1], self.eval_accuracy[-1]


def ema(values: list[float], start: float) -> list[float]:
    """EMA of ``values`` whose state before ``values[0]`` was ``start``; ``out[i]`` includes
    ``values[i]`` (so ``ema(x, x[0])[0] == x[0]``)."""
    out, current = [], start
    for value in values:
        current = EMA_ALPHA * value + (1 - EMA_ALPHA) * current
        out.append(current)
    return out


def first_reached(smoothed: list[float], target: float, start: int = 1) -> int | None:
    """The first index ``>= start`` whose value is ``<= target``, or None."""
    for index in range(start, len(smoothed)):
        if smoothed[index] <= target:
            return index
    return None


def scratch_rework(eval_loss: list[float], failed_at: int) -> int:
    """Steps a restart from step 0 needs to reach the loss at ``failed_at``: with the same
    seed and batches the restart replays the reference, whose held-out curve is given."""
    smoothed = ema(eval_loss, eval_loss[0])
    reached = first_reached(smoothed, smoothed[failed_at])
    return failed_at if reached is None else reached


def torch_save_size(state: dict[str, Any], directory: str) -> int:
    """Bytes of ``torch.save(state)`` written as a real file (the baseline a user has)."""
    path = os.path.join(directory, "checkpoint.pt")
    torch.save(state, path)
    size = os.path.getsize(path)
    os.remove(path)
    return size


def state_nbytes(state: Any) -> int:
    """Bytes of every tensor in a (nested) state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_nbytes(v) for v in state)
    return 0


class _SpilledStates(Mapping[int, dict[str, Any]]):
    """Snapshots kept as the ``torch.save`` files that are also their size baseline."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._steps: list[int] = []

    def put(self, step: int, state: dict[str, Any]) -> int:
        path = os.path.join(self._directory, f"{step}.pt")
        torch.save(state, path)
        self._steps.append(step)
        return os.path.getsize(path)

    def __getitem__(self, step: int) -> dict[str, Any]:
        if step not in self._steps:
            raise KeyError(step)
        state: dict[str, Any] = torch.load(os.path.join(self._directory, f"{step}.pt"),
                                           weights_only=True)
        return state

    def __iter__(self) -> Iterator[int]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)


def run_reference(workload: Workload, seed: int, steps: int, snapshot_every: int,
                  spill_dir: str | None = None) -> Reference:
    """Trains ``steps`` steps, evaluating after each and keeping every ``snapshot_every``-th
    state; measures torch.save of each kept state in a temporary directory. States larger
    than ``_SPILL_BYTES`` are kept as those files under ``spill_dir`` (required then)."""
    trainer = workload.trainer(seed)
    losses, accuracies, train_losses = [], [], []
    snapshots: Any = {}
    sizes: dict[int, int] = {}
    if state_nbytes(trainer.state()["model"]) * 3 > _SPILL_BYTES:  # weights + Adam moments
        if spill_dir is None:
            raise ValueError(f"{workload.name}'s states need a spill_dir")
        snapshots = _SpilledStates(tempfile.mkdtemp(prefix=f"{workload.name}-s{seed}-",
                                                    dir=spill_dir))
    started = time.perf_counter()
    first = trainer.evaluate()
    losses.append(first.loss)
    accuracies.append(first.accuracy)
    for _ in range(steps):
        train_losses.append(trainer.train_step())
        evaluation = trainer.evaluate()
        losses.append(evaluation.loss)
        accuracies.append(evaluation.accuracy)
        if trainer.step % snapshot_every == 0:
            if isinstance(snapshots, _SpilledStates):
                sizes[trainer.step] = snapshots.put(trainer.step, trainer.state())
            else:
                snapshots[trainer.step] = trainer.state()
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="ckptd-torchsave-") as directory:
        sizes = sizes or {step: torch_save_size(state, directory)
                          for step, state in snapshots.items()}
    raw = state_nbytes(trainer.state())
    return Reference(workload.name, seed, steps, snapshot_every, losses, accuracies,
                     train_losses, sizes, raw, seconds, snapshots)


def plan_failures(
    candidates: list[int], steps: int, interval: int, count: int, seed: int
) -> list[Failure]:
    """``count`` failures spread evenly over the checkpoints in ``candidates`` that lie in
    the failure window, each a seeded random 1..K-1 steps after its checkpoint (a
    checkpoint may take several failures at different offsets). The middle failure also
    continues to the end of the run."""
    low, high = (int(steps * edge) for edge in _FAILURE_WINDOW)
    window = [s for s in candidates if low <= s and s + interval <= high] or candidates
    picks = np.linspace(0, len(window) - 1, count).round().astype(int)
    rng = np.random.default_rng((seed, interval, 7))
    offsets = rng.integers(1, interval, size=count) if interval > 1 else np.zeros(count, int)
    pairs = sorted({(window[p], window[p] + int(o)) for p, o in zip(picks, offsets, strict=True)})
    middle = len(pairs) // 2
    return [Failure(s, f, i == middle) for i, (s, f) in enumerate(pairs)]


def replay_rework(smoothed: list[float], restore_step: int, failed_at: int) -> int:
    """The rework of an exact restore: with the same state and batches the resumed run
    replays the reference (the quick test checks this bit for bit through the daemon)."""
    reached = first_reached(smoothed, smoothed[failed_at], start=restore_step + 1)
    assert reached is not None and reached <= failed_at
    return reached - restore_step


def relative_errors(restored: dict[str, Any], original: dict[str, Any]) -> dict[str, float]:
    """Relative L2 error of the restored float tensors, per top-level part (model, optim)."""
    out = {}
    for part in ("model", "optim"):
        pairs = list(_float_pairs(restored[part], original[part]))
        num = sum(float(torch.sum((a.double() - b.double()) ** 2)) for a, b in pairs)
        den = sum(float(torch.sum(b.double() ** 2)) for _, b in pairs)
        out[part] = math.sqrt(num / den) if den else 0.0
    return out


def negative_second_moments(state: dict[str, Any]) -> int:
    """Elements below zero in Adam's ``exp_avg_sq``: its square root then turns NaN."""
    moments = state["optim"].get("state", {}).values()
    return sum(int((m["exp_avg_sq"] < 0).sum()) for m in moments if "exp_avg_sq" in m)


def update_errors(restored: dict[str, Any], original: dict[str, Any],
                  groups: dict[int, str]) -> dict[str, float]:
    """Relative L2 error of Adam's next update direction ``m_hat / (sqrt(v_hat) + eps)``
    from the restored moments against the original's, pooled per parameter group
    (``groups``: optimizer-state index -> group name). What a restore must bring back is
    this direction, not the moments one by one; empty without Adam state."""
    states, eps = original["optim"].get("state", {}), 1e-8
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for index, state in states.items():
        if "exp_avg_sq" not in state:
            continue
        back = restored["optim"]["state"][index]
        exact, lossy = (s["exp_avg"].double() / (s["exp_avg_sq"].double().sqrt() + eps)
                        for s in (state, back))
        name = groups.get(int(index), "other")
        num[name] = num.get(name, 0.0) + float(torch.sum((lossy - exact) ** 2))
        den[name] = den.get(name, 0.0) + float(torch.sum(exact ** 2))
    return {name: math.sqrt(num[name] / den[name]) if den[name] else 0.0 for name in num}


def parameter_groups(trainer: Trainer) -> dict[int, str]:
    """Optimizer-state index -> a coarse group of its parameter (embedding, attention,
    mlp, head, norm/bias, conv, linear), by the parameter's module name and rank."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    out = {}
    for index, param in enumerate(params):
        name = names.get(id(param), "")
        if param.dim() < 2:
            out[index] = "norm/bias"
        elif name.startswith(("tok", "pos")):
            out[index] = "embedding"
        elif ".qkv." in name or ".proj." in name:
            out[index] = "attention"
        elif ".fc" in name:
            out[index] = "mlp"
        elif name.startswith("head"):
            out[index] = "head"
        else:
            out[index] = "conv" if param.dim() > 2 else "linear"
    return out


def _float_pairs(a: Any, b: Any) -> Any:
    if isinstance(b, torch.Tensor):
        if b.is_floating_point() and b.dim() > 0:
            yield a, b
    elif isinstance(b, dict):
        for key in b:
            yield from _float_pairs(a[key], b[key])
    elif isinstance(b, list | tuple):
        for x, y in zip(a, b, strict=True):
            yield from _float_pairs(x, y)


def resume(
    workload: Workload,
    reference: Reference,
    failure: Failure,
    interval: int,
    restore: Callable[[int], dict[str, Any]],
) -> Resume:
    """Restores ``failure.restore_step`` through ``restore`` and trains on until the
    reference's smoothed loss at the failure is reached (or the cap, or NaN), and to the
    end of the run when ``failure.continue_to_end``."""
    s, f = failure.restore_step, failure.failed_at
    started = time.perf_counter()
    state = restore(s)
    restore_seconds = time.perf_counter() - started
    trainer = workload.trainer(reference.seed)
    trainer.load(state, s)
    original = reference.snapshots[s]
    errors = relative_errors(state, original)
    direction = update_errors(state, original, parameter_groups(trainer))
    del original
    negatives = negative_second_moments(state)
    smoothed_ref = reference.smoothed
    target = smoothed_ref[f]
    cap = f - s + CAP_INTERVALS * interval
    end = max(cap, reference.steps - s) if failure.continue_to_end else cap
    losses, accuracies = _train_until(trainer, end, smoothed_ref[s], target,
                                      stop_early=not failure.continue_to_end)
    reached = first_reached(ema(losses[1:], smoothed_ref[s]), target, start=0)
    rework = cap if reached is None or reached + 1 > cap else reached + 1
    diverged = any(math.isnan(x) for x in losses)
    exact = replay_rework(smoothed_ref, s, f)
    return Resume(s, f, target, rework, exact, reached is None or reached + 1 > cap, diverged,
                  losses[0], errors, negatives, direction, losses, accuracies,
                  restore_seconds)


def _train_until(
    trainer: Trainer, max_steps: int, ema_start: float, target: float, stop_early: bool
) -> tuple[list[float], list[float]]:
    """Evaluates, then trains up to ``max_steps`` steps evaluating after each; stops once
    the EMA reaches ``target`` (when ``stop_early``) or the loss is NaN."""
    first = trainer.evaluate()
    losses, accuracies = [first.loss], [first.accuracy]
    current = ema_start
    for _ in range(max_steps):
        trainer.train_step()
        evaluation = trainer.evaluate()
        losses.append(evaluation.loss)
        accuracies.append(evaluation.accuracy)
        current = EMA_ALPHA * evaluation.loss + (1 - EMA_ALPHA) * current
        if math.isnan(evaluation.loss):
            break
        if stop_early and current <= target and len(losses) > MIN_RESUME_STEPS:
            break
    return losses, accuracies
