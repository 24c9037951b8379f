"""Chain leases: one writer per (run, rank) chain, enforced by the store's conditional create.

Many daemons may share one storage (one per host on an object store, README "Many hosts");
nothing but the store decides between them. Layout::

    leases/{run}/{rank}/{generation:020d}.json   one record per generation of the lease

A record is UTF-8 JSON: ``format`` "ckptd.lease", ``version`` 1, ``run``, ``rank``,
``generation``, ``holder`` (which daemon: host, pid, a per-process id), ``expires_unix_s``,
``after_step`` (the fencing point, below) and ``released``.

The rules, all over ``Storage.put_if_absent`` (so they hold on S3 and on a local disk alike):

* The chain's *current* lease is its highest generation.
* **Take**: a daemon that finds no current lease, or one released or expired by its own
  clock, creates generation ``g + 1`` with ``put_if_absent``; of two racing takers exactly
  one succeeds, the other gets ``ChainLeasedError`` naming the winner. A live lease of
  another holder is refused the same way, naming the holder and its expiry.
* **Renew / release**: only the holder of generation ``g`` writes ``g``'s record (a later
  expiry, or ``released``), and only after listing the chain's leases shows ``g`` is still
  the highest. A taker only creates ``g + 1`` once ``g`` expired, so a holder that renews in
  time (``lease_renew_interval_s`` is at most a third of ``lease_ttl_s``) is never raced;
  one that finds a newer generation has lost the chain and stops writing it.
* **Fencing**: every manifest records the generation it was committed under
  (``Manifest.lease_generation``), and each taker records in its new generation the latest
  step it found committed, ``after_step``. A manifest of generation ``g`` at step ``s`` is
  *void* when some later generation has ``after_step < s``: it was committed by a writer
  that had already lost the chain (paused or partitioned past its expiry), after the new
  holder had decided where the chain continues. Readers skip void manifests (``scan``);
  the chain's next holder deletes them. The taker lists the chain's manifests once it has
  seen the previous lease released or expired (``check_free``) and *before* it creates its
  generation: every commit made under the previous lease is in that listing, and a commit
  it did not see is always after ``after_step``.

* **Pruning**: a take makes a record, and a chain idle for ``lease_ttl_s`` is released, so
  a trainer saving less often than that takes a generation per save; records are pruned so
  that they do not grow with the saves (and every scan, which reads them all, with them).
  Once a taker has deleted the void manifests its scan found, it deletes the records below
  its own (``prune``): every one of them where the storage is the caller's alone
  (``exclusive``: no other writer can commit late), else those that ended more than
  ``RECORD_GRACE_S`` ago. A chain with no step left (its run deleted) loses its last record
  at release on exclusive storage (``remove``); on shared storage that record stays, so
  that its generation count, and the fence of a writer still in flight, go on.

* **Late commits**: pruning relies on every manifest put being issued within
  ``RECORD_GRACE_S`` of its writer's lease check, since a late put is fenced only by the
  records still kept. A writer can in fact be late: its process paused (SIGSTOP, a
  suspended VM, swapping) between the check and the put, or the put queued behind other
  storage calls. So the writer makes it a guarantee (``recheck_if_late``, called in the
  storage thread just before the manifest's ``put_if_absent``): when more than
  ``RECHECK_AFTER_S`` (half the grace) passed since the check, by its wall or its
  monotonic clock, it checks the lease again and, lost or expired, refuses to write: the
  save fails as not committed (it was never reported durable) and the trainer saves it
  again. A rewrite (a delete or retention rewriting a committed step as a base, a ``put``
  that replaces a manifest, which no generation voids) checks before every put
  (``late_after_s`` 0 in a daemon, one renewal interval in ``ckptd rm --storage``). What
  is left is the put itself, bounded by the storage client's timeouts and retries
  (minutes) against the other half of the grace.

Assumptions, stated in the README: wall clocks of the daemons agree well within
``lease_ttl_s`` (expiry is wall time, compared by each reader), the store's listing is
strongly consistent (S3 is since 2020; a local directory is), and a manifest put, once
issued, lands within ``RECORD_GRACE_S - RECHECK_AFTER_S`` (half an hour).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from ckptd.daemon.errors import ChainLeasedError, CorruptCheckpointError
from ckptd.daemon.storage.base import KeyNotFoundError, Storage

FORMAT_NAME = "ckptd.lease"
FORMAT_VERSION = 1
LEASES_PREFIX = "leases/"
# How long after a superseded lease ended its record still fences late commits on shared
# storage; far beyond any storage call's retries, so only a paused process outlives it.
RECORD_GRACE_S = 3600.0
# A manifest put issued longer than this after its lease check checks the lease again first
# (``recheck_if_late``): half the grace, so the put has the other half to land in.
RECHECK_AFTER_S = RECORD_GRACE_S / 2
_KEY_RE = re.compile(r"leases/(?P<run>[A-Za-z0-9._-]+)/(?P<rank>[0-9]+)/(?P<gen>[0-9]{20})\.json")


@dataclass(frozen=True)
class Lease:
    """One generation of a chain's writer lease, as stored."""

    run: str
    rank: int
    generation: int
    holder: str
    expires_unix_s: float
    after_step: int | None
    released: bool = False

    def live(self, now_unix_s: float) -> bool:
        """Whether the lease still excludes other writers at wall time ``now_unix_s``."""
        return not self.released and now_unix_s < self.expires_unix_s

    def to_bytes(self) -> bytes:
        obj = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Lease:
        try:
            obj = json.loads(data)
            if obj.get("format") != FORMAT_NAME or obj.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {obj.get('format')!r} version {obj.get('version')!r}")
            after = obj["after_step"]
            return cls(
                run=str(obj["run"]), rank=int(obj["rank"]), generation=int(obj["generation"]),
                holder=str(obj["holder"]), expires_unix_s=float(obj["expires_unix_s"]),
                after_step=None if after is None else int(after),
                released=bool(obj["released"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptCheckpointError(f"lease record {where} is malformed: {exc!r}") from exc


def chain_prefix(run: str, rank: int) -> str:
    return f"{LEASES_PREFIX}{run}/{rank}/"


def lease_key(run: str, rank: int, generation: int) -> str:
    return f"{chain_prefix(run, rank)}{generation:020d}.json"


def parse_lease_key(key: str) -> tuple[str, int, int] | None:
    """(run, rank, generation) of a lease key; None for any other key."""
    match = _KEY_RE.fullmatch(key)
    return None if match is None else (match["run"], int(match["rank"]), int(match["gen"]))


def new_holder(label: str, pid: int, instance: str) -> str:
    """The holder text of one daemon process: readable in errors, unique per process."""
    return f"{label} (pid {pid} on {socket.gethostname()}, id {instance})"


def describe(lease: Lease, now_unix_s: float) -> str:
    """The lease as an error message shows it: holder, generation and expiry."""
    left = lease.expires_unix_s - now_unix_s
    when = f"expires in {left:.1f} s" if left > 0 else f"expired {-left:.1f} s ago"
    return f"{lease.holder} (generation {lease.generation}, {when})"


def read_generations(storage: Storage, run: str, rank: int) -> list[int]:
    """The chain's lease generations in storage, ascending."""
    keys = storage.list(chain_prefix(run, rank))
    return sorted(parsed[2] for key in keys if (parsed := parse_lease_key(key)) is not None)


def read_current(storage: Storage, run: str, rank: int) -> Lease | None:
    """The chain's current (highest-generation) lease, or None when it never had one."""
    for generation in reversed(read_generations(storage, run, rank)):
        key = lease_key(run, rank, generation)
        try:
            return Lease.from_bytes(storage.get(key), key)
        except KeyNotFoundError:
            continue  # pruned between the listing and the read: take the one below
    return None


def read_all(storage: Storage, prefix: str = LEASES_PREFIX) -> dict[tuple[str, int], list[Lease]]:
    """Every lease record under ``prefix``, per chain, in generation order (for fencing)."""
    chains: dict[tuple[str, int], list[Lease]] = {}
    for key in storage.list(prefix):
        parsed = parse_lease_key(key)
        if parsed is None:
            continue
        try:
            lease = Lease.from_bytes(storage.get(key), key)
        except KeyNotFoundError:
            continue
        chains.setdefault((parsed[0], parsed[1]), []).append(lease)
    for leases in chains.values():
        leases.sort(key=lambda lease: lease.generation)
    return chains


def is_void(generation: int, step: int, leases: Sequence[Lease]) -> bool:
    """Whether a manifest of ``generation`` at ``step`` was committed after a later
    generation's taker fenced the chain at ``after_step`` (see the module docstring); a
    taker that found no step (``after_step`` None) voids every earlier generation's."""
    return any(
        lease.generation > generation and (lease.after_step is None or step > lease.after_step)
        for lease in leases
    )


def check_free(
    storage: Storage, run: str, rank: int, holder: str, *, now_unix_s: float,
    exclusive: bool = False,
) -> Lease | None:
    """Raises ``ChainLeasedError`` while another holder's lease of the chain is live;
    returns the chain's current lease record as read (None: never leased).

    A taker calls it *before* listing the chain for its fencing point: the previous holder
    commits nothing after its release (or, by the clock assumption, after its expiry), so
    a listing made once the lease is seen free contains every commit made under it."""
    current = read_current(storage, run, rank)
    if (current is not None and current.holder != holder and current.live(now_unix_s)
            and not exclusive):
        raise _leased(current, now_unix_s)
    return current


def take(
    storage: Storage, run: str, rank: int, holder: str, *, ttl_s: float, now_unix_s: float,
    after_step: int | None, exclusive: bool = False,
) -> Lease:
    """Takes the next generation of the chain's lease for ``holder``.

    ``after_step`` is the latest valid step the caller found in storage after
    ``check_free`` passed (the fencing point). Raises ``ChainLeasedError`` when another
    holder's lease is live, or another taker won the race for the generation.
    ``exclusive``: the caller holds the whole storage (``Storage.claim`` locked it), so a
    live lease is a crashed holder's and is taken over at once.
    """
    current = check_free(storage, run, rank, holder, now_unix_s=now_unix_s, exclusive=exclusive)
    generation = current.generation + 1 if current is not None else 1
    lease = Lease(run, rank, generation, holder, now_unix_s + ttl_s, after_step)
    if storage.put_if_absent(lease_key(run, rank, generation), lease.to_bytes()):
        return lease
    winner = read_current(storage, run, rank)
    if winner == lease:  # a retried request whose first attempt created it
        return lease
    raise _leased(winner or current or lease, now_unix_s)


def renew(storage: Storage, lease: Lease, *, ttl_s: float, now_unix_s: float) -> Lease:
    """Extends ``lease`` to ``now + ttl_s``; ``ChainLeasedError`` if it is lost already
    (a newer generation exists, or it expired by the holder's own clock)."""
    return _rewrite(storage, lease, replace(lease, expires_unix_s=now_unix_s + ttl_s),
                    now_unix_s)


def release(storage: Storage, lease: Lease, *, now_unix_s: float) -> Lease:
    """Marks ``lease`` released, so that another daemon may take the chain at once."""
    return _rewrite(storage, lease, replace(lease, released=True, expires_unix_s=now_unix_s),
                    now_unix_s)


def check_current(storage: Storage, lease: Lease, *, now_unix_s: float) -> None:
    """Raises ``ChainLeasedError`` unless ``lease`` is still the chain's current lease and
    unexpired: what a commit (or a rewrite) checks just before it puts its manifest."""
    if not lease.live(now_unix_s):
        raise ChainLeasedError(
            f"the lease of {lease.run}/rank{lease.rank} held by this daemon expired "
            f"{now_unix_s - lease.expires_unix_s:.1f} s ago (renewals failed or were late); "
            "nothing more is written under it: a save is not committed (save it again), a "
            "delete is not done (delete again)"
        )
    generations = read_generations(storage, lease.run, lease.rank)
    if generations and generations[-1] != lease.generation:
        current = read_current(storage, lease.run, lease.rank)
        raise _leased(current or lease, now_unix_s, lost=True)


def recheck_if_late(
    storage: Storage, lease: Lease, step: int, *, waited_s: float, now_unix_s: float,
    late_after_s: float = RECHECK_AFTER_S,
) -> None:
    """What a writer calls just before it puts a manifest of ``step`` under ``lease``,
    ``waited_s`` seconds after its lease check (``check_current``): a no-op within
    ``late_after_s``; later, the check again (see "Late commits" above), raising
    ``ChainLeasedError`` that says why the save is not committed (or the rewrite not
    made). A daemon's commits keep the default and its rewrites pass 0 (every put checks,
    ``ChainLeases.rewrite_check``); ``ckptd rm --storage``, whose lease is only renewed
    while it deletes, passes its renewal interval (``ckptd.daemon.cli.rm_lease``)."""
    if waited_s <= late_after_s:
        return
    try:
        check_current(storage, lease, now_unix_s=now_unix_s)
    except ChainLeasedError as exc:
        raise ChainLeasedError(
            f"the manifest of step {step} of {lease.run}/rank{lease.rank} was to be written "
            f"{waited_s:.0f} s after its lease check (the writer was paused, or its storage "
            f"calls queued, for over {late_after_s:.0f} s); checked again: {exc}"
        ) from exc


def prune(storage: Storage, lease: Lease, *, now_unix_s: float, exclusive: bool) -> list[int]:
    """Deletes the chain's generations below ``lease`` (the caller's own) that no longer
    fence a commit; returns them. Call only once the void manifests of the taker's scan are
    deleted: a pruned record no longer voids what only it fenced. ``exclusive``: the caller
    holds the whole storage, so every lower generation goes; else those that ended
    (``expires_unix_s``) at least ``RECORD_GRACE_S`` before ``now_unix_s``."""
    if exclusive:
        old = [g for g in read_generations(storage, lease.run, lease.rank)
               if g < lease.generation]
    else:
        chain = read_all(storage, chain_prefix(lease.run, lease.rank)).get(
            (lease.run, lease.rank), [])
        old = [record.generation for record in chain if record.generation < lease.generation
               and now_unix_s - record.expires_unix_s >= RECORD_GRACE_S]
    if old:
        storage.delete([lease_key(lease.run, lease.rank, generation) for generation in old])
    return old


def remove(storage: Storage, run: str, rank: int) -> int:
    """Deletes every lease record of a chain that has no step left, on storage its caller
    holds alone (no other writer: nothing is left to fence); returns how many."""
    keys = [lease_key(run, rank, g) for g in read_generations(storage, run, rank)]
    if keys:
        storage.delete(keys)
    return len(keys)


def _rewrite(storage: Storage, lease: Lease, updated: Lease, now_unix_s: float) -> Lease:
    check_current(storage, lease, now_unix_s=now_unix_s)
    storage.put(lease_key(lease.run, lease.rank, lease.generation), updated.to_bytes())
    return updated


def _leased(current: Lease, now_unix_s: float, *, lost: bool = False) -> ChainLeasedError:
    what = "took over" if lost else "holds"
    return ChainLeasedError(
        f"another daemon {what} the writer lease of run {current.run!r} rank {current.rank}: "
        f"{describe(current, now_unix_s)}; save through that daemon, or retry after the "
        "lease expires (a clean close releases it at once)"
    )
