"""Save/restore through the engine on real local storage: chains, restarts, corruption."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckptd.daemon.cli.storage_catalog import StorageCatalog
from ckptd.daemon.codec import blob_info
from ckptd.daemon.config import AUTO_BITS, EngineConfig
from ckptd.daemon.domain import Policy, RestoredCheckpoint, StepKey
from ckptd.daemon.errors import CorruptCheckpointError, StepNotFoundError
from ckptd.daemon.storage import LocalStorage
from ckptd.daemon.store.manifest import (
    MANIFEST_NAME,
    Manifest,
    blob_key,
    manifest_key,
    pending_key,
)
from ckptd.protos.records import SaveState
from daemon_harness import stored_blob_key
from engine_support import (
    RUN,
    SMALL,
    State,
    Tensor,
    adam_training,
    as_float,
    assert_same,
    checksum_of,
    open_engine,
    random_walk,
    restore_streamed,
    save,
)
from s3server import TEST_BUCKET, MotoS3Server, use_dummy_aws_env

# The step counters (0-dim) and biases under AUTO stay exact below this threshold; the
# daemon's shipped threshold of 1 leaves them to the client's rules (Adam's step: exact).
_ADAM = dataclasses.replace(SMALL, base_interval=8, min_lossy_elements=1024)


def test_adam_training_round_trip_every_step_bit_exact(tmp_path: Path) -> None:
    config = _ADAM
    states = list(adam_training(30))

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            heads: list[RestoredCheckpoint] = []
            for step, state in enumerate(states):
                await save(engine, step, state, metadata={"epoch": str(step // 10)})
                head = await engine.restore(RUN, 0, None)  # served from memory
                assert head.key.step == step and head.metadata == {"epoch": str(step // 10)}
                _check_error(head, state, heads[-1] if step % 8 else None, config)
                heads.append(head)
            kinds = [(info.step, info.kind) for info in engine.list_steps(RUN, 0)]
            for step in range(30):
                restored = await engine.restore(RUN, 0, step)  # from storage (but the last)
                assert_same(restored, heads[step])
        assert kinds == [(s, "base" if s % 8 == 0 else "delta") for s in range(30)]

    asyncio.run(scenario())


def _check_error(
    restored: RestoredCheckpoint, state: State, previous: RestoredCheckpoint | None,
    config: EngineConfig = SMALL,
) -> None:
    """A base and every exact tensor restore exactly. A lossy tensor's error is at most its
    delta against the previous reconstruction (a dropped element keeps the reference value,
    a kept one lands in its own exponent bucket), plus rounding to its dtype: the error
    stays within one step's delta instead of growing along the chain (LC-Checkpoint)."""
    for index, (array, spec) in enumerate(zip(restored.arrays, restored.tensors, strict=True)):
        saved = state[spec.name]
        assert array.dtype == saved.array.dtype and array.shape == saved.array.shape
        lossy = spec.numel >= config.min_lossy_elements and spec.dtype_info.is_float
        if previous is None or not lossy:
            assert array.tobytes() == saved.array.tobytes(), spec.name
            continue
        truth = as_float(saved, spec.dtype)
        error = np.abs(as_float(array, spec.dtype) - truth).max()
        delta = np.abs(truth - as_float(previous.arrays[index], spec.dtype)).max()
        rounding = np.abs(truth).max() * (2.0**-7 if spec.dtype == "bfloat16" else 2.0**-20)
        assert 0 < error <= delta + rounding, (spec.name, error, delta)


def test_chain_policy_starts_bases(tmp_path: Path) -> None:
    walk = random_walk(1, 9)
    states = [next(walk) for _ in range(9)]
    states[3] = {**states[3], "extra": Tensor(np.arange(5, dtype=np.int32))}  # tensor set
    states[4] = dict(states[4])
    states[5] = {**states[5], "model.bias": Tensor(np.zeros(11, np.float32))}  # shape
    states[7] = {**states[7], "model.bias": Tensor(np.zeros(11, np.float64))}  # dtype
    states[6] = {**states[6], "model.bias": Tensor(np.zeros(11, np.float32))}
    states[8] = {**states[8], "model.bias": Tensor(np.zeros(11, np.float64), policy=Policy.EXACT)}
    expected = ["base", "delta", "delta", "base", "base", "base", "delta", "base", "base"]

    async def scenario() -> list[str]:
        async with open_engine(tmp_path) as engine:
            for step, state in enumerate(states):
                await save(engine, step, state)
            for step in range(len(states)):
                restored = await engine.restore(RUN, 0, step)
                assert restored.checksum == checksum_of(restored)
            steps = engine.list_steps(RUN, 0)
        parents = [info.parent_step for info in steps]
        assert parents == [None, 0, 1, None, None, None, 5, None, None]
        return [info.kind for info in steps]

    assert asyncio.run(scenario()) == expected


