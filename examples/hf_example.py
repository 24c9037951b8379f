"""Train a tiny GPT-2 with the Hugging Face ``Trainer``, checkpointing through ckptd.

Run it twice against one daemon: the second run resumes from the latest ckptd step::

    ckptd serve --storage /tmp/ckptd-store --listen unix:///tmp/ckptd.sock &
    pip install 'ckptd[client,hf]'
    python examples/hf_example.py --target unix:///tmp/ckptd.sock --dir /tmp/hf --epochs 1
    python examples/hf_example.py --target unix:///tmp/ckptd.sock --dir /tmp/hf --epochs 2

The model is built from a config with random weights and trained on random tokens:
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from ckptd.client import Checkpointer
from ckptd.client.hf import CkptdCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="daemon address: host:port or unix:///path")
    parser.add_argument("--run", default="hf-example")
    parser.add_argument("--dir", type=Path, required=True, help="the Trainer's output_dir")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (128, 16), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    training = transformers.TrainingArguments(
        output_dir=str(args.dir), num_train_epochs=args.epochs, per_device_train_batch_size=8,
        save_strategy="steps", save_steps=5, save_total_limit=3, report_to=[], use_cpu=True,
    )  # fmt: skip
    with Checkpointer(args.target, run=args.run) as ckpt, tempfile.TemporaryDirectory() as tmp:
        callback = CkptdCallback(ckpt)
        trainer = transformers.Trainer(model, training, train_dataset=dataset, callbacks=[callback])
        resume = callback.materialize(tmp)  # None on the first run: start from scratch
        trainer.train(resume_from_checkpoint=resume)
        print(f"steps in ckptd: {ckpt.steps()}")


if __name__ == "__main__":
    main()
