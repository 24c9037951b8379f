"""A small Lightning fit with ``CkptdCheckpointIO``, for the test in-process or, as a script,
as the trainer process the test SIGKILLs (``python lightning_job.py TARGET RUN ROOT SIGNAL
exact|lossy``): it fits until ``global_step`` ``STOP_AT``, waits until every checkpoint it
made is durable, writes SIGNAL and blocks there, mid-fit, until it is killed."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from ckptd.client import Checkpointer
from ckptd.client.lightning import CkptdCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS = 5  # 4 batches an epoch: 20 steps
STOP_AT = 10  # after the checkpoint of step 8 (every 4 steps)
EXACT = [("*", "exact")]


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()  # an AttributeDict in the checkpoint
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.steps_run += 1
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=6, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class StopUntilKilled(L.Callback):
    """Stands still mid-fit once every checkpoint so far is durable, and says so."""

    def __init__(self, checkpointer: Checkpointer, signal: Path) -> None:
        self._checkpointer = checkpointer
        self._signal = signal

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == STOP_AT:
            self._checkpointer.wait(60)
            self._signal.write_text(str(trainer.global_step))
            threading.Event().wait()  # until SIGKILL


def loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=16)


def fit(
    root: Path, io: CkptdCheckpointIO | None, *, stop: L.Callback | None = None,
    resume: bool = False,
) -> Regressor:
    torch.manual_seed(0)
    model = Regressor()
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=root / "ckpts",
            every_n_train_steps=4,
            save_top_k=2,
            monitor="train_loss",
            save_last=True,
        )
    ]
    if stop is not None:
        callbacks.append(stop)
    trainer = L.Trainer(
        default_root_dir=root, max_epochs=EPOCHS, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        plugins=[io] if io is not None else None, deterministic=True,
    )  # fmt: skip
    trainer.fit(model, loader(), ckpt_path="last" if resume else None)
    return model


def main(target: str, run: str, root: str, signal: str, mode: str) -> None:
    checkpointer = Checkpointer(target, run, policies=EXACT if mode == "exact" else None)
    fit(Path(root), CkptdCheckpointIO(checkpointer),
        stop=StopUntilKilled(checkpointer, Path(signal)))


if __name__ == "__main__":
    main(*sys.argv[1:6])
