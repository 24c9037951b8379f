"""Done-when of issue 6's CLI: a trainer's step, exported by the ``ckptd`` command, loads
into the same model with plain torch / safetensors and computes bit for bit what the model
restored through ``Checkpointer.restore()`` computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from ckptd.client import Checkpointer
from cli_support import assert_same_state
from daemon_harness import SpawnDaemon
from sklearn.datasets import load_digits
from torch import nn

RUN = "digits-cnn"


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.int64)


def _train_and_checkpoint(address: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    with Checkpointer(address, RUN) as ckpt:  # the default policy: lossy deltas
        for step in range(1, 6):
            batch = torch.randint(0, len(images), (128,), generator=generator)
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ckpt.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict(),
                             "step": step})
        ckpt.wait(60)


def _ckptd(*args: str, target: str) -> subprocess.CompletedProcess[str]:
    """Runs the ``ckptd`` console script the way a user would."""
    script = Path(sys.executable).with_name("ckptd")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ckptd.daemon.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    env["CKPTD_TARGET"] = target
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def _outputs(state_dict: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    model = _model()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(images)


@pytest.mark.slow
def test_exported_step_computes_what_restore_computes(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    daemon = spawn_daemon(tmp_path / "storage")
    images, labels = _digits()
    _train_and_checkpoint(daemon.address, images, labels)

    listing = _ckptd("ls", RUN, "--json", target=daemon.address)
    assert listing.returncode == 0, listing.stderr
    kinds = {s["step"]: s["kind"] for s in json.loads(listing.stdout)["ranks"]["0"]}
    step = 4
    assert kinds[step] == "delta"  # a lossy step rebuilt through the chain

    for name in ("step.pt", "step.safetensors"):
        done = _ckptd("export", RUN, "--step", str(step), "-o", str(tmp_path / name),
                      target=daemon.address)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"exported {RUN}/rank0/step{step} ")

    with Checkpointer(daemon.address, RUN) as ckpt:
        restored = ckpt.restore(step)
    expected = _outputs(restored["model"], images)

    from_pt = torch.load(tmp_path / "step.pt", weights_only=True)
    assert_same_state(from_pt, restored)  # the whole state: model, Adam moments, step
    assert torch.equal(_outputs(from_pt["model"], images), expected)

    flat = safetensors.torch.load_file(tmp_path / "step.safetensors")
    weights = {k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")}
    assert torch.equal(_outputs(weights, images), expected)
    assert {k for k in flat if k.startswith("optim/state/")} == {
        f"optim/state/{i}/{m}" for i in range(6) for m in ("step", "exp_avg", "exp_avg_sq")}
