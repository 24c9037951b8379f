"""Retention: which steps a run's policy keeps, and deletion groups that need no rewrite.

A run's ``RetentionPolicy`` (``ckptd.daemon.domain``) lives in storage beside the run, out
of the step key space, so a restarted daemon and the direct-storage CLI read the same one::

    retention/{run}.json    {"format": "ckptd.retention", "version": 1, "keep_last": ...}

written with one ``put`` (atomic in every backend). No key there means no policy of its
own: the daemon's default (``ckptd serve --retention-*``) applies.

**Which steps are kept.** Per (run, rank) chain: the newest ``keep_last``; every step that
is a multiple of ``keep_every``; for ``keep_interval_s``, the oldest step and then each
step committed at least that long after the last one this rule kept; the ``keep_best``
steps with the best ``best_metric`` (steps without it are not ranked); and always the
latest step (and, for a run with a world, the latest step every rank has: the engine passes
it as ``also_keep``). With no ``keep_*`` rule set every step is kept. ``max_bytes`` then caps the
run's stored bytes (all ranks): while over it, the chain's oldest segment (below) goes
whole, whatever the other rules say, except the segment of the latest step.

**Chain-aware deletion: keep the base and drop only what nothing kept needs; rewrite a
kept delta as a base only when that frees more bytes than it writes.** A delta restores
through every step from its segment's base (the nearest base at or before it) up to it: a
chain is linear, each delta's parent is the step committed just before it. A step is
*needed* when it is kept or a kept step of its segment comes after it. So in each segment
the needed steps are a prefix (the base up to the last kept step) and the deletable ones a
suffix: deleting that suffix newest first never removes a parent of a step that stays and
writes nothing. The unkept steps inside the prefix are *pinned*: kept only because a kept
delta after them needs them. Freeing them means rewriting that kept delta as a lossless
base (what ``ckptd rm`` does, ``ckptd.daemon.store.deletion``), which writes about one
base (the whole model, exactly encoded). Chosen by bytes: ``plan`` proposes that rewrite
only when the run of pinned steps before the kept delta stores more than the rewrite
would write (17/16 of the segment's base, the deleter's own estimate), so every rewrite
shrinks the store and at most about one base's worth stays pinned per run of them. With
``keep_last`` alone, rewriting at every commit (the rewritten step itself deleted
``keep_last`` commits later) would write a base per save; this writes one base per
several commits (as many as the deltas it takes to outweigh a base) and otherwise only
deletes, which also works on a full disk. The engine does at most one rewrite per commit.

A crash mid-group leaves marked directories (``pending``) that start-up removes, and
never touches a needed step, so no kept step is ever left unrestorable.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ckptd.daemon.domain import RetentionPolicy, StepKey
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.daemon.storage.base import Storage
from ckptd.daemon.store.index import IndexEntry
from ckptd.daemon.store.manifest import BASE

FORMAT_NAME = "ckptd.retention"
FORMAT_VERSION = 1
RETENTION_PREFIX = "retention/"
# A group is deleted under the chain's lock; capping it bounds how long a save can wait
# behind retention (a longer suffix is deleted in several groups, newest first).
MAX_GROUP_STEPS = 64


def policy_key(run: str) -> str:
    return f"{RETENTION_PREFIX}{run}.json"


def policy_to_bytes(policy: RetentionPolicy) -> bytes:
    obj = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **dataclasses.asdict(policy)}
    return json.dumps(obj, sort_keys=True).encode()


def policy_from_bytes(data: bytes, where: str) -> RetentionPolicy:
    """Parses a stored policy; ``CorruptCheckpointError`` names ``where`` when it cannot."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} object")
        if obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"version {obj.get('version')!r}; this daemon reads "
                             f"{FORMAT_VERSION} (upgrade ckptd)")
        names = {f.name for f in dataclasses.fields(RetentionPolicy)}
        return RetentionPolicy(**{k: v for k, v in obj.items() if k in names})
    except (ValueError, TypeError) as exc:
        raise CorruptCheckpointError(f"retention policy {where} is unreadable: {exc}") from exc


def load_policies(storage: Storage) -> dict[str, RetentionPolicy]:
    """Every run's stored policy (blocking: call from the I/O pool)."""
    policies = {}
    for key in storage.list(RETENTION_PREFIX):
        if key.endswith(".json"):
            run = key[len(RETENTION_PREFIX):-len(".json")]
            policies[run] = policy_from_bytes(storage.get(key), key)
    return policies


def store_policy(storage: Storage, run: str, policy: RetentionPolicy) -> None:
    """Puts ``run``'s policy (blocking: call from the I/O pool)."""
    storage.put(policy_key(run), policy_to_bytes(policy))


