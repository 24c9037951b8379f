"""The quarantine area: step directories that may have held a committed step but cannot be
read, kept for an operator instead of being deleted.

A step directory whose manifest is missing (without the commit protocol's ``pending``
marker, see ``ckptd.daemon.store.manifest``) or unreadable is not provably uncommitted:
the manifest of a durable step may have been deleted or garbled after its commit. The
daemon's start-up scan therefore moves such a directory, key by key, out of the ``runs/``
key space, where nothing lists, restores or deletes it::

    quarantine/{run}/{rank}/{step:020d}-{tag}/{name}    name as it was in the step directory

``tag`` is fresh for each start-up that quarantines, so a step number used again later
(the trainer re-saves it) never overwrites an earlier incident. A crash part-way through a
move leaves the rest in ``runs/``, which the next start-up quarantines under a new tag.
Only ``ckptd rm --quarantined`` (an operator's decision) deletes here.

Listing derives each entry's reason from what it holds (no manifest, or the error its
manifest raises now), so the area needs no index of its own.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass

from ckptd.daemon.domain import StepKey
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.daemon.storage.base import KeyNotFoundError, Storage
from ckptd.daemon.store.manifest import MANIFEST_NAME, Manifest, parse_key

QUARANTINE_PREFIX = "quarantine/"
_KEY_RE = re.compile(
    r"quarantine/(?P<run>[A-Za-z0-9._-]+)/(?P<rank>[0-9]+)/(?P<step>[0-9]{20})-(?P<tag>[0-9a-z]+)"
    r"/(?P<name>[^/]+)"
)


@dataclass(frozen=True)
class DamagedStep:
    """A step directory under ``runs/`` the scan found neither committed nor provably
    uncommitted: its keys and why."""

    key: StepKey
    keys: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class QuarantinedStep:
    """One quarantined step directory: where it lies and what it holds."""

    key: StepKey
    tag: str
    keys: tuple[str, ...]
    stored_bytes: int
    reason: str

    @property
    def prefix(self) -> str:
        return quarantine_prefix(self.key, self.tag)


def quarantine_prefix(key: StepKey, tag: str) -> str:
    """Where step ``key``'s directory lies once quarantined under ``tag``."""
    return f"{QUARANTINE_PREFIX}{key.run}/{key.rank}/{key.step:020d}-{tag}/"


def new_tag() -> str:
    """A tag for one start-up's quarantine moves (hex nanoseconds: sorts by time)."""
    return f"{time.time_ns():x}"


def quarantine(storage: Storage, damaged: DamagedStep, tag: str) -> QuarantinedStep:
    """Moves every key of ``damaged`` into the quarantine area (blocking: run it in the I/O
    pool); raises ``StorageError`` if a move fails, leaving the rest in place."""
    prefix = quarantine_prefix(damaged.key, tag)
    moved: list[str] = []
    for key in damaged.keys:
        parsed = parse_key(key)
        assert parsed is not None, key
        new_key = prefix + parsed[1]
        storage.move(key, new_key)
        moved.append(new_key)
    return _entry(storage, damaged.key, tag, moved)


def list_quarantined(storage: Storage) -> list[QuarantinedStep]:
    """Every quarantined step directory, by run, rank, step and tag (blocking)."""
    groups: dict[tuple[StepKey, str], list[str]] = defaultdict(list)
    for key in storage.list(QUARANTINE_PREFIX):
        match = _KEY_RE.fullmatch(key)
        if match is not None:
            step = StepKey(match["run"], int(match["rank"]), int(match["step"]))
            groups[(step, match["tag"])].append(key)
    order = sorted(groups, key=lambda g: (g[0].run, g[0].rank, g[0].step, g[1]))
    return [_entry(storage, step, tag, groups[(step, tag)]) for step, tag in order]


def delete_quarantined(storage: Storage, entries: list[QuarantinedStep]) -> None:
    """Deletes the keys of ``entries`` (blocking): what an operator gave up on."""
    storage.delete([key for entry in entries for key in entry.keys])


def _entry(storage: Storage, step: StepKey, tag: str, keys: list[str]) -> QuarantinedStep:
    total = 0
    for key in keys:
        try:
            total += storage.size(key)
        except KeyNotFoundError:
            continue  # removed meanwhile (a concurrent ``rm --quarantined``)
    manifest = next((key for key in keys if key.endswith("/" + MANIFEST_NAME)), None)
    return QuarantinedStep(step, tag, tuple(keys), total, _reason(storage, manifest))


def _reason(storage: Storage, manifest: str | None) -> str:
    if manifest is None:
        return "manifest missing"
    try:
        Manifest.from_bytes(storage.get(manifest), manifest)
    except KeyNotFoundError:
        return "manifest missing"
    except CorruptCheckpointError as exc:
        return f"manifest unreadable: {exc}"
    return "manifest readable now (restore it by moving the directory back under runs/)"
