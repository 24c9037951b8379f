"""Training workloads for the recovery benchmark, all on offline data.

The LC-Checkpoint paper measures lossy checkpoints by what they cost a run that restores
from them, so the workloads here are real (small) training runs rather than tensors:

* ``logreg`` - multinomial logistic regression on scikit-learn's bundled digits, SGD with
  momentum (the paper's optimizer).
* ``lenet`` - a LeNet-5-style CNN (conv-pool-conv-pool-fc-fc-fc) on the same digits, SGD
  with momentum.
* ``lm`` - a 2-layer, d=64, context-64 byte-level transformer language model trained with
  AdamW on a few source files of the Python standard library (``sysconfig``'s ``stdlib``):
  Adam's two moment tensors are the optimizer state a lossy codec is most likely to hurt.
* ``gpt`` - a GPT-style byte-level decoder of 22.4M parameters (7 layers, d=512, 8 heads,
  context 32), AdamW with linear warmup and weight decay, on every top-level ``*.py`` file
  of the standard library (the first 4 MiB, sorted by name); ``gpt-bf16`` is the same run
  with bfloat16 autocast (fp32 master weights and optimizer state, bf16 matmuls). Sized
  for 2 shared CPU cores: a short context and a small batch (``bench/README.md``).

Every run is a pure function of ``(workload, seed, step)``: initialisation is seeded inside
``torch.random.fork_rng`` and the batch of step ``t`` depends only on ``(seed, t)``. That is
the "data-loader position = step" rule the protocol needs: a run restored at step ``s``
sees exactly the batches the original run saw after ``s``. Evaluation is on a fixed
held-out set that does not depend on the seed. Callers should pin
``torch.set_num_threads`` so that replays are bit-identical.
"""

from __future__ import annotations

import copy
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

__all__ = ["WORKLOADS", "Evaluation", "Trainer", "Workload", "make_workload"]

# Held-out examples of the digits split; the split is fixed (not seeded) so every run of
# every seed is evaluated on the same images.
_DIGITS_HELD_OUT = 360
_LM_FILES = ("textwrap.py", "string.py", "glob.py", "fnmatch.py", "shlex.py", "heapq.py")
_LM_CONTEXT = 64
_LM_HELD_OUT_FRACTION = 0.1
_LM_EVAL_SEQUENCES = 32
# The decoder: 7 x 12 d^2 + embeddings = 22.4M parameters (the issue asks >= 20M).
_GPT_WIDTH, _GPT_LAYERS, _GPT_HEADS, _GPT_CONTEXT = 512, 7, 8, 32
_GPT_TEXT_BYTES = 4 << 20
_GPT_BATCH = 4
# Held-out windows evaluated after every step (as many tokens as 4 training steps).
_GPT_EVAL_SEQUENCES = 16
_GPT_LR, _GPT_WARMUP_STEPS, _GPT_WEIGHT_DECAY = 1e-3, 40, 0.1


@dataclass(frozen=True)
class Evaluation:
    """Held-out loss (mean cross-entropy, nats) and accuracy (top-1, next byte for ``lm``)."""

    loss: float
    accuracy: float


@dataclass(frozen=True)
class _Data:
    """Tensors of one workload: training inputs/targets and the fixed held-out set."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


class Trainer:
    """One training run: model, optimizer and the deterministic batch schedule.

    ``step`` counts optimizer steps taken; ``train_step`` takes step ``step + 1`` with the
    batch that belongs to it, so a trainer loaded with a checkpoint of step ``s`` continues
    exactly where the original run was at ``s``.
    """

    def __init__(
        self,
        workload: Workload,
        seed: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.workload = workload
        self.seed = seed
        self.model = model
        self.optimizer = optimizer
        self.step = 0

    def train_step(self) -> float:
        """Takes one optimizer step on batch ``step + 1``; returns its training loss."""
        x, y = self.workload.batch(self.seed, self.step + 1)
        if self.workload.lr_at is not None:
            # A pure function of the step (no scheduler state to checkpoint).
            for group in self.optimizer.param_groups:
                group["lr"] = self.workload.lr_at(self.step + 1)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.workload.loss(self.model, x, y)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> Evaluation:
        """Loss and accuracy on the fixed held-out set (no noise from batch sampling)."""
        self.model.eval()
        data = self.workload.data
        with _autocast(self.workload.bf16_autocast):
            logits = self.model(data.test_x).float()
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_y = data.test_y.reshape(-1)
        loss = F.cross_entropy(flat_logits, flat_y)
        accuracy = (flat_logits.argmax(dim=1) == flat_y).float().mean()
        return Evaluation(float(loss), float(accuracy))

    def state(self) -> dict[str, Any]:
        """A deep copy of what a checkpoint holds: ``{"model": ..., "optim": ...}`` state dicts."""
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optim": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load(self, state: dict[str, Any], step: int) -> None:
        """Loads a checkpoint taken after ``step`` steps; the next batch is ``step + 1``."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.step = step


