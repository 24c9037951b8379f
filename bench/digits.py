"""Real training state for benchmarks: a small CNN trained on scikit-learn's ``load_digits``.

Codec numbers measured on synthetic noise say little about checkpoints: real deltas are
heavy-tailed, sparse in places and correlated across steps, and the optimizer's moments
behave differently from the weights. This module trains a tiny convolutional net on the
8x8 digits bundled with scikit-learn (no download) and yields snapshots of the full
training state — weights plus optimizer state — every ``snapshot_every_steps`` steps, as
float32 numpy arrays by name, which is what a trainer would hand to ``Checkpointer.save``.

Runs are deterministic for a given :class:`DigitsConfig` (seeded generators, no global RNG
is touched outside ``torch.random.fork_rng``), so benches that import this module measure
the same tensors run after run.

Example::

    from bench.digits import DigitsConfig, iter_snapshots

    for snap in iter_snapshots(DigitsConfig(optimizer="adam", num_snapshots=10)):
        print(snap.step, snap.loss, sum(a.size for a in snap.tensors.values()))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

__all__ = ["DigitsConfig", "Snapshot", "build_model", "iter_snapshots", "load_data"]

Optimizer = Literal["sgd", "adam"]


@dataclass(frozen=True)
class DigitsConfig:
    """What to train and when to snapshot.

    Attributes:
        optimizer: ``"sgd"`` (SGD with momentum; state = one momentum buffer per
            parameter) or ``"adam"`` (state = ``exp_avg`` and ``exp_avg_sq``).
        lr: Learning rate; ``None`` picks a rate that trains well in a few hundred steps
            (0.05 for SGD, 1e-3 for Adam).
        momentum: SGD momentum (ignored for Adam).
        batch_size: Examples per step.
        width: Channels of the first conv layer; the second has ``2 * width``. Scales the
            parameter count (width 16 ≈ 38k parameters) for benches that want more elements.
        snapshot_every_steps: Optimizer steps between two snapshots.
        num_snapshots: How many snapshots to yield; the first is taken after
            ``snapshot_every_steps`` steps, so the optimizer state is never all zeros.
        seed: Seeds initialisation and batch order.
        torch_threads: Intra-op threads while training. One is fastest for a model this
            small (measured 0.16 s vs 0.7-6 s with two threads on a busy 2-core machine) and
            keeps runs reproducible; the caller's setting is restored at every yield.
    """

    optimizer: Optimizer = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    batch_size: int = 64
    width: int = 16
    snapshot_every_steps: int = 20
    num_snapshots: int = 10
    seed: int = 0
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r}: expected 'sgd' or 'adam'")
        for name in ("batch_size", "width", "snapshot_every_steps", "num_snapshots",
                     "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")

    @property
    def effective_lr(self) -> float:
        """The learning rate actually used (``lr`` or the optimizer's default)."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.optimizer == "adam" else 0.05


@dataclass(frozen=True)
class Snapshot:
    """The training state after ``step`` optimizer steps.

    Attributes:
        step: Optimizer steps taken so far.
        loss: Mean training loss over the steps since the previous snapshot.
        tensors: Float32 copies by name: ``"model/<param>"`` for weights and
            ``"optim/<param>/<state>"`` for optimizer state. Scalar step counters (Adam's
            ``step``) are left out: they are not float data a lossy codec should see.
    """

    step: int
    loss: float
    tensors: dict[str, np.ndarray]


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the 1797 digits as ``(N, 1, 8, 8)`` float32 images in [0, 1] and int64 labels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def build_model(width: int) -> nn.Module:
    """Two 3x3 convs, one 2x2 pool and two linear layers: small, but every layer kind a
    checkpoint usually holds (conv kernels, dense matrices, biases)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _make_optimizer(config: DigitsConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.effective_lr)
    return torch.optim.SGD(model.parameters(), lr=config.effective_lr, momentum=config.momentum)


def _state_arrays(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """Copies weights and float optimizer state out as float32 numpy arrays by name."""
    out: dict[str, np.ndarray] = {}
    names = {id(p): name for name, p in model.named_parameters()}
    for name, param in model.named_parameters():
        out[f"model/{name}"] = param.detach().numpy().astype(np.float32, copy=True)
    for owner, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                array = value.detach().numpy().astype(np.float32, copy=True)
                out[f"optim/{names[id(owner)]}/{key}"] = array
    return out


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yields index batches forever, reshuffling every epoch."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
           labels: torch.Tensor, batches: Iterator[np.ndarray], *, steps: int) -> float:
    """Runs ``steps`` optimizer steps; returns the summed training loss."""
    loss_fn = nn.CrossEntropyLoss()
    total = 0.0
    for _ in range(steps):
        index = torch.from_numpy(next(batches))
        optimizer.zero_grad(set_to_none=True)
        batch_loss = loss_fn(model(images[index]), labels[index])
        batch_loss.backward()
        optimizer.step()
        total += float(batch_loss.detach())
    return total


def iter_snapshots(config: DigitsConfig | None = None) -> Iterator[Snapshot]:
    """Trains per ``config`` and yields ``config.num_snapshots`` snapshots.

    Training happens lazily between yields, so a consumer that stops early pays only for
    what it used. Torch's global RNG is forked, so callers' random state is unchanged.
    """
    config = config or DigitsConfig()
    images, labels = load_data()
    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.width)
    optimizer = _make_optimizer(config, model)
    batches = _batches(len(labels), config.batch_size, rng)
    step = 0
    for _ in range(config.num_snapshots):
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(config.torch_threads)
        try:
            total = _train(model, optimizer, images, labels, batches,
                           steps=config.snapshot_every_steps)
        finally:
            torch.set_num_threads(caller_threads)
        step += config.snapshot_every_steps
        yield Snapshot(step, total / config.snapshot_every_steps, _state_arrays(model, optimizer))
