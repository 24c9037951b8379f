"""Fit a small Lightning model, checkpointing through ckptd with ``CkptdCheckpointIO``.

Run it twice against one daemon: the second run resumes from ``last.ckpt``::

    ckptd serve --storage /tmp/ckptd-store --listen unix:///tmp/ckptd.sock &
    pip install 'ckptd[client,lightning]'
    python examples/lightning_example.py --target unix:///tmp/ckptd.sock --dir /tmp/lit --epochs 3
    python examples/lightning_example.py --target unix:///tmp/ckptd.sock --dir /tmp/lit --epochs 6

``--dir/checkpoints`` holds Lightning's files as small markers; the tensors live in ckptd
(``ckptd ls --target unix:///tmp/ckptd.sock lightning-example``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
from ckptd.client import Checkpointer
from ckptd.client.lightning import CkptdCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="daemon address: host:port or unix:///path")
    parser.add_argument("--run", default="lightning-example")
    parser.add_argument("--dir", type=Path, required=True, help="Lightning's root directory")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(256, 8)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=32)
    with Checkpointer(args.target, run=args.run) as ckpt:
        trainer = L.Trainer(
            default_root_dir=args.dir, max_epochs=args.epochs, accelerator="cpu", logger=False,
            plugins=[CkptdCheckpointIO(ckpt)],
            callbacks=[ModelCheckpoint(dirpath=args.dir / "checkpoints", every_n_train_steps=8,
                                       save_top_k=2, monitor="train_loss", save_last=True)],
        )  # fmt: skip
        trainer.fit(Regressor(), data, ckpt_path="last")  # resumes when last.ckpt exists
        print(f"steps in ckptd: {ckpt.steps()}")


if __name__ == "__main__":
    main()