@dataclass(frozen=True)
class Workload:
    """A model family, its data and optimizer; ``trainer(seed)`` starts a fresh run."""

    name: str
    description: str
    data: _Data
    batch_size: int
    build_model: Callable[[], nn.Module]
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    # Index tensor -> (inputs, targets); classification picks rows, the LM cuts windows.
    take: Callable[[_Data, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
    # Rows a batch is drawn from. Small sets are reshuffled per epoch (each example once per
    # epoch, like a DataLoader); the LM's ~10^5 windows are drawn per step instead.
    epoch_size: int
    per_epoch_shuffle: bool = True
    # Learning rate of (1-based) step t, set before each step; None: the optimizer's own.
    lr_at: Callable[[int], float] | None = None
    # Forward passes under torch.autocast("cpu", bfloat16).
    bf16_autocast: bool = False

    def trainer(self, seed: int) -> Trainer:
        """A fresh run: parameters initialised from ``seed``, optimizer state empty."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build_model()
        return Trainer(self, seed, model, self.build_optimizer(model))

    def batch(self, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of (1-based) ``step``: a pure function of ``(seed, step)``."""
        if not self.per_epoch_shuffle:
            rng = np.random.default_rng((seed, step))
            return self.take(self.data, rng.integers(0, self.epoch_size, self.batch_size))
        per_epoch = self.epoch_size // self.batch_size
        epoch, index = divmod(step - 1, per_epoch)
        order = np.random.default_rng((seed, epoch)).permutation(self.epoch_size)
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.take(self.data, rows)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _autocast(self.bf16_autocast):
            logits = model(x).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.build_model().parameters())


def _digits_data(flatten: bool, standardize: bool) -> _Data:
    """Digits scaled to [0, 1]; ``standardize`` shifts and scales them by the training set's
    mean and standard deviation (the CNN otherwise sits ~150 steps on its initial plateau)."""
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(12345).permutation(len(y)))
    test, train = order[:_DIGITS_HELD_OUT], order[_DIGITS_HELD_OUT:]
    if standardize:
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
    return _Data(x[train], y[train], x[test], y[test])


