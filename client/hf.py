"""Hugging Face plug-in: ``CkptdCallback`` checkpoints a ``transformers.Trainer`` through ckptd.

Use::

    from ckptd.client import Checkpointer
    from ckptd.client.hf import CkptdCallback

    ckpt = Checkpointer("unix:///run/ckptd.sock", run="my-model")
    callback = CkptdCallback(ckpt)
    trainer = Trainer(model, TrainingArguments(..., save_steps=100, save_total_limit=3),
                      callbacks=[callback])
    resume = callback.materialize(tmp_dir)  # None when the run has no step yet
    trainer.train(resume_from_checkpoint=resume)

**Saving.** At each step where the Trainer would save (``control.should_save``, set by
``save_strategy``/``save_steps``), ``on_step_end`` saves the model's, optimizer's and
scheduler's ``state_dict()``, the RNG states (as the Trainer's ``rng_state.pth``) and the
``TrainerState`` (as JSON) as ckptd step ``global_step``, and clears ``should_save`` so the
Trainer writes no checkpoint directory of its own (``replace_trainer_save=False`` keeps
both). ``save_total_limit`` keeps that many of this callback's newest steps: older ones are
deleted once every save is durable (``ckptd.client.deferred``).

**Resuming.** ``Trainer.train(resume_from_checkpoint=...)`` reads a directory, and builds
the optimizer and scheduler inside ``train()``, so they cannot be filled in beforehand.
``materialize(directory)`` restores a step and writes the files the Trainer's own resume
reads (``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``) under ``directory/checkpoint-{step}``; the Trainer then restores
everything, skips the batches already seen, and goes on. Single-process training only
(rank 0's RNG state; no DeepSpeed/FSDP shards).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from .checkpointer import Checkpointer
from .deferred import DeferredDeletes

GLOBAL_STEP_KEY = "hf.global_step"


class CkptdCallback(TrainerCallback):
    """Saves the Trainer's state through ckptd where the Trainer would save it.

    Args:
        checkpointer: The run's checkpointer (its policies apply); the caller closes it.
        replace_trainer_save: Stop the Trainer from also writing its own checkpoint.

    Call order (the Trainer's): ``on_step_end`` after every optimizer step, ``on_train_end``
    once; ``materialize`` before ``train()``.
    """

    def __init__(self, checkpointer: Checkpointer, *, replace_trainer_save: bool = True) -> None:
        self.checkpointer = checkpointer
        self.replace_trainer_save = replace_trainer_save
        self._deletes = DeferredDeletes(checkpointer)
        # The run's steps, oldest first: save_total_limit counts those of earlier processes.
        self._kept: list[int] = checkpointer.steps()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not control.should_save or not state.is_world_process_zero:
            return control
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        scheduler = kwargs.get("lr_scheduler")
        snapshot = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": _rng_state(),
            "trainer_state": json.dumps(dataclasses.asdict(state), sort_keys=True),
        }
        step = state.global_step
        handle = self.checkpointer.save(step, snapshot, metadata={GLOBAL_STEP_KEY: str(step)})
        self._deletes.saved(handle)
        self._kept.append(step)
        limit = args.save_total_limit
        while limit is not None and limit > 0 and len(self._kept) > limit:
            self._deletes.delete(self._kept.pop(0), replaced_by=handle)
        self._deletes.flush(block=False)
        if self.replace_trainer_save:
            control.should_save = False
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._deletes.flush(block=True)
        return control

    def materialize(self, directory: str | Path, step: int | None = None) -> str | None:
        """Writes step ``step`` (None: the latest) as a Trainer checkpoint directory.

        Returns:
            ``directory/checkpoint-{global_step}``, for
            ``trainer.train(resume_from_checkpoint=...)``; None when the run has no step
            (and ``step`` is None), so a first run starts from scratch.

        Raises:
            CheckpointNotFoundError: ``step`` does not exist.
        """
        from safetensors.torch import save_file

        if step is None and self.checkpointer.latest_step() is None:
            return None
        state = self.checkpointer.restore(step)
        trainer_state = state["trainer_state"]
        global_step = json.loads(trainer_state)["global_step"]
        out = Path(directory) / f"checkpoint-{global_step}"
        out.mkdir(parents=True, exist_ok=True)
        weights: dict[str, torch.Tensor] = {}
        written: set[int] = set()
        for name, tensor in state["model"].items():
            # Tied weights come back as one tensor at both keys, and safetensors refuses
            # tensors that share memory: each later key gets a copy (both load as before).
            weights[name] = tensor.clone() if id(tensor) in written else tensor.contiguous()
            written.add(id(tensor))
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        if state["optimizer"] is not None:
            torch.save(state["optimizer"], out / "optimizer.pt")
        if state["scheduler"] is not None:
            torch.save(state["scheduler"], out / "scheduler.pt")
        torch.save(state["rng"], out / "rng_state.pth")
        (out / "trainer_state.json").write_text(trainer_state)
        return os.fspath(out)


def _rng_state() -> dict[str, Any]:
    """The RNG states in the layout of the Trainer's ``rng_state.pth``."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state()
    return states


__all__ = ["CkptdCallback"]