def test_base_interval_and_delta_fraction(tmp_path: Path) -> None:
    async def kinds(config_changes: dict[str, Any], root: Path) -> list[str]:
        config = dataclasses.replace(SMALL, **config_changes)
        async with open_engine(root, config) as engine:
            for step, state in enumerate(random_walk(2, 7)):
                await save(engine, step, state)
            return [info.kind for info in engine.list_steps(RUN, 0)]

    by_interval = asyncio.run(kinds({"base_interval": 3}, tmp_path / "a"))
    assert by_interval == ["base", "delta", "delta"] * 2 + ["base"]
    # Any delta outweighs 0 times the base: a base follows every delta.
    by_fraction = asyncio.run(kinds({"max_delta_fraction": 0.0}, tmp_path / "b"))
    assert by_fraction == ["base", "delta"] * 3 + ["base"]


def test_restart_restores_every_step_and_continues_the_chain(tmp_path: Path) -> None:
    states = list(random_walk(3, 7))

    async def scenario() -> None:
        async with open_engine(tmp_path) as first:
            for step in range(5):
                await save(first, step, states[step])
            before = [await first.restore(RUN, 0, step) for step in range(5)]
        async with open_engine(tmp_path) as second:
            assert second.status(StepKey(RUN, 0, 4)).state is SaveState.DURABLE
            for step in range(5):
                assert_same(await second.restore(RUN, 0, step), before[step])
            # The next delta is encoded against the head rebuilt from storage.
            await save(second, 5, states[5])
            await save(second, 6, states[6])
            info = second.list_steps(RUN, 0)[-2:]
            assert [(i.kind, i.parent_step, i.chain_depth) for i in info] == [
                ("delta", 4, 5), ("delta", 5, 6)]
            in_memory = await second.restore(RUN, 0, None)
            step5 = await second.restore(RUN, 0, 5)
        async with open_engine(tmp_path) as third:
            assert_same(await third.restore(RUN, 0, 6), in_memory)
            assert_same(await third.restore(RUN, 0, 5), step5)
            _check_error(in_memory, states[6], step5)

    asyncio.run(scenario())


def test_start_removes_uncommitted_leftovers(tmp_path: Path) -> None:
    # Provably uncommitted: the old blob of a rebase beside a readable manifest, and a
    # directory without a manifest that holds the commit protocol's pending marker.
    state = next(random_walk(4, 1))
    storage = LocalStorage(tmp_path)
    orphan_dir = StepKey(RUN, 0, 7)
    committed = StepKey(RUN, 0, 3)
    unmarked = StepKey(RUN, 0, 2)  # no manifest, no marker: may have been committed

    async def first() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 3, state)

    async def second() -> tuple[list[str], list[int], RestoredCheckpoint]:
        async with open_engine(tmp_path) as engine:
            keys = engine.storage.list()
            steps = [info.step for info in engine.list_steps(RUN, 0)]
            restored = await engine.restore(RUN, 0, 3)
            await save(engine, 7, state)  # the crashed step's number is free again
            return keys, steps, restored

    asyncio.run(first())
    storage.put(pending_key(orphan_dir), b"")
    storage.put(blob_key(orphan_dir, 0), b"half a save")
    storage.put(blob_key(unmarked, 0), b"a blob whose manifest was lost")
    storage.put(blob_key(committed, 0, "r1"), b"old blob of a rebased step")
    temporary = tmp_path / "runs" / RUN / "0" / ".tmp-0123-crashed"
    temporary.write_bytes(b"partial put")
    assert blob_key(orphan_dir, 0) in storage.list()
    keys, steps, restored = asyncio.run(second())
    assert steps == [3] and restored.checksum == checksum_of(restored)
    assert blob_key(committed, 0, "r1") not in keys and blob_key(orphan_dir, 0) not in keys
    assert manifest_key(committed) in keys
    assert stored_blob_key(tmp_path, RUN, 0, 3, 0) in keys
    assert not temporary.exists()
    assert manifest_key(orphan_dir) in storage.list()
    assert pending_key(orphan_dir) not in storage.list()
    [quarantined] = storage.list("quarantine/")
    assert quarantined.startswith(f"quarantine/{RUN}/0/{2:020d}-")
    assert quarantined.endswith("/00000.blob")
    assert storage.get(quarantined) == b"a blob whose manifest was lost"


