"""CUDA tensors through the Checkpointer against a real daemon: what only a GPU shows.

The staging copy of a CUDA tensor is asynchronous (pinned host memory, ``non_blocking``),
so these tests check what a CPU run cannot: that ``save()`` captures the values the
trainer's stream had computed when it was called — not earlier, not later — on both
transports and in both snapshot modes, that staging buffers are page-locked, and that a
restore lands on the GPU with dtypes and values intact. They run wherever
``torch.cuda.is_available()``; CI machines have no GPU, so there they are skipped.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ckptd.client import Checkpointer
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EXACT = [("*", "exact")]


def _cuda_state(seed: int) -> dict[str, Any]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))
    model = model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 256, device="cuda", generator=generator)
    model(x).square().mean().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "bf16": torch.randn(1000, device="cuda", generator=generator).to(torch.bfloat16),
        "mask": torch.rand(77, device="cuda", generator=generator) > 0.5,
        "cpu": torch.arange(10),
        "step": 3,
    }


def _assert_same(restored: Any, expected: Any, device: str) -> None:
    if isinstance(expected, dict):
        assert restored.keys() == expected.keys()
        for key in expected:
            _assert_same(restored[key], expected[key], device)
    elif isinstance(expected, torch.Tensor):
        assert restored.dtype == expected.dtype and restored.shape == expected.shape
        assert restored.device.type == device
        assert torch.equal(restored.cpu(), expected.cpu())
    else:
        assert restored == expected


@pytest.mark.parametrize("transport", ["shm", "grpc"])
@pytest.mark.parametrize("snapshot", ["copy", "overlap"])
def test_cuda_state_round_trips_onto_the_gpu(
    unix_daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, transport: str,
    snapshot: str,
) -> None:
    ckpt = make_checkpointer(unix_daemon.address, f"cuda-{transport}-{snapshot}",
                             transport=transport, snapshot=snapshot, policies=EXACT)
    state = _cuda_state(0)
    ckpt.save(1, state)
    ckpt.wait(60)
    _assert_same(ckpt.restore(1, map_location="cuda"), state, "cuda")
    _assert_same(ckpt.restore(1, map_location="cpu"), state, "cpu")


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_save_captures_the_values_the_stream_computed_before_it(
    unix_daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, transport: str
) -> None:
    """Kernels queued before ``save()`` are in the checkpoint; kernels queued right after
    it are not, though both run asynchronously while the copy is in flight."""
    ckpt = make_checkpointer(unix_daemon.address, f"order-{transport}", transport=transport,
                             policies=EXACT)
    weights = torch.zeros(64 << 20, device="cuda")  # 256 MiB: the copy takes a while
    for _ in range(20):
        weights.add_(1.0)  # queued on the stream; not finished when save() is called
    ckpt.save(1, {"w": weights})
    weights.mul_(-1.0)  # must not reach the checkpoint
    ckpt.wait(120)
    restored = ckpt.restore(1, map_location="cuda")["w"]
    assert torch.equal(restored, torch.full_like(weights, 20.0))


def test_staging_buffers_are_page_locked(
    unix_daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    for transport in ("shm", "grpc"):
        ckpt: Checkpointer = make_checkpointer(unix_daemon.address, f"pinned-{transport}",
                                               transport=transport)
        ckpt.save(1, {"w": torch.ones(1 << 20, device="cuda")})
        ckpt.wait(60)
        buffer = ckpt.staging_pool.acquire(1 << 20, timeout_s=10)  # the one save() used
        assert buffer is not None and buffer.data.is_pinned(), transport
        ckpt.staging_pool.release(buffer)


def test_lossy_cuda_tensors_stay_within_the_codec_bound(
    unix_daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(unix_daemon.address, "cuda-lossy", transport="shm")
    base = torch.randn(1 << 16, device="cuda")
    ckpt.save(1, {"w": base})
    moved = base + 1e-3 * torch.randn_like(base)
    ckpt.save(2, {"w": moved})
    ckpt.wait(60)
    restored = ckpt.restore(2, map_location="cuda")["w"]
    assert restored.is_cuda and restored.dtype == torch.float32
    step = (moved - base).abs().max()
    assert (restored - moved).abs().max() <= step
