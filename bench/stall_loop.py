"""The stall of a save inside a training loop, with copying and with overlapped snapshots.

``bench/stall.py`` times ``save()`` alone. With ``snapshot="overlap"`` that is not the whole
cost: the copy runs after ``save()`` returns, while the trainer computes, and the
optimizer's step waits for it. So this part runs training iterations over the benchmark
state and times, per checkpoint:

* **save** — inside ``save()``; **wait** — ``wait_snapshot()`` right before the optimizer
  step (exactly what ``Checkpointer.guard``'s hook waits for); **blocked** = save + wait,
  the time ckptd holds the trainer thread;
* **slowdown** — how much longer the iteration that carries the checkpoint (save, forward
  and backward, optimizer step) took than the iteration right before it without one. It
  also charges the trainer for everything else competing for this machine's two cores
  while it computes: the background copy, and the daemon taking and encoding the previous
  bytes.

Two kinds of iteration: **cpu** — a forward and backward pass on this CPU (three matmuls
per weight matrix with a batch of 64 rows, gradients written into ``.grad``), using every
core; **idle** — the trainer thread sleeps as long as a cpu pass takes, as a GPU trainer's
host thread waits for its kernels while the CPU is free. The optimizer is torch's SGD
over every weight matrix in both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from ckptd.client import Checkpointer

BATCH_ROWS = 64
WORK_KINDS = ("cpu", "idle")
MODES = ("copy", "overlap")


class Trainer:
    """SGD over the benchmark state's matrices; ``work`` is one forward and backward pass."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        generator = torch.Generator().manual_seed(1)
        self.params = {name: torch.nn.Parameter(tensor) for name, tensor in state.items()}
        self.matrices = [p for p in self.params.values() if p.dim() == 2]
        self.inputs = [
            torch.randn(BATCH_ROWS, p.shape[1], generator=generator) for p in self.matrices
        ]
        for param in self.matrices:
            param.grad = torch.zeros_like(param)
        self.optimizer = torch.optim.SGD(self.matrices, lr=1e-6)
        self.idle_s = 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a model's ``state_dict()`` gives: detached views sharing the storage."""
        return {name: param.detach() for name, param in self.params.items()}

    def work_cpu(self) -> None:
        with torch.no_grad():
            for x, weight in zip(self.inputs, self.matrices, strict=True):
                y = x @ weight.T  # forward
                _ = y @ weight  # gradient of the input
                torch.mm(y.T, x, out=weight.grad)  # gradient of the weight

    def work_idle(self) -> None:
        time.sleep(self.idle_s)

    def work(self, kind: str) -> Callable[[], None]:
        return self.work_cpu if kind == "cpu" else self.work_idle


def time_loop(
    address: str,
    transport: str,
    trainer: Trainer,
    *,
    kind: str,
    mode: str,
    reps: int,
    floor: Callable[[], float],
) -> dict[str, Any]:
    """``reps`` checkpointed iterations (after one warm-up), each right after a plain one."""
    work = trainer.work(kind)
    step = trainer.optimizer.step
    plain, carrying, saves, waits, floors = [], [], [], [], []
    run = f"loop-{transport}-{kind}-{mode}"
    with Checkpointer(address, run=run, transport=transport, snapshot=mode) as ckpt:
        ckpt.guard(trainer.optimizer)
        for number in range(1, reps + 2):
            floors.append(floor())
            began = time.perf_counter()
            work()
            step()
            plain.append(time.perf_counter() - began)

            began = time.perf_counter()
            handle = ckpt.save(number, trainer.state_dict())
            saved = time.perf_counter()
            work()
            computed = time.perf_counter()
            ckpt.wait_snapshot()
            waited = time.perf_counter()
            step()
            ended = time.perf_counter()
            carrying.append(ended - began)
            saves.append(saved - began)
            waits.append(waited - computed)
            handle.wait_durable(timeout=600)  # untimed: training would go on meanwhile
    return {
        "kind": kind,
        "mode": mode,
        "transport": transport,
        "floor_s": floors[1:],
        "plain_iteration_s": plain[1:],
        "checkpoint_iteration_s": carrying[1:],
        "save_s": saves[1:],
        "wait_s": waits[1:],
    }


def summary(loop: dict[str, Any]) -> dict[str, float]:
    """Medians of the per-checkpoint numbers (each pairs with its own plain iteration)."""
    blocked = [s + w for s, w in zip(loop["save_s"], loop["wait_s"], strict=True)]
    slowdown = [
        c - p
        for c, p in zip(loop["checkpoint_iteration_s"], loop["plain_iteration_s"], strict=True)
    ]
    return {
        "floor_s": statistics.median(loop["floor_s"]),
        "iteration_s": statistics.median(loop["plain_iteration_s"]),
        "save_s": statistics.median(loop["save_s"]),
        "wait_s": statistics.median(loop["wait_s"]),
        "blocked_s": statistics.median(blocked),
        "slowdown_s": statistics.median(slowdown),
    }


def calibrate_idle(trainer: Trainer, reps: int = 3) -> None:
    """Makes the idle iteration as long as a cpu forward and backward pass."""
    trainer.work_cpu()  # warm-up
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        trainer.work_cpu()
        times.append(time.perf_counter() - began)
    trainer.idle_s = statistics.median(times)
