"""Helpers of the engine tests: an engine on real local storage, saves, training states.

Plain module (no pytest): tests call ``asyncio.run`` on their own coroutines and use these
to open engines on ``tmp_path`` and stream checkpoints in through the same session API the
gRPC servicer uses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import (
    CheckpointHeader,
    Policy,
    RestoredCheckpoint,
    SaveStatus,
    StepKey,
    TensorSpec,
)
from ckptd.daemon.engine.core import Engine
from ckptd.daemon.engine.lease import LeaseClocks
from ckptd.daemon.engine.observer import EngineObserver
from ckptd.daemon.storage import LocalStorage, open_storage
from ckptd.daemon.store.manifest import tensors_checksum
from ckptd.protos.records import SaveState

RUN = "run-a"
WAIT_S = 60.0
SMALL = EngineConfig(
    max_inflight_bytes=64 << 20, base_interval=1000, max_delta_fraction=100.0, encode_workers=2
)


@dataclass(frozen=True)
class Tensor:
    """A tensor to save: holder-dtype array, table dtype name, policy and bits."""

    array: np.ndarray
    dtype: str = ""  # defaults to the array's numpy dtype name
    policy: Policy = Policy.AUTO
    bits: int = 0

    def spec(self, name: str) -> TensorSpec:
        dtype = self.dtype or self.array.dtype.name
        return TensorSpec(name, dtype, tuple(self.array.shape), self.policy, self.bits)


State = Mapping[str, Tensor]


class FakeClock:
    """Lease time that moves only when the test says: a lease idles or expires at the
    test's word, never because a loaded machine ran the renewal task late."""

    def __init__(self) -> None:
        self.wall_unix_s = time.time()
        self.monotonic_s = 0.0

    def idle(self, seconds: float) -> None:
        """Moves the monotonic time only: the chains go ``seconds`` without a write while
        every renewal (judged by the wall clock, which stays put) is on time."""
        self.monotonic_s += seconds

    @property
    def clocks(self) -> LeaseClocks:
        return LeaseClocks(wall_s=lambda: self.wall_unix_s, monotonic_s=lambda: self.monotonic_s)


@contextlib.asynccontextmanager
async def open_engine(
    root: Path | str, config: EngineConfig = SMALL, observer: EngineObserver | None = None,
    *, lease_clocks: LeaseClocks | None = None,
) -> AsyncIterator[Engine]:
    """A started engine on ``LocalStorage(root)`` (or ``open_storage(url)`` for a URL);
    drained, closed and its storage closed on exit."""
    storage = LocalStorage(root) if isinstance(root, Path) else open_storage(root)
    engine = Engine(storage, config, observer, lease_clocks=lease_clocks)
    try:
        await engine.start()
        yield engine
        await engine.drain(WAIT_S)
    finally:
        await engine.close()
        storage.close()


def header(
    step: int, state: State, *, run: str = RUN, rank: int = 0, **kw: Any
) -> CheckpointHeader:
    specs = tuple(tensor.spec(name) for name, tensor in state.items())
    return CheckpointHeader(StepKey(run, rank, step), specs, **kw)


async def send(
    engine: Engine, step: int, state: State, *, chunk_bytes: int = 4096, **kw: Any
) -> SaveStatus:
    """Streams ``state`` in as step ``step`` in chunks, like the servicer; returns ACCEPTED."""
    session = await engine.open_save(header(step, state, **kw))
    async with session:
        for index, tensor in enumerate(state.values()):
            data = np.ascontiguousarray(tensor.array).reshape(-1).view(np.uint8)
            for offset in range(0, data.size, chunk_bytes):
                session.write(index, offset, data[offset : offset + chunk_bytes].tobytes())
        return await session.commit()


async def save(engine: Engine, step: int, state: State, **kw: Any) -> SaveStatus:
    """Sends and waits until durable; fails the test with the reason otherwise."""
    accepted = await send(engine, step, state, **kw)
    assert accepted.state is SaveState.ACCEPTED
    final = await engine.wait(accepted.key, WAIT_S)
    assert final.state is SaveState.DURABLE, final
    return final


