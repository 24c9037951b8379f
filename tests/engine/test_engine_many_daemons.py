"""Two engines (two daemons' cores) on one S3 prefix (moto on loopback): each sees what the
other committed, one writer per chain is enforced by the store, and a rank that moves to
the other daemon continues its chain with a delta."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckptd.daemon.cli.storage_catalog import StorageCatalog
from ckptd.daemon.domain import StepKey
from ckptd.daemon.engine.core import Engine
from ckptd.daemon.errors import ChainLeasedError, RunNotFoundError
from ckptd.daemon.storage import LocalStorage, open_storage
from ckptd.daemon.storage.base import Storage
from ckptd.daemon.store import lease
from ckptd.daemon.store.manifest import Manifest, manifest_key
from ckptd.protos.records import SaveState
from engine_support import (
    RUN,
    SMALL,
    FakeClock,
    Tensor,
    assert_same,
    open_engine,
    random_walk,
    save,
    send,
)
from s3server import TEST_BUCKET, MotoS3Server, use_dummy_aws_env

# catalog_refresh_s=0: every catalog read refreshes, so no test waits for staleness.
SHARED = dataclasses.replace(SMALL, catalog_refresh_s=0.0)


async def released(engine: Engine) -> lease.Lease:
    """The chain's lease record once the renewal task has released it (it runs every
    ``lease_renew_interval_s``; the deadline only stops a hang)."""
    deadline = time.monotonic() + 60
    while not (current := lease.read_current(engine.storage, RUN, 0)).released:
        assert time.monotonic() < deadline, current
        await asyncio.sleep(0.02)
    return current


# Leases renewed often enough for the renewal task to notice an idle chain at once.
IDLE = dataclasses.replace(SMALL, lease_ttl_s=1.2, lease_renew_interval_s=0.05)


async def save_idle_save(engine: Engine, clock: FakeClock, *, seed: int,
                         ) -> tuple[lease.Lease, lease.Lease]:
    """A trainer that saves less often than ``lease_ttl_s`` (an ``IDLE`` engine on
    ``clock``): step 0, no write past the ttl until the renewal task released the lease,
    then step 1, which takes it again. Returns the lease after step 0 and the released one."""
    states = list(random_walk(seed, 2))
    await save(engine, 0, states[0])
    first = lease.read_current(engine.storage, RUN, 0)
    assert first is not None and not first.released
    clock.idle(IDLE.lease_ttl_s + 0.1)
    idle = await released(engine)
    await save(engine, 1, states[1])
    return first, idle


@pytest.fixture
def s3_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with MotoS3Server() as server:
        server.create_bucket(TEST_BUCKET)
        use_dummy_aws_env(monkeypatch)
        yield server.url(TEST_BUCKET)


@pytest.mark.slow
def test_a_second_daemon_lists_restores_and_deletes_what_the_first_committed(
    s3_url: str,
) -> None:
    states = list(random_walk(3, 3))

    async def scenario() -> None:
        async with open_engine(s3_url, SHARED) as a, open_engine(s3_url, SHARED) as b:
            assert b.list_runs() == []
            for rank in (0, 1):
                for step, state in enumerate(states):
                    await save(a, step, state, rank=rank)
            await b.refresh_catalog()
            assert [(i.run, i.rank, i.step_count) for i in b.list_runs()] == [
                (RUN, 0, 3), (RUN, 1, 3)]
            assert_same(await b.restore(RUN, 1, None), await a.restore(RUN, 1, 2))
            assert_same(await b.restore(RUN, 0, 1), await a.restore(RUN, 0, 1))
            with pytest.raises(RunNotFoundError, match="run 'nope'"):
                await b.restore("nope", 0, None)
            # A holds both chains: B may read them but not write them.
            with pytest.raises(ChainLeasedError, match=r"run 'run-a' rank 0: ckptd \(pid"):
                await b.delete_step(StepKey(RUN, 0, 0))
        async with open_engine(s3_url, SHARED) as a, open_engine(s3_url, SHARED) as b:
            # A's clean close released its leases: B deletes at once; A sees it.
            assert await b.delete_run(RUN) == 6
            await a.refresh_catalog()
            assert a.list_runs() == []
            with pytest.raises(RunNotFoundError):
                await a.restore(RUN, 0, None)

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_rank_moving_to_another_daemon_continues_its_chain_with_a_delta(
    s3_url: str,
) -> None:
    states = list(random_walk(5, 4))

    async def scenario() -> None:
        async with open_engine(s3_url, SHARED) as a, open_engine(s3_url, SHARED) as b:
            for step in (0, 1):
                await save(a, step, states[step])
            with pytest.raises(ChainLeasedError, match="generation 1, expires in"):
                await send(b, 2, states[2])
            expected = await a.restore(RUN, 0, 1)
        async with open_engine(s3_url, SHARED) as b:
            await save(b, 2, states[2])  # the lease was released: B takes generation 2
            data = b.storage.get(manifest_key(StepKey(RUN, 0, 2)))
            manifest = Manifest.from_bytes(data, "step 2")
            assert (manifest.kind, manifest.parent_step, manifest.lease_generation) == (
                "delta", 1, 2)
            assert_same(await b.restore(RUN, 0, 1), expected)
            await save(b, 3, states[3])
            assert [i.kind for i in b.list_steps(RUN, 0)] == ["base", "delta", "delta", "delta"]

    asyncio.run(scenario())


def test_a_writer_that_lost_its_lease_commits_nothing_and_a_late_commit_is_void(
    tmp_path: Path,
) -> None:
    states = list(random_walk(7, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            for step in (0, 1):
                await save(engine, step, states[step])
            # Another daemon takes the chain over (as once this one's lease had expired),
            # fencing it at step 1.
            storage = engine.storage
            lease.take(storage, RUN, 0, "daemon-b", ttl_s=30, now_unix_s=time.time() + 3600,
                       after_step=1)
            accepted = await send(engine, 2, states[2])
            failed = await engine.wait(accepted.key, 60)
            assert failed.state is SaveState.FAILED
            assert "ChainLeasedError" in failed.error and "daemon-b" in failed.error
            assert not storage.list(f"runs/{RUN}/0/{2:020d}/")
            # A commit that slipped past the check (a writer paused between its check and
            # its manifest) is void: readers skip it and the next holder deletes it.
            step1 = Manifest.from_bytes(storage.get(manifest_key(StepKey(RUN, 0, 1))), "1")
            late = dataclasses.replace(step1, key=StepKey(RUN, 0, 2), kind="delta",
                                       parent_step=1)
            assert storage.put_if_absent(manifest_key(late.key), late.to_bytes())
        async with open_engine(tmp_path) as engine:
            assert [i.step for i in engine.list_steps(RUN, 0)] == [0, 1]
            assert not storage.list(f"runs/{RUN}/0/{2:020d}/")

    asyncio.run(scenario())


LatePut = Callable[[Path | str, pytest.MonkeyPatch], None]


def _pause_after_the_lease_check(root: Path | str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lease records are pruned RECORD_GRACE_S after they end, so a manifest put issued
    later than that after its writer's lease check could land unfenced. The daemon here
    stops right after the check of step 2 (SIGSTOP, a suspended VM) for longer than
    RECHECK_AFTER_S, and meanwhile another daemon takes the chain over: the writer checks
    again before its put and refuses to commit (before: the late manifest was written).
    Meanwhile the other daemon also commits step 2 (the trainer saved it again there): the
    refused writer's cleanup must leave that manifest alone."""
    config = dataclasses.replace(SHARED, lease_ttl_s=600.0, lease_renew_interval_s=200.0)
    clock = FakeClock()
    states = list(random_walk(17, 3))
    real_check = lease.check_current
    paused: list[float] = []
    theirs = manifest_key(StepKey(RUN, 0, 2))

    def check_then_pause(storage: Storage, held: lease.Lease, *, now_unix_s: float) -> None:
        real_check(storage, held, now_unix_s=now_unix_s)
        if paused:
            return
        paused.append(now_unix_s)  # the fence of step 2: the process stops right after it
        clock.wall_unix_s += lease.RECHECK_AFTER_S + 1
        clock.monotonic_s += lease.RECHECK_AFTER_S + 1
        lease.take(storage, RUN, 0, "daemon-b", ttl_s=30, now_unix_s=clock.wall_unix_s,
                   after_step=1)
        assert storage.put_if_absent(theirs, b"daemon-b's manifest of step 2")

    async def scenario() -> None:
        async with open_engine(root, config, lease_clocks=clock.clocks) as engine:
            for step in (0, 1):
                await save(engine, step, states[step])
            monkeypatch.setattr(lease, "check_current", check_then_pause)
            accepted = await send(engine, 2, states[2])
            failed = await engine.wait(accepted.key, 60)
            assert paused and failed.state is SaveState.FAILED
            assert "ChainLeasedError" in failed.error, failed.error
            assert "after its lease check" in failed.error and "not committed" in failed.error
            # Only daemon-b's manifest is left of step 2: none of this writer's blobs, and
            # its cleanup did not delete the manifest it never put.
            assert engine.storage.list(f"runs/{RUN}/0/{2:020d}/") == [theirs]
            assert engine.storage.get(theirs) == b"daemon-b's manifest of step 2"

    asyncio.run(scenario())