def test_corrupt_blob_is_detected(tmp_path: Path) -> None:
    states = list(random_walk(5, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            for step, state in enumerate(states):
                await save(engine, step, state)
        damaged = stored_blob_key(tmp_path, RUN, 0, 1, 0)
        path = tmp_path / damaged
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
        async with open_engine(tmp_path) as engine:
            await engine.restore(RUN, 0, 0)
            for step in (1, 2):  # step 2 is a delta on top of step 1
                with pytest.raises(CorruptCheckpointError,
                                   match=re.escape(f"step run-a/rank0/step1: blob {damaged} ")):
                    await engine.restore(RUN, 0, step)

    asyncio.run(scenario())


def test_wrong_reconstruction_checksum_is_detected(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 0, next(random_walk(6, 1)))
        path = tmp_path / manifest_key(StepKey(RUN, 0, 0))
        manifest = Manifest.from_bytes(path.read_bytes(), str(path))
        path.write_bytes(dataclasses.replace(manifest, checksum="0" * 32).to_bytes())
        async with open_engine(tmp_path) as engine:
            with pytest.raises(CorruptCheckpointError, match="reconstructs to checksum"):
                await engine.restore(RUN, 0, 0)

    asyncio.run(scenario())


def test_unknown_step_lists_nearby_steps(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            for step, state in zip((10, 20, 30), random_walk(7, 3), strict=True):
                await save(engine, step, state)
            with pytest.raises(StepNotFoundError, match=r"step run-a/rank0/step25 does not "
                               r"exist; nearby steps: \[10, 20, 30\]"):
                await engine.restore(RUN, 0, 25)

    asyncio.run(scenario())


def test_manifest_records_the_layout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_engine(tmp_path, dataclasses.replace(SMALL, min_lossy_elements=1024)
                               ) as engine:
            for step, state in enumerate(random_walk(8, 2)):
                await save(engine, step, state, metadata={"k": "v"})

    asyncio.run(scenario())
    key = manifest_key(StepKey(RUN, 0, 1))
    manifest = Manifest.from_bytes((tmp_path / key).read_bytes(), key)
    assert (manifest.kind, manifest.parent_step, manifest.base_step) == ("delta", 0, 0)
    encodings = {entry.spec.name: entry.encoding for entry in manifest.tensors}
    assert encodings["model.weight"] == "delta" and encodings["buffers.ints"] == "exact"
    assert encodings["model.bias"] == "exact"  # fewer than min_lossy_elements
    assert manifest.metadata == {"k": "v"}
    assert manifest.stored_bytes < manifest.raw_bytes


@pytest.mark.slow  # over 2 s: the full suite (--all) runs it
def test_engine_on_s3_compatible_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same chain on an object store (moto's S3 server): save, restart, delete."""
    states = list(random_walk(9, 4))
    with MotoS3Server() as server:
        server.create_bucket(TEST_BUCKET)
        use_dummy_aws_env(monkeypatch)
        url = server.url(TEST_BUCKET)

        async def scenario() -> None:
            async with open_engine(url) as engine:
                for step in range(3):
                    await save(engine, step, states[step])
                before = [await engine.restore(RUN, 0, step) for step in range(3)]
            async with open_engine(url) as engine:
                await save(engine, 3, states[3])
                assert engine.list_steps(RUN, 0)[-1].parent_step == 2
                await engine.delete_step(StepKey(RUN, 0, 1))
                for step in (0, 2):
                    assert_same(await engine.restore(RUN, 0, step), before[step])
                    # S3 has no read_into of its own: the default copies get's bytes.
                    assert_same(await restore_streamed(engine, RUN, step), before[step])
                assert [i.kind for i in engine.list_steps(RUN, 0)] == ["base", "base", "delta"]

        asyncio.run(scenario())


def test_plain_json_manifests_of_earlier_versions_stay_readable(tmp_path: Path) -> None:
    # Earlier ckptd versions wrote each manifest as plain JSON, under the same name. Their
    # steps restore, delete and anchor the next delta like compressed ones; nothing may be
    # taken for an uncommitted leftover.
    async def write() -> dict[int, str]:
        async with open_engine(tmp_path) as engine:
            for step, state in enumerate(random_walk(3, 4)):
                await save(engine, step, state)
            return {step: (await engine.restore(RUN, 0, step)).checksum for step in range(4)}

    async def reopen() -> None:
        async with open_engine(tmp_path) as engine:
            assert [info.step for info in engine.list_steps(RUN, 0)] == [0, 2, 3]
            for step in (0, 2, 3):
                restored = await engine.restore(RUN, 0, step)
                assert restored.checksum == checksum_of(restored) == checksums[step]
            await save(engine, 4, next(random_walk(4, 1)))  # a delta on step 3
            assert engine.list_steps(RUN, 0)[-1].kind == "delta"

    checksums = asyncio.run(write())
    for path in tmp_path.rglob(MANIFEST_NAME):
        path.write_bytes(Manifest.from_bytes(path.read_bytes(), str(path)).to_json())
    with StorageCatalog.open(str(tmp_path)) as catalog:
        catalog.delete_step(StepKey(RUN, 0, 1))  # rebases step 2 (a plain-JSON delta)
    asyncio.run(reopen())


def test_auto_bits_picks_a_width_per_tensor_and_save(tmp_path: Path) -> None:
    """default_bits=AUTO_BITS: every delta blob carries the width the codec chose for that
    tensor and save (a flat change fewer bits than a busy one), and restores stay exact
    copies of what the engine holds."""
    config = dataclasses.replace(SMALL, default_bits=AUTO_BITS, auto_bits_max_error=0.1,
                                 buckets_per_octave=1)  # octaves: "flat" is one bucket
    rng = np.random.default_rng(5)
    flat = rng.standard_normal(4096).astype(np.float32)
    busy = rng.standard_normal(4096).astype(np.float32)

    async def scenario() -> list[dict[str, int]]:
        widths = []
        async with open_engine(tmp_path, config) as engine:
            for step in range(4):
                state = {"flat": Tensor(flat.copy()), "busy": Tensor(busy.copy()),
                         "fixed": Tensor(busy.copy(), bits=3)}
                await save(engine, step, state)
                head = await engine.restore(RUN, 0, None)
                assert_same(await engine.restore(RUN, 0, step), head)
                if step:
                    widths.append(_blob_bits(tmp_path, step, ("flat", "busy", "fixed")))
                flat[:] += np.float32(0.01) * np.sign(rng.standard_normal(4096)).astype(
                    np.float32)  # one magnitude: two buckets
                busy[:] += (0.01 * rng.standard_t(2, 4096)).astype(np.float32)
        return widths

    widths = asyncio.run(scenario())
    assert all(w["flat"] <= 2 and w["busy"] > w["flat"] and w["fixed"] == 3 for w in widths)



@pytest.mark.parametrize("relative_to", ["delta", "state"])
def test_auto_bits_relative_to_reaches_the_codec(tmp_path: Path, relative_to: str) -> None:
    """auto_bits_relative_to="state": of two tensors changed in the same pattern, the one
    changed 100x less gets fewer bits; "delta" (the default rule) gives both the same."""
    config = dataclasses.replace(SMALL, default_bits=AUTO_BITS, auto_bits_max_error=0.01,
                                 auto_bits_relative_to=relative_to)
    rng = np.random.default_rng(7)
    reference = rng.standard_normal(4096).astype(np.float32)
    pattern = rng.standard_t(3, 4096)

    async def scenario() -> dict[str, int]:
        async with open_engine(tmp_path, config) as engine:
            await save(engine, 0, {"small": Tensor(reference.copy()),
                                   "large": Tensor(reference.copy())})
            await save(engine, 1, {
                "small": Tensor(reference + (1e-4 * pattern).astype(np.float32)),
                "large": Tensor(reference + (1e-2 * pattern).astype(np.float32))})
        return _blob_bits(tmp_path, 1, ("small", "large"))

    widths = asyncio.run(scenario())
    if relative_to == "state":
        assert widths["small"] < widths["large"]
    else:
        assert widths["small"] == widths["large"]


def _blob_bits(root: Path, step: int, names: tuple[str, ...]) -> dict[str, int]:
    storage = LocalStorage(root)
    manifest = Manifest.from_bytes(storage.get(manifest_key(StepKey(RUN, 0, step))), "test")
    return {entry.spec.name: blob_info(storage.get(entry.blob_key)).bits
            for entry in manifest.tensors if entry.spec.name in names}


def test_buckets_per_octave_reaches_the_weights_only(tmp_path: Path) -> None:
    """buckets_per_octave=4 applies to the tensors the daemon decides about (policy AUTO):
    every kept element of theirs restores within a quarter of its change; a client's lossy
    rule keeps octave buckets, some element of which is further off than that."""
    config = dataclasses.replace(SMALL, default_bits=8, buckets_per_octave=4)
    rng = np.random.default_rng(5)
    reference = rng.standard_normal(4096).astype(np.float32)
    current = (reference + rng.standard_normal(4096) * 1e-2).astype(np.float32)

    async def scenario() -> RestoredCheckpoint:
        async with open_engine(tmp_path, config) as engine:
            await save(engine, 0, {"weights": Tensor(reference.copy()),
                                   "rule": Tensor(reference.copy(), policy=Policy.LOSSY)})
            await save(engine, 1, {"weights": Tensor(current.copy()),
                                   "rule": Tensor(current.copy(), policy=Policy.LOSSY)})
            return await engine.restore(RUN, 0, 1)

    restored = asyncio.run(scenario())
    change = current.astype(np.float64) - reference
    worst = {}
    for spec, array in zip(restored.tensors, restored.arrays, strict=True):
        kept = array != reference
        off = np.abs(array[kept].astype(np.float64) - current[kept])
        worst[spec.name] = float(np.max(
            (off - np.spacing(np.abs(current[kept]))) / np.abs(change[kept])))
    assert worst["weights"] <= 0.25 < worst["rule"]