async def restore_streamed(engine: Engine, run: str, step: int | None) -> RestoredCheckpoint:
    """``engine.restoring_streamed`` collected into a ``RestoredCheckpoint`` (each array
    copied out: its memory is reused once the next is asked for)."""
    async with engine.restoring_streamed(run, 0, step) as found:
        arrays = [np.array(array) async for array in found.arrays]
        return RestoredCheckpoint(found.key, found.tensors, tuple(arrays), found.metadata,
                                  found.checksum)


def checksum_of(restored: RestoredCheckpoint) -> str:
    """Recomputes the checksum of what a restore returned (it must equal ``.checksum``)."""
    return tensors_checksum(restored.tensors, restored.arrays)


def assert_same(a: RestoredCheckpoint, b: RestoredCheckpoint) -> None:
    assert a.key == b.key
    assert a.tensors == b.tensors
    for x, y in zip(a.arrays, b.arrays, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()
    assert a.checksum == b.checksum == checksum_of(a) == checksum_of(b)


def random_walk(seed: int, steps: int, *, size: int = 4096) -> Iterator[dict[str, Tensor]]:
    """States of several dtypes drifting like training: floats get small updates, integer
    buffers change rarely, a counter goes up."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(size).astype(np.float32)
    half = rng.standard_normal((size // 64, 64)).astype(np.float16)
    wide = rng.standard_normal(size // 4)
    brain = _to_bfloat16(rng.standard_normal(size).astype(np.float32))
    small = rng.standard_normal(10).astype(np.float32)
    ints = rng.integers(0, 100, 300).astype(np.int64)
    mask = rng.random(200) > 0.5
    for step in range(steps):
        yield {
            "model.weight": Tensor(weight.copy()),
            "model.half": Tensor(half.copy()),
            "model.wide": Tensor(wide.copy()),
            "model.bf16": Tensor(brain.copy(), dtype="bfloat16"),
            "model.bias": Tensor(small.copy()),
            "buffers.ints": Tensor(ints.copy()),
            "buffers.mask": Tensor(mask.copy()),
            "optim.step": Tensor(np.array(step, dtype=np.int64)),
        }
        weight += 0.01 * rng.standard_normal(size).astype(np.float32)
        half += (0.01 * rng.standard_normal(half.shape)).astype(np.float16)
        wide += 0.01 * rng.standard_normal(wide.shape)
        noise = 0.01 * rng.standard_normal(size).astype(np.float32)
        brain = _to_bfloat16(_from_bfloat16(brain) + noise)
        small += 0.01 * rng.standard_normal(10).astype(np.float32)
        ints[rng.integers(0, ints.size)] += 1


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _from_bfloat16(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def as_float(tensor: Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Values as float64 for error checks (bfloat16 words decoded)."""
    array = tensor.array if isinstance(tensor, Tensor) else tensor
    if dtype == "bfloat16":
        return _from_bfloat16(array).astype(np.float64)
    return array.astype(np.float64)


def adam_training(steps: int, seed: int = 0) -> Iterator[dict[str, Tensor]]:
    """The state of a small MLP trained with Adam on scikit-learn's bundled digits, as the
    client would send it: parameters, Adam moments and step counters, plus a bfloat16 copy
    of the first layer (torch's raw 16-bit words)."""
    import torch
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: thread start-up costs more than it saves
    try:
        yield from _train(torch, load_digits(), steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(torch: Any, digits: Any, steps: int, seed: int) -> Iterator[dict[str, Tensor]]:
    torch.manual_seed(seed)
    inputs = torch.tensor(digits.data[:512], dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target[:512])
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
        loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = {
            f"model.{name}": Tensor(value.detach().numpy().copy())
            for name, value in model.state_dict().items()
        }
        for index, moments in optimizer.state_dict()["state"].items():
            for name, value in moments.items():
                state[f"optim.{index}.{name}"] = Tensor(value.numpy().copy())
        first = model[0]
        assert isinstance(first, torch.nn.Linear)
        words = first.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
        state["model.0.weight.bf16"] = Tensor(words.view(np.uint16).copy(), dtype="bfloat16")
        yield state
