"""Two daemons (subprocesses) on one S3 prefix (moto on loopback), four ranks of a world of
four, two per daemon; one daemon is SIGKILLed mid-run and its ranks continue through the
other.

What it checks (issue 15, "Done when"): a second writer on a held chain is refused with
``ChainLeasedError``; after the dead daemon's leases expire its ranks continue their chains
through the surviving daemon *as deltas* of their last durable step; the world's latest
complete step is the same on every rank and on both daemons; every durable step of every
rank restores, identically, on the survivor and on a restarted daemon; and no manifest is
ever written twice (bucket versioning on: each manifest key has one version).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from ckptd.client import ChainLeasedError, Checkpointer
from daemon_harness import POLL_INTERVAL_S, DaemonProcess, SpawnDaemon
from s3server import TEST_BUCKET, MotoS3Server, use_dummy_aws_env

RUN = "many-hosts"
WORLD = 4
LEASE_TTL_S = 4.0
# A fixed width (not the default bits=auto) so that the lossy bound asserted below holds.
DAEMON_ARGS = ("--lease-ttl-s", str(LEASE_TTL_S), "--lease-renew-interval-s", "1",
               "--catalog-refresh-s", "0", "--bits", "4")
TAKEOVER_TIMEOUT_S = 60.0


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MotoS3Server, str]]:
    with MotoS3Server() as server:
        server.create_bucket(TEST_BUCKET)
        client = server.client()
        client.put_bucket_versioning(Bucket=TEST_BUCKET,
                                     VersioningConfiguration={"Status": "Enabled"})
        client.close()
        use_dummy_aws_env(monkeypatch)  # the daemons inherit the dummy credentials
        yield server, server.url(TEST_BUCKET)


def _state(rank: int, step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    weight = torch.randn(64, 64, generator=generator)
    drift = torch.randn(64, 64, generator=generator) * 0.01
    return {"weight": weight + step * drift, "step": torch.tensor(step)}


def _checkpointer(daemon: DaemonProcess, rank: int) -> Checkpointer:
    return Checkpointer(daemon.address, RUN, rank=rank, world_size=WORLD, transport="grpc",
                        connect_timeout_s=30.0)


def _save_durable(ckpt: Checkpointer, step: int) -> None:
    ckpt.save(step, _state(ckpt.rank, step)).wait_durable(60)


def _take_over(ckpt: Checkpointer, first_step: int) -> int:
    """Saves through a daemon that does not hold the rank's chain, as a trainer would keep
    doing, until the dead holder's lease expired and a save is durable; returns its step."""
    deadline = time.monotonic() + TAKEOVER_TIMEOUT_S
    step = first_step
    while True:
        error = ckpt.save(step, _state(ckpt.rank, step)).exception(60)
        if error is None:
            return step
        assert isinstance(error, ChainLeasedError), error
        assert time.monotonic() < deadline, f"rank {ckpt.rank} not taken over: {error}"
        time.sleep(POLL_INTERVAL_S * 10)
        step += 1


def _restore_all(daemon: DaemonProcess, steps: dict[int, list[int]]) -> dict[Any, Any]:
    restored = {}
    for rank, rank_steps in steps.items():
        with _checkpointer(daemon, rank) as ckpt:
            for step in rank_steps:
                restored[rank, step] = ckpt.restore_info(step, allow_incomplete=True)
    return restored


def _manifest_versions(server: MotoS3Server, url: str) -> dict[str, int]:
    prefix = url.split(f"{TEST_BUCKET}/", 1)[1].split("?", 1)[0]
    client = server.client()
    counts: dict[str, int] = {}
    for page in client.get_paginator("list_object_versions").paginate(
            Bucket=TEST_BUCKET, Prefix=prefix):
        for version in page.get("Versions", ()):
            if version["Key"].endswith("/manifest.json"):
                counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    client.close()
    return counts


@pytest.mark.slow
def test_two_daemons_four_ranks_one_killed(
    s3: tuple[MotoS3Server, str], spawn_daemon: SpawnDaemon
) -> None:
    server, url = s3
    a = spawn_daemon(url, *DAEMON_ARGS)
    b = spawn_daemon(url, *DAEMON_ARGS)
    home = {0: a, 1: a, 2: b, 3: b}
    ranks = {rank: _checkpointer(daemon, rank) for rank, daemon in home.items()}
    for step in range(3):
        for ckpt in ranks.values():
            _save_durable(ckpt, step)

    # A holds ranks 0 and 1: a second writer through B is refused, naming the holder.
    with _checkpointer(b, 0) as intruder:
        error = intruder.save(3, _state(0, 3)).exception(60)
    assert isinstance(error, ChainLeasedError), error
    assert f"run {RUN!r} rank 0" in str(error) and "expires in" in str(error)

    # Mid-run: ranks 0 and 1 hand step 3 to A, which is killed at once (3 may or may not
    # have become durable); ranks 2 and 3 go on through B.
    for rank in (0, 1):
        ranks[rank].save(3, _state(rank, 3))
    a.kill()
    for rank in (0, 1):
        ranks[rank].close(timeout_s=0)
    for rank in (2, 3):
        _save_durable(ranks[rank], 3)

    moved = {}
    for rank in (0, 1):
        ranks[rank] = _checkpointer(b, rank)
        assert ranks[rank].latest_step() in (2, 3)  # the world's latest complete step
        own = ranks[rank].steps()[-1]  # this rank's last durable step: 2, or 3 if A made it
        moved[rank] = (own, _take_over(ranks[rank], own + 1))
    for rank in (0, 1):
        parent, first = moved[rank]
        info = next(i for i in ranks[rank].step_infos() if i.step == first)
        assert (info.kind, info.parent_step) == ("delta", parent), info
    # All four ranks, now through B, save one more step together: it is complete.
    last = max(first for _, first in moved.values()) + 1
    for ckpt in ranks.values():
        _save_durable(ckpt, last)
    assert {ckpt.latest_step() for ckpt in ranks.values()} == {last}

    durable = {rank: ckpt.steps() for rank, ckpt in ranks.items()}
    for ckpt in ranks.values():
        ckpt.close()
    assert all(rank_steps[:3] == [0, 1, 2] for rank_steps in durable.values()), durable
    a_again = spawn_daemon(url, *DAEMON_ARGS)
    with _checkpointer(a_again, 3) as late:
        assert late.latest_step() == last
        assert late.restore_info().step == last
    on_b, on_a = _restore_all(b, durable), _restore_all(a_again, durable)
    assert on_a.keys() == on_b.keys()
    for key, restored in on_b.items():
        assert restored.checksum == on_a[key].checksum, key
        original, start = _state(*key), _state(key[0], 0)
        for name, tensor in restored.state.items():
            # A delta errs by less than half the change it codes (each element keeps its
            # exponent bucket; the smallest buckets go to zero). The drift is
            # linear, so no delta's change exceeds the drift since step 0, which the takeover
            # loop (it skips step numbers until the lease expires) makes several steps long.
            drift = (original[name].float() - start[name].float()).abs().max().item()
            error = (tensor.float() - original[name].float()).abs().max().item()
            assert error <= 0.5 * drift + 1e-6, (key, name, error, drift)
    versions = _manifest_versions(server, url)
    assert len(versions) == sum(len(s) for s in durable.values())
    assert set(versions.values()) == {1}, versions
