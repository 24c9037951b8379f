"""The retention planner (``daemon/store/retention.py``): which steps a policy keeps, that
deleting never takes a kept step's parent, and at most one rewrite per plan. No daemon."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ckptd.daemon.domain import RetentionPolicy, StepKey
from ckptd.daemon.store.manifest import BASE
from ckptd.daemon.store.retention import kept_steps, plan, segments

BASE_BYTES = 1000


def entry(step: int, kind: str, stored: int, created: float = 0.0) -> Any:
    """Duck-typed ``IndexEntry``: what the planner reads of one."""
    manifest = SimpleNamespace(key=StepKey("r", 0, step), kind=kind, created_unix_s=created,
                               metrics={})
    return SimpleNamespace(manifest=manifest, stored_bytes=stored)


def chain(n: int, base_interval: int = 50, delta_bytes: int = 10) -> list[Any]:
    """Steps 1..n, a base every ``base_interval`` saves, small deltas between."""
    return [entry(s, BASE if (s - 1) % base_interval == 0 else "delta",
                  BASE_BYTES if (s - 1) % base_interval == 0 else delta_bytes)
            for s in range(1, n + 1)]


def apply(entries: list[Any], policy: RetentionPolicy) -> tuple[list[Any], int]:
    """Runs plans to a fixed point (deleting groups; a rebase makes its step a base);
    returns what stays and how many rebases the plans asked for."""
    rebases = 0
    while True:
        todo = plan(entries, policy)
        assert todo.rebase is None or not todo.groups
        if todo.groups:
            for group in todo.groups:
                check_group(entries, group)
                gone = {k.step for k in group}
                entries = [e for e in entries if e.manifest.key.step not in gone]
            continue
        if todo.rebase is None:
            return entries, rebases
        rebases += 1
        entries = [entry(e.manifest.key.step, BASE, BASE_BYTES)
                   if e.manifest.key == todo.rebase else e for e in entries]


def check_group(entries: list[Any], group: list[StepKey]) -> None:
    """A group is newest first and no step staying has its segment's earlier steps in it."""
    steps = [k.step for k in group]
    assert steps == sorted(steps, reverse=True)
    gone = set(steps)
    for segment in segments(entries):
        seg_steps = [e.manifest.key.step for e in segment]
        for i, step in enumerate(seg_steps):
            if step not in gone:  # everything it restores through stays
                assert not gone & set(seg_steps[:i]), (step, sorted(gone))


def test_kept_steps_keep_last_and_every() -> None:
    policy = RetentionPolicy(keep_last=5, keep_every=100)
    assert kept_steps(chain(1000), policy) == {*range(100, 1001, 100), *range(996, 1001)}


def test_no_rule_keeps_everything_and_latest_always_kept() -> None:
    assert kept_steps(chain(7), RetentionPolicy()) == set(range(1, 8))
    assert 7 in kept_steps(chain(7), RetentionPolicy(keep_every=3))


def test_keep_best_by_metric() -> None:
    entries = chain(10)
    for e in entries:
        e.manifest.metrics = {"val_loss": abs(e.manifest.key.step - 4)}
    policy = RetentionPolicy(keep_best=3, best_metric="val_loss", best_mode="min")
    assert kept_steps(entries, policy) == {3, 4, 5, 10}


def test_deletion_never_takes_a_kept_steps_parent() -> None:
    policy = RetentionPolicy(keep_last=5, keep_every=100)
    entries: list[Any] = []
    for step in range(1, 301):
        entries.append(chain(step)[-1])
        entries, _ = apply(entries, policy)
        left = {e.manifest.key.step for e in entries}
        assert kept_steps(entries, policy) <= left
        assert {s for s in range(max(1, step - 4), step + 1)} <= left
        assert {s for s in range(100, step + 1, 100)} <= left
        for segment in segments(entries):  # every segment still starts at a base
            assert segment[0].manifest.kind == BASE


def test_at_most_one_rebase_per_plan_and_only_when_it_frees_more() -> None:
    policy = RetentionPolicy(keep_every=100, keep_last=1)
    entries = chain(100, base_interval=1000, delta_bytes=100)  # 99 pinned before 100
    todo = plan(entries, policy)
    assert todo.groups == [] and todo.rebase == StepKey("r", 0, 100)
    small = chain(100, base_interval=1000, delta_bytes=0)  # pinned == a base: no
    assert plan(small, policy).rebase is None
