"""Stage timers, the base-compression choice and the batched durability of a save's blobs."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckptd.daemon import codec
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import StepKey
from ckptd.daemon.engine.basecoding import MIN_OBSERVED_BYTES, BaseCoding
from ckptd.daemon.engine.observer import DurableSave, EngineObserver
from ckptd.daemon.engine.stages import SAVE_STAGES
from ckptd.daemon.errors import StorageError
from ckptd.daemon.store.manifest import Manifest, manifest_key, step_prefix
from ckptd.protos.records import SaveState
from engine_support import RUN, SMALL, WAIT_S, Tensor, open_engine, random_walk, save, send


class Durables(EngineObserver):
    def __init__(self) -> None:
        self.saves: list[DurableSave] = []

    def save_durable(self, save: DurableSave) -> None:
        self.saves.append(save)


def _blob_coders(engine: Any, step: int) -> list[str]:
    key = manifest_key(StepKey(RUN, 0, step))
    manifest = Manifest.from_bytes(engine.storage.get(key), key)
    return [codec.blob_info(engine.storage.get(t.blob_key)).coder for t in manifest.tensors]


def test_durable_saves_report_every_stage(tmp_path: Path) -> None:
    states = list(random_walk(21, 2))
    seen = Durables()

    async def scenario() -> None:
        async with open_engine(tmp_path, SMALL, seen) as engine:
            await save(engine, 1, states[0])
            await save(engine, 2, states[1])

    asyncio.run(scenario())
    base, delta = seen.saves
    assert (base.kind, delta.kind) == ("base", "delta")
    for durable in (base, delta):
        assert set(durable.stages) == set(SAVE_STAGES)
        assert min(durable.stages.values()) >= 0
        assert durable.stages["write"] > 0 and durable.stages["receive"] > 0
    assert base.stages["encode_exact"] > 0 and base.stages["encode_delta"] == 0
    assert delta.stages["encode_delta"] > 0


@pytest.mark.parametrize(("mode", "coder"), [("none", "raw"), ("zstd", "zstd")])
def test_base_compression_mode_decides_the_exact_blobs(
    tmp_path: Path, mode: str, coder: str
) -> None:
    states = list(random_walk(22, 2))
    config = dataclasses.replace(SMALL, base_compression=mode)

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            await save(engine, 1, states[0])
            assert set(_blob_coders(engine, 1)) == {coder}
            await save(engine, 2, states[1])
            restored = await engine.restore(RUN, 0, 1)
        async with open_engine(tmp_path, config) as engine:  # from storage, not the head
            again = await engine.restore(RUN, 0, 1)
            latest = await engine.restore(RUN, 0, 2)
        assert again.checksum == restored.checksum
        for array, tensor in zip(again.arrays, states[0].values(), strict=True):
            assert array.tobytes() == np.ascontiguousarray(tensor.array).tobytes()
        assert latest.key.step == 2

    asyncio.run(scenario())


def test_auto_compresses_until_measured_then_follows_the_rates() -> None:
    coding = BaseCoding("auto")
    assert coding.compress()  # nothing measured: compress, so the coder gets measured
    coding.coded(100 * MIN_OBSERVED_BYTES, 80 * MIN_OBSERVED_BYTES, 1.0)  # ratio 1.25
    assert coding.compress()  # the storage is not measured yet
    coding.written(MIN_OBSERVED_BYTES - 1, 1e-9)  # too small to say anything
    assert coding.compress()
    # Storage at 100 MiB/s against a coder at 100 MiB/s saving 20 %: raw costs 1 s per
    # 100 MiB, compressed 1 s of coding plus 0.8 s of writing.
    coding.written(100 * MIN_OBSERVED_BYTES, 1.0)
    assert not coding.compress()
    rates = coding.rates()
    assert rates["ratio"] == pytest.approx(1.25)
    # The storage slows to a tenth: compressed is now cheaper (1 + 8 s against 10 s).
    for _ in range(30):
        coding.written(10 * MIN_OBSERVED_BYTES, 1.0)
    assert coding.compress()


def test_auto_counts_the_sync_of_a_batch_as_storage_time() -> None:
    coding = BaseCoding("auto")
    coding.coded(100 * MIN_OBSERVED_BYTES, 80 * MIN_OBSERVED_BYTES, 1.0)
    coding.written(100 * MIN_OBSERVED_BYTES, 0.1)  # into the page cache: fast
    assert not coding.compress()
    coding.synced([100 * MIN_OBSERVED_BYTES], 9.0)  # but the fsync took 9 s: ~11 MiB/s in
    assert coding.compress()  # all, compressing wins


def test_auto_stays_raw_however_many_small_saves_follow() -> None:
    # A sync once counted as an observation of no bytes: each decayed the byte history,
    # so every save, even one of blobs too small to observe, dragged the storage rate down
    # until a fast disk read as slow and bases got compressed.
    coding = BaseCoding("auto")
    coding.coded(100 * MIN_OBSERVED_BYTES, 80 * MIN_OBSERVED_BYTES, 1.0)
    coding.written(100 * MIN_OBSERVED_BYTES, 0.25)
    coding.synced([100 * MIN_OBSERVED_BYTES], 0.25)  # puts + sync: 200 MiB/s
    assert coding.rates()["storage_MBps"] == pytest.approx(200 * MIN_OBSERVED_BYTES / 1e6)
    for _ in range(50):  # small delta saves: their blobs and syncs say nothing of throughput
        coding.synced([MIN_OBSERVED_BYTES // 4] * 2, 0.05)
    assert not coding.compress()
    assert coding.rates()["storage_MBps"] == pytest.approx(200 * MIN_OBSERVED_BYTES / 1e6)
    # A save of one large blob and many small ones: its large blob's share of the sync.
    coding.written(100 * MIN_OBSERVED_BYTES, 0.0)
    coding.synced([100 * MIN_OBSERVED_BYTES] + [MIN_OBSERVED_BYTES // 4] * 400, 1.0)
    nbytes = 100 * MIN_OBSERVED_BYTES * (1 + 0.8)
    assert coding.rates()["storage_MBps"] == pytest.approx(nbytes / (0.5 * 0.8 + 0.5) / 1e6)


def test_small_delta_saves_leave_the_storage_rate_alone(tmp_path: Path) -> None:
    """The pipeline's wiring: a base of large blobs measures the storage; delta saves whose
    blobs are all under the observation floor leave that measurement as it was."""
    rng = np.random.default_rng(24)
    base = [rng.standard_normal(1 << 19).astype(np.float32) for _ in range(2)]  # 2 MiB each
    config = dataclasses.replace(SMALL, base_compression="none")

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            coding = engine._pipeline.base_coding
            weights = base
            await save(engine, 1, {f"w{i}": Tensor(w) for i, w in enumerate(weights)})
            after_base = coding.rates()["storage_MBps"]
            assert after_base is not None
            for step in range(2, 6):
                weights = [w + np.float32(1e-3) for w in weights]
                await save(engine, step, {f"w{i}": Tensor(w) for i, w in enumerate(weights)})
            key = manifest_key(StepKey(RUN, 0, 5))
            manifest = Manifest.from_bytes(engine.storage.get(key), key)
            assert manifest.kind == "delta"
            assert max(t.blob_bytes for t in manifest.tensors) < MIN_OBSERVED_BYTES
            assert coding.rates()["storage_MBps"] == pytest.approx(after_base)

    asyncio.run(scenario())


def test_auto_writes_raw_when_nothing_compresses() -> None:
    coding = BaseCoding("auto")
    coding.coded(4 * MIN_OBSERVED_BYTES, 4 * MIN_OBSERVED_BYTES + 100, 1.0)
    coding.written(MIN_OBSERVED_BYTES, 100.0)  # however slow the storage
    assert not coding.compress()


def test_fixed_modes_and_bad_ones() -> None:
    assert BaseCoding("zstd").compress() and not BaseCoding("none").compress()
    with pytest.raises(ValueError, match="base_compression must be one of auto, zstd, none, "
                       "got 'lz4'"):
        BaseCoding("lz4")
    with pytest.raises(ValueError, match="base_compression must be 'auto', 'zstd' or 'none', "
                       "got 'raw'"):
        EngineConfig(base_compression="raw")


@pytest.mark.parametrize("failing", ["put_batched", "sync"])
def test_a_failed_batch_fails_the_save_and_leaves_no_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    walk = random_walk(23, 3)
    states = [next(walk) for _ in range(3)]

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 1, states[0])
            real = getattr(engine.storage, failing)

            def fail(*args: Any) -> None:
                raise StorageError(f"{failing} refused")

            monkeypatch.setattr(engine.storage, failing, fail)
            accepted = await send(engine, 2, states[1])
            final = await engine.wait(accepted.key, WAIT_S)
            assert final.state is SaveState.FAILED
            assert final.error == f"StorageError: {failing} refused"
            assert not engine.storage.list(step_prefix(StepKey(RUN, 0, 2)))
            monkeypatch.setattr(engine.storage, failing, real)
            await save(engine, 3, states[2])
            assert [i.step for i in engine.list_steps(RUN, 0)] == [1, 3]

    asyncio.run(scenario())


def test_sync_makes_every_blob_of_the_batch_durable_before_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"w": Tensor(np.arange(4096, dtype=np.float32)), "b": Tensor(np.ones(3, np.int32))}
    order: list[tuple[str, list[str]]] = []

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            storage = engine.storage
            real_batched, real_sync, real_put = storage.put_batched, storage.sync, storage.put

            def batched(key: str, data: bytes | memoryview) -> None:
                order.append(("put_batched", [key]))
                real_batched(key, data)

            def sync(keys: Any) -> None:
                order.append(("sync", sorted(keys)))
                real_sync(keys)

            def put(key: str, data: bytes | memoryview) -> None:
                order.append(("put", [key]))
                real_put(key, data)

            def put_if_absent(key: str, data: bytes | memoryview) -> bool:
                order.append(("put", [key]))  # the manifest: a conditional create
                return real_put_if_absent(key, data)

            real_put_if_absent = storage.put_if_absent
            monkeypatch.setattr(storage, "put_batched", batched)
            monkeypatch.setattr(storage, "sync", sync)
            monkeypatch.setattr(storage, "put", put)
            monkeypatch.setattr(storage, "put_if_absent", put_if_absent)
            await save(engine, 1, state)

    asyncio.run(scenario())
    kinds = [kind for kind, _ in order]
    blobs = sorted(key for kind, keys in order if kind == "put_batched" for key in keys)
    assert len(blobs) == 2 and kinds.count("sync") == 1
    sync_at = kinds.index("sync")
    assert order[sync_at][1] == blobs  # the one sync names every blob of the step
    assert max(i for i, kind in enumerate(kinds) if kind == "put_batched") < sync_at
    manifest_at = order.index(("put", [manifest_key(StepKey(RUN, 0, 1))]))
    assert sync_at < manifest_at  # durable blobs first: the commit protocol holds