def _pause_before_a_rewrites_manifest(root: Path | str, monkeypatch: pytest.MonkeyPatch,
                                      pause_s: float = lease.RECHECK_AFTER_S + 1) -> None:
    """A delete rewrites the step after it as a base (its blobs, then its manifest) under
    the chain's lease, a manifest put like a commit's. The daemon stops once the rewrite's
    blobs are durable (SIGSTOP, a suspended VM) for longer than RECHECK_AFTER_S, and
    meanwhile another daemon takes the chain over: the writer checks its lease again
    before the manifest's put and rewrites nothing (before: the manifest was overwritten
    under the other daemon's lease and the deleted step's manifest removed). ``pause_s``:
    how long it stops (a rewrite checks again however short the wait: see the caller)."""
    config = dataclasses.replace(SHARED, lease_ttl_s=600.0, lease_renew_interval_s=200.0)
    clock = FakeClock()
    states = list(random_walk(19, 3))
    paused: list[float] = []

    async def scenario() -> None:
        async with open_engine(root, config, lease_clocks=clock.clocks) as engine:
            for step in range(3):
                await save(engine, step, states[step])
            storage = engine.storage
            real_sync = storage.sync
            step1 = storage.get(manifest_key(StepKey(RUN, 0, 1)))

            def sync_then_pause(keys: list[str]) -> None:
                real_sync(keys)  # the rewrite's blobs: durable, its manifest not yet put
                paused.append(clock.wall_unix_s)
                clock.wall_unix_s += pause_s
                clock.monotonic_s += pause_s
                lease.take(storage, RUN, 0, "daemon-b", ttl_s=30,
                           now_unix_s=clock.wall_unix_s, after_step=2)

            monkeypatch.setattr(storage, "sync", sync_then_pause)
            with pytest.raises(ChainLeasedError) as info:
                await engine.delete_step(StepKey(RUN, 0, 0))
            assert paused, "the delete rewrote no step"
            assert "after its lease check" in str(info.value), info.value
            assert "manifest of step 1 " in str(info.value), info.value
            assert storage.get(manifest_key(StepKey(RUN, 0, 1))) == step1
            assert storage.size(manifest_key(StepKey(RUN, 0, 0))) > 0

    asyncio.run(scenario())


