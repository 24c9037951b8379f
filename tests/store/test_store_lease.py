"""Chain leases over the store's conditional create: take, renew, release, fencing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ckptd.daemon.errors import ChainLeasedError, StorageInUseError
from ckptd.daemon.storage import LocalStorage
from ckptd.daemon.store import lease
from ckptd.daemon.store.lease import Lease

TTL_S = 30.0
T0 = 1_000_000.0


def _take(storage: LocalStorage, holder: str, now: float, after: int | None = None) -> Lease:
    return lease.take(storage, "r", 0, holder, ttl_s=TTL_S, now_unix_s=now, after_step=after)


def test_a_live_lease_refuses_a_second_holder_naming_the_first(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = _take(storage, "daemon-a", T0, after=None)
    assert (first.generation, first.expires_unix_s) == (1, T0 + TTL_S)
    with pytest.raises(ChainLeasedError, match=r"daemon-a \(generation 1, expires in 20.0 s\)"
                       ) as info:
        _take(storage, "daemon-b", T0 + 10)
    assert isinstance(info.value, StorageInUseError)
    assert lease.read_current(storage, "r", 0) == first


def test_an_expired_or_released_lease_is_taken_over_with_the_next_generation(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path)
    first = _take(storage, "daemon-a", T0)
    second = _take(storage, "daemon-b", T0 + TTL_S, after=7)  # expired at exactly T0 + TTL
    assert (second.generation, second.holder, second.after_step) == (2, "daemon-b", 7)
    # The old holder's renewal and commit check now fail: it stops writing.
    with pytest.raises(ChainLeasedError, match=r"took over.*daemon-b"):
        lease.renew(storage, replace_expiry(first, T0 + 2 * TTL_S), ttl_s=TTL_S,
                    now_unix_s=T0 + TTL_S + 1)
    released = lease.release(storage, second, now_unix_s=T0 + TTL_S + 1)
    third = _take(storage, "daemon-a", T0 + TTL_S + 2, after=9)
    assert released.released and third.generation == 3
    assert lease.read_generations(storage, "r", 0) == [1, 2, 3]


def replace_expiry(held: Lease, expires_unix_s: float) -> Lease:
    return Lease(held.run, held.rank, held.generation, held.holder, expires_unix_s,
                 held.after_step, held.released)


def test_renewal_extends_and_an_expired_holder_cannot_renew(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    held = _take(storage, "daemon-a", T0)
    renewed = lease.renew(storage, held, ttl_s=TTL_S, now_unix_s=T0 + 10)
    assert renewed.expires_unix_s == T0 + 10 + TTL_S
    assert lease.read_current(storage, "r", 0) == renewed
    lease.check_current(storage, renewed, now_unix_s=T0 + 20)
    with pytest.raises(ChainLeasedError, match=r"expired 1\.0 s ago"):
        lease.renew(storage, renewed, ttl_s=TTL_S, now_unix_s=T0 + 10 + TTL_S + 1)


def test_an_exclusive_taker_overrides_a_crashed_holders_live_lease(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    _take(storage, "crashed", T0)
    taken = lease.take(storage, "r", 0, "restarted", ttl_s=TTL_S, now_unix_s=T0 + 1,
                       after_step=None, exclusive=True)
    assert taken.generation == 2


def test_racing_takers_have_one_winner(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for rank in range(10):
        def take(holder: str, rank: int = rank) -> Lease | str:
            try:
                return lease.take(storage, "r", rank, holder, ttl_s=TTL_S, now_unix_s=T0,
                                  after_step=None)
            except ChainLeasedError as exc:
                return str(exc)
        with ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = list(pool.map(take, ["a", "b"]))
        won = [o for o in outcomes if isinstance(o, Lease)]
        assert len(won) == 1, outcomes
        assert lease.read_current(storage, "r", rank) == won[0]


def test_void_manifests_are_those_after_a_later_generations_fence() -> None:
    leases = [Lease("r", 0, 1, "a", T0, None), Lease("r", 0, 2, "b", T0, 10),
              Lease("r", 0, 3, "c", T0, 20)]
    assert not lease.is_void(1, 10, leases)  # committed before b took over
    assert lease.is_void(1, 15, leases)  # a's commit after b fenced at 10
    assert not lease.is_void(2, 20, leases)
    assert lease.is_void(2, 21, leases)
    assert not lease.is_void(3, 99, leases)  # the current generation
    assert lease.is_void(0, 5, [Lease("r", 0, 1, "a", T0, None)])  # nothing seen at take


def test_a_malformed_record_is_named() -> None:
    with pytest.raises(ValueError, match="lease record leases/r/0/x is malformed"):
        Lease.from_bytes(b'{"format": "other"}', "leases/r/0/x")


def test_check_free_refuses_only_another_holders_live_lease(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    lease.check_free(storage, "r", 0, "daemon-b", now_unix_s=T0)  # never leased
    held = _take(storage, "daemon-a", T0)
    with pytest.raises(ChainLeasedError, match="daemon-a"):
        lease.check_free(storage, "r", 0, "daemon-b", now_unix_s=T0 + 1)
    lease.check_free(storage, "r", 0, "daemon-a", now_unix_s=T0 + 1)  # its own
    lease.check_free(storage, "r", 0, "daemon-b", now_unix_s=T0 + TTL_S)  # expired
    lease.release(storage, held, now_unix_s=T0 + 2)
    lease.check_free(storage, "r", 0, "daemon-b", now_unix_s=T0 + 3)  # released


def test_prune_keeps_superseded_records_on_shared_storage_until_their_grace_ran_out(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path)
    first = lease.release(storage, _take(storage, "daemon-a", T0), now_unix_s=T0 + 5)
    second = lease.release(storage, _take(storage, "daemon-b", T0 + 6, after=3),
                           now_unix_s=T0 + 30)
    third = _take(storage, "daemon-a", T0 + 200, after=8)
    assert lease.prune(storage, third, now_unix_s=T0 + 200, exclusive=False) == []
    # A late commit of generation 1 past step 3 stays void while generation 2 is kept.
    assert lease.is_void(1, 5, lease.read_all(storage)[("r", 0)])
    ended_first = first.expires_unix_s + lease.RECORD_GRACE_S
    assert lease.prune(storage, third, now_unix_s=ended_first, exclusive=False) == [1]
    ended_second = second.expires_unix_s + lease.RECORD_GRACE_S
    assert lease.prune(storage, third, now_unix_s=ended_second, exclusive=False) == [2]
    assert lease.read_generations(storage, "r", 0) == [3]
    assert lease.read_current(storage, "r", 0) == third


def test_prune_on_exclusive_storage_keeps_only_the_takers_record(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for now in (T0, T0 + 100, T0 + 200):
        taken = _take(storage, "daemon-a", now, after=int(now - T0))
        lease.release(storage, taken, now_unix_s=now + 1)
    current = _take(storage, "daemon-a", T0 + 300, after=300)
    assert lease.prune(storage, current, now_unix_s=T0 + 300, exclusive=True) == [1, 2, 3]
    assert lease.read_generations(storage, "r", 0) == [4]
    assert lease.remove(storage, "r", 0) == 1
    assert lease.read_generations(storage, "r", 0) == []
    assert _take(storage, "daemon-a", T0 + 400).generation == 1
