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

**Chain-aware deletion: the listed steps are exactly the policy's; what a kept step still
needs stays hidden.** A delta restores through every step from its segment's base (the
nearest base at or before it) up to it: a chain is linear, each delta's parent is the step
committed just before it. A step is *needed* when it is kept or a kept step of its segment
comes after it. So in each segment the needed steps are a prefix (the base up to the last
kept step) and the others a suffix: deleting that suffix newest first never removes a
parent of a step that stays and writes nothing. A step the policy drops inside the prefix
is *hidden*: its empty ``hidden`` marker is put (one atomic put), and from then on it is no
step to users (not listed, ``restore`` says retention removed it) while its blobs stay for
the kept steps restored through it. Hiding is final, like a deletion: the keep rules rank
only the steps users see. A hidden step's bytes go when nothing kept needs them any more:
when the kept steps after it are dropped too (a later base took over), its segment's
suffix, hidden steps included, is deleted like any other.

**When a kept delta is rewritten as a base, chosen by bytes written.** Rewriting a kept
delta as a lossless base (what ``ckptd rm`` does, ``ckptd.daemon.store.deletion``) frees
the hidden steps before it and writes about one base (17/16 of the segment's base, the
deleter's own estimate). How long the hidden steps would otherwise stay decides:

* before a step kept for good (``keep_every``, ``keep_best``, ``keep_interval_s``) they
  stay for good, so the rewrite pays as soon as they store more than it writes
  (``REBASE_LASTING_BASES`` = 1): the hidden bytes before such a step stay under a base;
* before a step only the ``keep_last`` window keeps, they go unwritten once the next base
  is written and the window moves past it (``base_interval`` saves at most), so the rewrite
  is worth it only past four rewrites (``REBASE_WINDOW_BASES`` = 4), in the open (latest)
  segment, and never in a closed one (the window leaves it within ``keep_last`` commits).

So a rewrite needs a base's worth (or four) of newly hidden deltas since the last one: one
per many commits, never one per commit, and at most one per commit by the engine. With
``keep_every`` a multiple of ``base_interval``, the kept steps are bases and retention
mostly only hides and deletes, which also works on a full disk.

**Crash rule.** Deleting a group puts its ``pending`` markers, removes the manifests newest
first, then blobs and ``hidden`` markers, then the ``pending`` markers; a crash leaves
marked directories that start-up removes and never touches a needed step, so no kept step
is ever left unrestorable. Hiding puts one marker per step: a crash before a step's marker
leaves that dropped step listed until the next pass (at start, or after the next commit);
never the reverse, a kept step hidden.
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
# A group is deleted (or hidden) under the chain's lock; capping it bounds how long a save
# can wait behind retention (a longer suffix is deleted in several groups, newest first):
# on a local disk a step's deletion syncs its directory three times (bench/README.md).
MAX_GROUP_STEPS = 16
# A kept delta is rewritten as a base only when the hidden steps before it store more than
# this many rewrites (one base each). A step kept for good (keep_every, keep_best,
# keep_interval_s) pins its hidden steps for good: a rewrite pays as soon as it frees more
# than it writes. A step only the keep_last window keeps is dropped soon, and the next base
# frees its hidden steps unwritten: a rewrite must free four times what it writes
# (bench/README.md, "Retention": 2 for every kept step gave 0.065 rewrites per commit,
# these 0.029).
REBASE_LASTING_BASES = 1
REBASE_WINDOW_BASES = 4


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
    """The steps of one chain (oldest first, hidden ones ignored) that ``policy``'s keep
    rules keep."""
    window, lasting = _kept(entries, policy)
    return window | lasting


def _kept(entries: Sequence[IndexEntry], policy: RetentionPolicy) -> tuple[set[int], set[int]]:
    """The kept steps split in two: those of the ``keep_last`` window (and the latest),
    which later commits release, and those another rule keeps for good."""
    visible = [e for e in entries if not e.hidden]
    steps = [e.manifest.key.step for e in visible]
    if not steps:
        return set(), set()
    if not (policy.keep_last or policy.keep_every or policy.keep_interval_s
            or policy.keep_best):
        return set(), set(steps)
    window = {steps[-1], *(steps[-policy.keep_last:] if policy.keep_last else ())}
    lasting: set[int] = set()
    if policy.keep_every:
        lasting.update(step for step in steps if step % policy.keep_every == 0)
    if policy.keep_interval_s:
        last_s: float | None = None
        for entry in visible:
            created_s = entry.manifest.created_unix_s
            if last_s is None or created_s >= last_s + policy.keep_interval_s:
                lasting.add(entry.manifest.key.step)
                last_s = created_s
    if policy.keep_best:
        lasting.update(_best(visible, policy))
    return window, lasting


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
    """What retention does next to one chain, in this order: delete (``groups``), hide
    (``hide``), then at most one rewrite that frees more than it writes."""

    groups: list[list[StepKey]]
    hide: list[StepKey] = dataclasses.field(default_factory=list)
    rebase: StepKey | None = None


def plan(
    entries: Sequence[IndexEntry], policy: RetentionPolicy, *, other_bytes: int = 0,
    also_keep: frozenset[int] = frozenset(),
) -> Plan:
    """What to do to one chain (every stored step, oldest first) under ``policy`` (a
    policy with no rule keeps every listed step, and still deletes the hidden steps
    nothing needs). ``groups``: steps to delete, each newest first and closed under
    dependants (no step that stays has its parent in it), at most ``MAX_GROUP_STEPS``
    long. ``hide``: dropped steps a kept step still needs, oldest first. ``rebase``: a
    kept delta worth rewriting as a base (module docstring; only when nothing is left to
    delete or hide). ``other_bytes``: what the run's other ranks store (``max_bytes``
    counts every byte, hidden ones included). ``also_keep``: steps kept whatever the rules
    say, like the ``keep_last`` window (a world run's latest complete step, which a newer
    step some rank still lacks must not leave without a complete one)."""
    if not entries:
        return Plan([])
    window, lasting = _kept(entries, policy)
    window |= also_keep
    kept = window | lasting
    doomed: list[list[IndexEntry]] = []
    remaining = sum(e.stored_bytes for e in entries) + other_bytes
    survivors: list[list[IndexEntry]] = []
    rebase: StepKey | None = None
    cut = segments(entries)
    for number, segment in enumerate(cut):
        last = max((i for i, e in enumerate(segment) if e.manifest.key.step in kept),
                   default=-1)
        if last + 1 < len(segment):
            doomed.append(segment[last + 1:])
            remaining -= sum(e.stored_bytes for e in segment[last + 1:])
        if last >= 0:
            survivors.append(segment[: last + 1])
            # A closed segment's window steps leave soon, freeing it without a rewrite.
            window_too = number == len(cut) - 1
            rebase = rebase or _worth_rebasing(segment[: last + 1], kept, lasting, window_too)
    if policy.max_bytes:
        # The latest step's segment is never evicted for bytes.
        for segment in survivors[:-1]:
            if remaining <= policy.max_bytes:
                break
            doomed.append(segment)
            remaining -= sum(e.stored_bytes for e in segment)
    gone = {e.manifest.key.step for run_of_steps in doomed for e in run_of_steps}
    hide = [e.manifest.key for e in entries if not e.hidden
            and e.manifest.key.step not in kept and e.manifest.key.step not in gone]
    groups: list[list[StepKey]] = []
    for run_of_steps in doomed:
        keys = [e.manifest.key for e in reversed(run_of_steps)]
        groups.extend(keys[i:i + MAX_GROUP_STEPS] for i in range(0, len(keys), MAX_GROUP_STEPS))
    return Plan(groups, hide, None if groups or hide else rebase)


def _worth_rebasing(
    needed: list[IndexEntry], kept: set[int], lasting: set[int], window_too: bool
) -> StepKey | None:
    """The first kept delta of a segment's needed prefix whose run of hidden steps before
    it (back to the previous kept step, or the base) stores more than
    ``REBASE_LASTING_BASES`` rewrites (a step kept for good) or ``REBASE_WINDOW_BASES``
    (a step of the ``keep_last`` window, only when ``window_too``). A rewrite writes its
    tensors exactly encoded, about the base's size (``Deleter`` estimates the same)."""
    rewrite_bytes = needed[0].stored_bytes * 17 // 16
    # The base is hidden too when it is not kept itself.
    hidden = 0 if needed[0].manifest.key.step in kept else needed[0].stored_bytes
    for entry in needed[1:]:
        step = entry.manifest.key.step
        if step not in kept:
            hidden += entry.stored_bytes
            continue
        if step in lasting and hidden > REBASE_LASTING_BASES * rewrite_bytes:
            return entry.manifest.key
        if window_too and hidden > REBASE_WINDOW_BASES * rewrite_bytes:
            return entry.manifest.key
        hidden = 0
    return None


def policy_fields(policy: RetentionPolicy) -> Mapping[str, Any]:
    """The policy as JSON-ready fields (``ckptd ls --json``)."""
    return dataclasses.asdict(policy)