def kept_steps(entries: Sequence[IndexEntry], policy: RetentionPolicy) -> set[int]:
    """The steps of one chain (oldest first) that ``policy``'s keep rules keep."""
    steps = [e.manifest.key.step for e in entries]
    if not steps:
        return set()
    if not (policy.keep_last or policy.keep_every or policy.keep_interval_s
            or policy.keep_best):
        return set(steps)
    kept = {steps[-1]}
    if policy.keep_last:
        kept.update(steps[-policy.keep_last:])
    if policy.keep_every:
        kept.update(step for step in steps if step % policy.keep_every == 0)
    if policy.keep_interval_s:
        last_s: float | None = None
        for entry in entries:
            created_s = entry.manifest.created_unix_s
            if last_s is None or created_s >= last_s + policy.keep_interval_s:
                kept.add(entry.manifest.key.step)
                last_s = created_s
    if policy.keep_best:
        kept.update(_best(entries, policy))
    return kept


def _best(entries: Sequence[IndexEntry], policy: RetentionPolicy) -> list[int]:
    scored = [(e.manifest.metrics[policy.best_metric], e.manifest.key.step)
              for e in entries if policy.best_metric in e.manifest.metrics]
    sign = 1.0 if policy.best_mode == "min" else -1.0
    # Ties go to the newer step.
    scored.sort(key=lambda pair: (sign * pair[0], -pair[1]))
    return [step for _, step in scored[: policy.keep_best]]


def segments(entries: Sequence[IndexEntry]) -> list[list[IndexEntry]]:
    """The chain cut at each base: a base and the deltas up to the next base."""
    cut: list[list[IndexEntry]] = []
    for entry in entries:
        if entry.manifest.kind == BASE or not cut:
            cut.append([])
        cut[-1].append(entry)
    return cut


@dataclasses.dataclass(frozen=True)
class Plan:
    """What retention does next to one chain: free deletions first, then at most one
    rewrite that frees more than it writes."""

    groups: list[list[StepKey]]
    rebase: StepKey | None = None


def plan(
    entries: Sequence[IndexEntry], policy: RetentionPolicy, *, other_bytes: int = 0,
    also_keep: frozenset[int] = frozenset(),
) -> Plan:
    """What to do to one chain (oldest first) under ``policy``. ``groups``: steps to
    delete, each newest first and closed under dependants (no step that stays has its
    parent in it), at most ``MAX_GROUP_STEPS`` long. ``rebase``: a kept delta whose
    pinned steps (kept only because it needs them) store more than rewriting it as a
    base would write. ``other_bytes``: what the run's other ranks store (``max_bytes``).
    ``also_keep``: steps kept whatever the rules say (a world run's latest complete step,
    which a newer step some rank still lacks must not leave without a complete one)."""
    if not entries or not policy.prunes:
        return Plan([])
    kept = kept_steps(entries, policy) | also_keep
    doomed: list[list[IndexEntry]] = []
    remaining = sum(e.stored_bytes for e in entries) + other_bytes
    survivors: list[list[IndexEntry]] = []
    rebase: StepKey | None = None
    for segment in segments(entries):
        last = max((i for i, e in enumerate(segment) if e.manifest.key.step in kept),
                   default=-1)
        if last + 1 < len(segment):
            doomed.append(segment[last + 1:])
            remaining -= sum(e.stored_bytes for e in segment[last + 1:])
        if last >= 0:
            survivors.append(segment[: last + 1])
            rebase = rebase or _worth_rebasing(segment[: last + 1], kept)
    if policy.max_bytes:
        # The latest step's segment is never evicted for bytes.
        for segment in survivors[:-1]:
            if remaining <= policy.max_bytes:
                break
            doomed.append(segment)
            remaining -= sum(e.stored_bytes for e in segment)
    groups: list[list[StepKey]] = []
    for run_of_steps in doomed:
        keys = [e.manifest.key for e in reversed(run_of_steps)]
        groups.extend(keys[i:i + MAX_GROUP_STEPS] for i in range(0, len(keys), MAX_GROUP_STEPS))
    return Plan(groups, None if groups else rebase)


def _worth_rebasing(needed: list[IndexEntry], kept: set[int]) -> StepKey | None:
    """The first kept delta of a segment's needed prefix whose run of pinned steps before
    it (back to the previous kept step, or the base) stores more than a rebase writes: its
    tensors exactly encoded, about the base's size (``Deleter`` estimates the same)."""
    base_bytes = needed[0].stored_bytes
    # The base is pinned too when it is not kept itself.
    pinned = 0 if needed[0].manifest.key.step in kept else base_bytes
    for entry in needed[1:]:
        if entry.manifest.key.step not in kept:
            pinned += entry.stored_bytes
            continue
        if pinned > base_bytes * 17 // 16:
            return entry.manifest.key
        pinned = 0
    return None


def policy_fields(policy: RetentionPolicy) -> Mapping[str, Any]:
    """The policy as JSON-ready fields (``ckptd ls --json``)."""
    return dataclasses.asdict(policy)