def test_a_rewrite_paused_past_its_lease_checks_again_however_short_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A late commit within the grace is void by its generation; a late rewrite is not
    harmless (it replaces a manifest, naming blobs the new holder may have removed as
    leftovers), so a rewrite checks its lease before every put, not only after
    RECHECK_AFTER_S: here the daemon stops just past its lease's ttl (600 s)."""
    _pause_before_a_rewrites_manifest(tmp_path, monkeypatch, pause_s=601.0)


# A save's commit (a manifest created) and a delete's rebase (a manifest rewritten).
LATE_PUTS = [_pause_after_the_lease_check, _pause_before_a_rewrites_manifest]


@pytest.mark.parametrize("late_put", LATE_PUTS, ids=["commit", "rewrite"])
def test_a_manifest_put_long_after_its_lease_check_checks_again_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late_put: LatePut,
) -> None:
    late_put(tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("late_put", LATE_PUTS, ids=["commit", "rewrite"])
def test_a_late_manifest_put_on_s3_checks_again_and_writes_nothing(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, late_put: LatePut,
) -> None:
    late_put(s3_url, monkeypatch)


def test_a_late_put_under_a_lease_renewed_meanwhile_commits(tmp_path: Path) -> None:
    """A manifest put queued for longer than RECHECK_AFTER_S while this daemon went on
    renewing its lease (nobody else took the chain) is checked against the lease as
    renewed, not as it was at the fence, and commits."""
    config = dataclasses.replace(SHARED, lease_ttl_s=600.0, lease_renew_interval_s=200.0)
    clock = FakeClock()
    states = list(random_walk(17, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path, config, lease_clocks=clock.clocks) as engine:
            for step in (0, 1):
                await save(engine, step, states[step])
            repository = engine._pipeline._repository
            commit = repository.commit

            async def queued_commit(manifest: Manifest, **kwargs: Any) -> Any:
                if manifest.key.step == 2:  # the put waits 2000 s; renewals every 400 s
                    for _ in range(5):
                        clock.wall_unix_s += 400
                        clock.monotonic_s += 400
                        await engine._leases.renew_all()
                return await commit(manifest, **kwargs)

            repository.commit = queued_commit  # type: ignore[method-assign]
            accepted = await send(engine, 2, states[2])
            done = await engine.wait(accepted.key, 60)
            assert done.state is SaveState.DURABLE, done.error
            assert [i.step for i in engine.list_steps(RUN, 0)] == [0, 1, 2]

    asyncio.run(scenario())


def test_an_idle_chain_releases_its_lease_and_takes_it_back_for_the_next_delta(
    tmp_path: Path,
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with open_engine(tmp_path, IDLE, lease_clocks=clock.clocks) as engine:
            first, idle = await save_idle_save(engine, clock, seed=9)
            assert idle.generation == first.generation
            again = lease.read_current(engine.storage, RUN, 0)
            assert again is not None and (again.generation, again.after_step) == (2, 0)
            assert [i.kind for i in engine.list_steps(RUN, 0)] == ["base", "delta"]

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_direct_rm_on_s3_takes_the_chain_lease(s3_url: str) -> None:
    states = list(random_walk(11, 2))

    def refused() -> None:  # `ckptd rm --storage` while a daemon writes the chain
        with StorageCatalog.open(s3_url) as catalog:
            with pytest.raises(ChainLeasedError, match=r"run 'run-a' rank 0"):
                catalog.delete_step(StepKey(RUN, 0, 0))
            assert [i.step for i in catalog.list_steps(RUN, 0)] == [0, 1]

    async def write() -> None:
        async with open_engine(s3_url, SHARED) as a:
            for step in (0, 1):
                await save(a, step, states[step])
            await asyncio.to_thread(refused)

    asyncio.run(write())
    with StorageCatalog.open(s3_url) as catalog:  # the daemon released its lease on close
        assert catalog.delete_step(StepKey(RUN, 0, 0)) == 1
        assert [i.step for i in catalog.list_steps(RUN, 0)] == [1]
        current = lease.read_current(open_storage(s3_url), RUN, 0)
        assert current is not None and current.released and current.after_step == 1


def test_lease_records_do_not_grow_with_saves_and_go_with_their_run(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with open_engine(tmp_path, IDLE, lease_clocks=clock.clocks) as engine:
            await save_idle_save(engine, clock, seed=13)  # step 1 took generation 2 ...
            assert lease.read_generations(engine.storage, RUN, 0) == [2]  # ... and pruned 1
            assert await engine.delete_run(RUN) == 2
        # The deleted run's chain, released at close, leaves no lease record behind.
        assert not LocalStorage(tmp_path).list("leases/")

    asyncio.run(scenario())


def test_lease_renewals_do_not_wait_behind_blob_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every storage thread busy writing a save's blobs (large tensors to an object store,
    # many ranks at once): a renewal queued behind them could wait past the ttl and the
    # daemon would lose the chain it is writing. Lease calls have a thread of their own.
    config = dataclasses.replace(SMALL, storage_workers=2, lease_ttl_s=30.0,
                                 lease_renew_interval_s=0.05)
    state = {f"w{i}": Tensor(np.full(1024, i, np.float32)) for i in range(4)}
    gate = threading.Event()
    writing: list[str] = []

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            storage = engine.storage
            real_batched = storage.put_batched

            def blocked(key: str, data: bytes | memoryview) -> None:
                writing.append(key)
                gate.wait()
                real_batched(key, data)

            monkeypatch.setattr(storage, "put_batched", blocked)
            saving = asyncio.create_task(save(engine, 0, state))
            try:
                deadline = time.monotonic() + 30
                while len(writing) < config.storage_workers:  # every storage thread held
                    assert time.monotonic() < deadline, writing
                    await asyncio.sleep(0.01)
                before = lease.read_current(storage, RUN, 0)
                assert before is not None
                while (now := lease.read_current(storage, RUN, 0)) is not None and (
                        now.expires_unix_s <= before.expires_unix_s):
                    assert time.monotonic() < deadline, "no renewal while the blobs were written"
                    await asyncio.sleep(0.01)
                assert now is not None and now.generation == before.generation
            finally:
                gate.set()
            status = await saving
            assert status.state == SaveState.DURABLE

    asyncio.run(scenario())


def _shared_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local directories behave as an object store for this test: shared (chains leased,
    no leftovers deleted at start) and without the one-writer lock, so a daemon and a
    direct `ckptd rm` write one directory as two hosts write one S3 prefix."""
    monkeypatch.setattr(LocalStorage, "shared", True)
    monkeypatch.setattr(LocalStorage, "claim", lambda self, holder: None)


def _direct_rm_losing_its_lease_mid_rebase(root: Path | str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`ckptd rm --storage` of step 0 rewrites step 1 as a base under the chain's lease.
    The process stops once the rewrite's blobs are durable (SIGSTOP, a suspended VM) past
    its lease's ttl; meanwhile a daemon takes the chain (deleting the rewrite's unnamed
    blobs as leftovers) and commits step 3. The deletion checks its lease again before the
    manifest's put and stops: step 0 is not deleted, step 1's manifest is the one it was,
    and every step restores, the daemon's step 3 included (before: step 1's manifest named
    the deleted blobs, and step 1 and the deltas after it, step 3 among them, were lost)."""
    config = dataclasses.replace(SHARED, lease_ttl_s=600.0, lease_renew_interval_s=200.0)
    clock = FakeClock()
    states = list(random_walk(23, 4))
    rm_ttl_s = 60.0
    committed: list[bytes] = []

    async def daemon_saves(steps: range) -> None:
        async with open_engine(root, config, lease_clocks=clock.clocks) as engine:
            for step in steps:
                await save(engine, step, states[step])
            committed.extend(engine.storage.get(manifest_key(StepKey(RUN, 0, step)))
                             for step in steps)

    asyncio.run(daemon_saves(range(3)))
    storage = LocalStorage(root) if isinstance(root, Path) else open_storage(root)
    real_sync = storage.sync
    paused: list[float] = []

    def sync_then_pause(keys: list[str]) -> None:
        real_sync(keys)  # the rewrite's blobs: durable, its manifest not yet put
        paused.append(clock.wall_unix_s)
        clock.wall_unix_s += rm_ttl_s + 1
        clock.monotonic_s += rm_ttl_s + 1
        asyncio.run(daemon_saves(range(3, 4)))  # the trainer's next save, on a daemon

    monkeypatch.setattr(storage, "sync", sync_then_pause)
    rm = StorageCatalog(storage, lease_ttl_s=rm_ttl_s, lease_clocks=clock.clocks)
    with rm, pytest.raises(ChainLeasedError) as info:
        rm.delete_step(StepKey(RUN, 0, 0))
    assert paused, "the deletion rewrote no step"
    message = str(info.value)
    assert f"step {StepKey(RUN, 0, 0)} was not deleted" in message, message
    assert "manifest of step 1 " in message and "expired" in message, message
    with StorageCatalog.open(str(root)) as catalog:
        assert [i.step for i in catalog.list_steps(RUN, 0)] == [0, 1, 2, 3]
        for step in range(4):  # each verified end to end (blob and tensor checksums)
            catalog.restore(StepKey(RUN, 0, step))
        reader = open_storage(str(root))
        assert [reader.get(manifest_key(StepKey(RUN, 0, s))) for s in range(4)] == committed


def test_a_direct_rm_that_outlives_its_lease_stops_before_its_late_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _shared_directory(monkeypatch)
    _direct_rm_losing_its_lease_mid_rebase(tmp_path, monkeypatch)


@pytest.mark.slow
def test_a_direct_rm_on_s3_that_outlives_its_lease_stops_before_its_late_rewrite(
    s3_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _direct_rm_losing_its_lease_mid_rebase(s3_url, monkeypatch)


def test_a_direct_rm_renews_its_lease_while_it_rewrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebase that takes longer than the deletion's lease ttl keeps the chain: the lease
    is renewed meanwhile, so a daemon that wants the chain once the first expiry has passed
    is still refused, and the deletion completes."""
    _shared_directory(monkeypatch)
    states = list(random_walk(29, 3))

    async def write() -> None:
        async with open_engine(tmp_path, SHARED) as engine:
            for step in range(3):
                await save(engine, step, states[step])

    asyncio.run(write())
    storage = LocalStorage(tmp_path)
    real_sync = storage.sync
    renewed: list[float] = []

    def sync_until_renewed(keys: list[str]) -> None:
        real_sync(keys)
        taken = lease.read_current(storage, RUN, 0)
        assert taken is not None and taken.holder.startswith("ckptd rm")
        deadline = time.monotonic() + 60  # only stops a hang: a renewal comes each 1 s
        while (current := lease.read_current(storage, RUN, 0)) == taken:
            assert time.monotonic() < deadline, current
            time.sleep(0.02)
        assert current is not None and current.generation == taken.generation
        renewed.append(current.expires_unix_s)
        with pytest.raises(ChainLeasedError, match=r"ckptd rm"):  # past the first expiry
            lease.check_free(storage, RUN, 0, "daemon-b", now_unix_s=taken.expires_unix_s)

    monkeypatch.setattr(storage, "sync", sync_until_renewed)
    with StorageCatalog(storage, lease_ttl_s=3.0) as catalog:
        assert catalog.delete_step(StepKey(RUN, 0, 0)) == 1
        assert renewed, "the deletion rewrote no step"
        assert [i.step for i in catalog.list_steps(RUN, 0)] == [1, 2]
        catalog.restore(StepKey(RUN, 0, 1))
    current = lease.read_current(LocalStorage(tmp_path), RUN, 0)
    assert current is not None and current.released
