"""``CkptdCheckpointIO`` against a real daemon: Lightning fits, aborts, resumes from "last"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from client_support import CheckpointerFactory, assert_same_weights
from daemon_harness import InProcessDaemon

L = pytest.importorskip("lightning")
from ckptd.client.lightning import CkptdCheckpointIO, read_marker  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

pytestmark = [
    # Lightning's advice on this toy setup (few workers, small batches, logging interval).
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # lightning on torch 2.13
]

EPOCHS = 5  # 4 batches an epoch: 20 steps
ABORT_AT = 10


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


class Killed(Exception):
    """Stands for the job dying mid-fit (Lightning tears down and re-raises it)."""


class Abort(L.Callback):
    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == ABORT_AT:
            raise Killed


def loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=16)


def fit(
    root: Path, io: CkptdCheckpointIO | None, *, abort: bool = False, resume: bool = False
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
    if abort:
        callbacks.append(Abort())
    trainer = L.Trainer(
        default_root_dir=root, max_epochs=EPOCHS, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        plugins=[io] if io is not None else None, deterministic=True,
    )  # fmt: skip
    trainer.fit(model, loader(), ckpt_path="last" if resume else None)
    return model


@pytest.mark.parametrize("lossless", [True, False], ids=["exact", "lossy"])
def test_lightning_resumes_from_last_to_the_uninterrupted_weights(
    daemon: InProcessDaemon,
    make_checkpointer: CheckpointerFactory,
    tmp_path: Path,
    lossless: bool,
) -> None:
    policies = [("*", "exact")] if lossless else None
    reference = fit(tmp_path / "reference", None)

    root = tmp_path / "run"
    first = make_checkpointer(daemon.address, "lit", policies=policies)
    with pytest.raises(Killed):
        fit(root, CkptdCheckpointIO(first), abort=True)
    first.close()

    last = read_marker(str(root / "ckpts" / "last.ckpt"))
    assert last is not None and last["run"] == "lit"
    second = make_checkpointer(daemon.address, "lit", policies=policies)
    io = CkptdCheckpointIO(second)
    assert io.load_checkpoint(root / "ckpts" / "last.ckpt")["global_step"] == 8
    resumed = fit(root, io, resume=True)
    assert resumed.steps_run == 4 * EPOCHS - 8  # from last.ckpt at step 8, not from scratch

    assert_same_weights(resumed, reference, lossless=lossless)
    # save_top_k=2 plus last.ckpt: each marker names a live step, and nothing else is left.
    markers = {p.name: read_marker(str(p)) for p in (root / "ckpts").iterdir()}
    assert len(markers) == 3 and "last.ckpt" in markers
    assert sorted(m["step"] for m in markers.values() if m) == second.steps()
