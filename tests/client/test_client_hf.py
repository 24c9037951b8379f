"""``CkptdCallback`` against a real daemon: a tiny GPT-2 trains, dies, resumes, and matches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from client_support import CheckpointerFactory, assert_same_weights
from daemon_harness import InProcessDaemon

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built here
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from ckptd.client.hf import CkptdCallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

STEPS = 16  # 32 samples, batches of 4, 2 epochs
ABORT_AT = 7  # after the save at step 6: resumes mid-epoch


class Killed(Exception):
    """Stands for the job dying mid-training."""


class Abort(transformers.TrainerCallback):  # type: ignore[misc]
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == ABORT_AT:
            raise Killed


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


@pytest.mark.slow
@pytest.mark.parametrize("lossless", [True, False], ids=["exact", "lossy"])
def test_hf_trainer_resumes_from_ckptd_to_the_uninterrupted_weights(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, tmp_path: Path,
    lossless: bool,
) -> None:  # fmt: skip
    policies = [("*", "exact")] if lossless else None
    reference = train(tmp_path / "reference", [])

    first = make_checkpointer(daemon.address, "hf", policies=policies)
    with pytest.raises(Killed):
        train(tmp_path / "run", [CkptdCallback(first), Abort()])
    first.wait()  # the daemon commits what it accepted from the dead trainer: wait for step 6
    first.close()
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # the callback replaced them

    second = make_checkpointer(daemon.address, "hf", policies=policies)
    callback = CkptdCallback(second)
    resume = callback.materialize(tmp_path / "resume")
    assert resume is not None and resume.endswith("checkpoint-6")
    resumed = train(tmp_path / "run", [callback], resume=resume)

    assert_same_weights(resumed, reference, lossless=lossless)
    assert second.steps() == [15, 16]  # save_total_limit=2; the Trainer saves its last step


def test_materialize_on_an_empty_run_returns_none(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, tmp_path: Path
) -> None:
    callback = CkptdCallback(make_checkpointer(daemon.address, "hf-empty"))
    assert callback.materialize(tmp_path) is None