def _take_rows(data: _Data, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.from_numpy(rows)
    return data.train_x[index], data.train_y[index]


def _sgd(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _lenet() -> nn.Module:
    """LeNet-5's shape scaled to 8x8 inputs: 5x5 convs (padded), 2x2 pools, 120-84-10."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP, no dropout
    (dropout would draw from the global RNG and break bit-exact replays)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Byte-level GPT: 256-symbol vocabulary, learned positions, untied output head."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4,
                 context: int = _LM_CONTEXT) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _stdlib_text() -> bytes:
    """A few pure-Python stdlib modules, concatenated: offline, and the same on every run
    of one interpreter version (the files differ a little between Python versions)."""
    root = sysconfig.get_paths()["stdlib"]
    return b"\n".join(Path(root, name).read_bytes() for name in _LM_FILES)


def _stdlib_corpus(limit_bytes: int) -> bytes:
    """Every top-level ``*.py`` of the standard library, sorted by name, cut at
    ``limit_bytes``: a larger corpus for the decoder (never downloaded)."""
    root = sysconfig.get_paths()["stdlib"]
    out = bytearray()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and len(out) < limit_bytes:
            with open(os.path.join(root, name), "rb") as f:
                out += f.read() + b"\n"
    return bytes(out[:limit_bytes])


def _lm_data(text: bytes | None = None, context: int = _LM_CONTEXT,
             eval_sequences: int = _LM_EVAL_SEQUENCES) -> _Data:
    text = _stdlib_text() if text is None else text
    tokens = torch.from_numpy(np.frombuffer(text, dtype=np.uint8).astype(np.int64))
    split = int(len(tokens) * (1 - _LM_HELD_OUT_FRACTION))
    train, test = tokens[:split], tokens[split:]
    # Fixed, evenly spaced held-out windows: evaluation sees the same bytes every time.
    starts = np.linspace(0, len(test) - context - 1, eval_sequences).astype(np.int64)
    test_x = torch.stack([test[s : s + context] for s in starts])
    test_y = torch.stack([test[s + 1 : s + context + 1] for s in starts])
    # Training windows start at every offset; train_x holds the stream, train_y is unused.
    return _Data(train, train, test_x, test_y)


def _windows(context: int) -> Callable[[_Data, np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    def take(data: _Data, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.from_numpy(rows).unsqueeze(1) + torch.arange(context + 1)
        windows = data.train_x[starts]
        return windows[:, :-1], windows[:, 1:]
    return take


def _autocast(enabled: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _gpt_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (embeddings included) and none on biases and
    LayerNorm, the usual GPT recipe: two parameter groups in the optimizer state."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": _GPT_WEIGHT_DECAY},
                              {"params": other, "weight_decay": 0.0}],
                             lr=_GPT_LR, betas=(0.9, 0.95))


def _gpt_lr(step: int) -> float:
    """Linear warmup over the first steps, then constant (the runs are short)."""
    return _GPT_LR * min(1.0, step / _GPT_WARMUP_STEPS)


def _gpt(bf16: bool) -> Workload:
    data = _lm_data(_stdlib_corpus(_GPT_TEXT_BYTES), _GPT_CONTEXT, _GPT_EVAL_SEQUENCES)
    return Workload(
        "gpt-bf16" if bf16 else "gpt",
        f"{_GPT_LAYERS}-layer d={_GPT_WIDTH} byte GPT, stdlib text, AdamW+warmup"
        + (", bf16 autocast" if bf16 else ""),
        data, _GPT_BATCH,
        lambda: TinyLM(_GPT_WIDTH, _GPT_LAYERS, _GPT_HEADS, _GPT_CONTEXT),
        _gpt_optimizer, _windows(_GPT_CONTEXT), len(data.train_x) - _GPT_CONTEXT - 1, False,
        lr_at=_gpt_lr, bf16_autocast=bf16,
    )


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01)


def make_workload(name: str) -> Workload:
    """Builds one workload by name (loading its data); see ``WORKLOADS``."""
    if name == "logreg":
        data = _digits_data(flatten=True, standardize=False)
        return Workload(
            "logreg", "logistic regression, digits, SGD+momentum", data, 32,
            lambda: nn.Linear(64, 10), _sgd(0.05), _take_rows, len(data.train_y),
        )
    if name == "lenet":
        data = _digits_data(flatten=False, standardize=True)
        return Workload(
            "lenet", "LeNet-5-style CNN, digits, SGD+momentum", data, 32,
            _lenet, _sgd(0.02), _take_rows, len(data.train_y),
        )
    if name == "lm":
        data = _lm_data()
        return Workload(
            "lm", "2-layer d=64 byte transformer, stdlib text, AdamW", data, 16,
            TinyLM, _adamw, _windows(_LM_CONTEXT), len(data.train_x) - _LM_CONTEXT - 1, False,
        )
    if name in ("gpt", "gpt-bf16"):
        return _gpt(bf16=name == "gpt-bf16")
    raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")


WORKLOADS = ("logreg", "lenet", "lm", "gpt", "gpt-bf16")
