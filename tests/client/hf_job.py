"""A tiny GPT-2 trained by the Hugging Face ``Trainer`` with ``CkptdCallback``, for the test
in-process or, as a script, as the trainer process the test SIGKILLs (``python hf_job.py
TARGET RUN OUT SIGNAL exact|lossy``): it trains until ``STOP_AT``, waits until every save
is durable, writes SIGNAL and blocks there, mid-training, until it is killed. The model is
built here, randomly initialised: nothing is downloaded."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import transformers
from ckptd.client import Checkpointer
from ckptd.client.hf import CkptdCallback

STEPS = 16  # 32 samples, batches of 4, 2 epochs
STOP_AT = 7  # after the save at step 6: resumes mid-epoch
EXACT = [("*", "exact")]


class StopUntilKilled(transformers.TrainerCallback):  # type: ignore[misc]
    """Stands still mid-training once every save so far is durable, and says so."""

    def __init__(self, checkpointer: Checkpointer, signal: Path) -> None:
        self._checkpointer = checkpointer
        self._signal = signal

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == STOP_AT:
            self._checkpointer.wait(60)
            self._signal.write_text(str(state.global_step))
            threading.Event().wait()  # until SIGKILL


def dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (32, 8), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def train(
    out: Path, callbacks: list[Any], resume: str | None = None, limit: int | None = 2
) -> torch.nn.Module:
    transformers.set_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.1
    )
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=1e-2, lr_scheduler_type="linear", save_strategy="steps", save_steps=3,
        save_total_limit=limit, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model, args, train_dataset=dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == STEPS
    return model


def main(target: str, run: str, out: str, signal: str, mode: str) -> None:
    checkpointer = Checkpointer(target, run, policies=EXACT if mode == "exact" else None)
    train(Path(out), [CkptdCallback(checkpointer), StopUntilKilled(checkpointer, Path(signal))])


if __name__ == "__main__":
    main(*sys.argv[1:6])
