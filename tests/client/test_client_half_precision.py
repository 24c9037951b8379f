"""bf16 and fp16 weights and optimizer state go through the lossy codec, end to end.

A trainer in mixed precision may hold bfloat16/float16 tensors; the daemon's AUTO policy
stores those of at least ``min_lossy_elements`` as lossy deltas (bfloat16 as raw words,
float16 natively), and the client's built-in rule codes a half-precision ``exp_avg_sq`` in
the log domain. A restore returns the dtype that was saved.
"""

from __future__ import annotations

import pytest
import torch
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon


def _state(weight: torch.Tensor, second: torch.Tensor) -> dict[str, object]:
    return {"model": {"w": weight.clone()},
            "optim": {"state": {0: {"exp_avg_sq": second.clone()}}, "param_groups": []}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_are_stored_lossy_and_restore_their_dtype(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator).to(dtype)
    second = (torch.randn(64, 256, generator=generator) ** 2 * 1e-4).to(dtype)
    second[0, :16] = 0  # zeros stay zero
    ckpt = make_checkpointer(daemon.address, f"half-{dtype}", bits=4)
    saved = []
    for step in range(3):
        saved.append(_state(weight, second))
        handle = ckpt.save(step, saved[-1])
        handle.wait_durable(timeout=60)
        assert handle.exception() is None
        weight += (0.01 * torch.randn(weight.shape, generator=generator)).to(dtype)
        second = (second.float() * 0.9 + 1e-5 * torch.rand(second.shape, generator=generator)
                  ).to(dtype)
        second[0, :16] = 0  # a row that never gets a gradient
    infos = ckpt.step_infos()
    assert [i.kind for i in infos] == ["base", "delta", "delta"]
    assert all(i.stored_bytes < i.raw_bytes / 3 for i in infos[1:])  # lossy, not exact
    for step, want in enumerate(saved):
        got = ckpt.restore(step)
        w, v = got["model"]["w"], got["optim"]["state"][0]["exp_avg_sq"]
        assert w.dtype == v.dtype == dtype
        zeros = want["optim"]["state"][0]["exp_avg_sq"] == 0  # type: ignore[index]
        assert bool((v >= 0).all()) and bool((v[zeros] == 0).all())
        for back, true in ((w, want["model"]["w"]),  # type: ignore[index]
                           (v, want["optim"]["state"][0]["exp_avg_sq"])):  # type: ignore[index]
            error = float((back.float() - true.float()).norm() / true.float().norm())
            assert error < (0.05 if step else 0.0) + 1e-12, (step, error)
