"""The retention planner (``daemon/store/retention.py``): which steps a policy keeps, that
deleting never takes a kept step's parent, that the visible steps are exactly the kept ones
(the rest hidden while needed), and when a rewrite is worth it. No daemon."""

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
    return SimpleNamespace(manifest=manifest, stored_bytes=stored, hidden=False)


def chain(n: int, base_interval: int = 50, delta_bytes: int = 10) -> list[Any]:
    """Steps 1..n, a base every ``base_interval`` saves, small deltas between."""
    return [entry(s, BASE if (s - 1) % base_interval == 0 else "delta",
                  BASE_BYTES if (s - 1) % base_interval == 0 else delta_bytes)
            for s in range(1, n + 1)]


def apply(entries: list[Any], policy: RetentionPolicy) -> tuple[list[Any], int]:
    """Runs plans to a fixed point as the Retainer does (delete groups, then hide, then
    one rebase, which makes its step a base); returns what stays and how many rebases."""
    rebases = 0
    while True:
        todo = plan(entries, policy)
        assert todo.rebase is None or not (todo.groups or todo.hide)
        if todo.groups:
            for group in todo.groups:
                check_group(entries, group)
                gone = {k.step for k in group}
                entries = [e for e in entries if e.manifest.key.step not in gone]
            continue
        if todo.hide:
            hide = set(todo.hide)
            for e in entries:
                e.hidden = e.hidden or e.manifest.key in hide
            continue
        if todo.rebase is None:
            return entries, rebases
        rebases += 1
        entries = [entry(e.manifest.key.step, BASE, BASE_BYTES)
                   if e.manifest.key == todo.rebase else e for e in entries]


def visible(entries: list[Any]) -> set[int]:
    return {e.manifest.key.step for e in entries if not e.hidden}


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


def test_visible_steps_are_exactly_the_policys_and_no_kept_parent_goes() -> None:
    policy = RetentionPolicy(keep_last=5, keep_every=100)
    entries: list[Any] = []
    rebases = 0
    for step in range(1, 301):
        entries.append(chain(step)[-1])
        entries, done = apply(entries, policy)
        rebases += done
        expected = {*range(max(1, step - 4), step + 1), *range(100, step + 1, 100)}
        assert visible(entries) == expected == kept_steps(entries, policy)
        for segment in segments(entries):  # every segment still starts at a base
            assert segment[0].manifest.kind == BASE
        # What is hidden is needed (each segment ends with a kept step): at most a
        # rewrite's worth before a step kept for good, four (and one) in the open segment,
        # and otherwise only in a closed segment whose kept steps only the keep_last
        # window keeps: the window leaves it within 5 commits.
        cut = segments(entries)
        rewrite = BASE_BYTES * 17 // 16
        for number, segment in enumerate(cut):
            steps = [e.manifest.key.step for e in segment]
            assert steps[-1] in expected, steps
            hidden = sum(e.stored_bytes for e in segment if e.hidden)
            if number == len(cut) - 1:
                assert hidden <= 5 * rewrite, (step, steps, hidden)
            elif steps[-1] % 100 == 0 and step - steps[-1] >= 5:  # out of the window
                assert hidden <= rewrite, (step, steps, hidden)
            else:
                assert all(s > step - 5 for s in steps if not any(
                    e.hidden for e in segment if e.manifest.key.step == s)), (step, steps)
    # At most one rewrite per natural segment (the open one, once it holds two rewrites).
    assert rebases <= 300 // 50, rebases


def test_a_delta_kept_for_good_is_rewritten_once_its_hidden_steps_outweigh_a_base() -> None:
    # keep_every=30 with bases every 1000 saves: 30, 60, ... are deltas kept for good.
    policy = RetentionPolicy(keep_every=30, keep_last=1)
    entries, rebases = apply(chain(61, base_interval=1000, delta_bytes=100), policy)
    # 28 hidden deltas and the hidden base 1 before 30 (3800 bytes): more than a rewrite
    # (1062): 30 becomes a base; before 60, 29 deltas (2900): rewritten too.
    assert rebases == 2 and visible(entries) == {30, 60, 61}
    assert not any(e.hidden for e in entries)
    entries, rebases = apply(chain(61, base_interval=1000, delta_bytes=2), policy)
    assert rebases == 0 and visible(entries) == {30, 60, 61}  # 1000 + 56 hidden: kept
    assert sum(e.hidden for e in entries) == 1 + 28 + 29


def test_the_keep_last_window_is_rewritten_only_past_four_bases() -> None:
    policy = RetentionPolicy(keep_last=2)
    entries, rebases = apply(chain(44, base_interval=1000, delta_bytes=100), policy)
    # Base 1 and the deltas 2..42 hidden: 5100 bytes > 4 * 1062 once 34 deltas were
    # hidden, so one rewrite (of step 36), then 36..42 hidden again (600 + 1000).
    assert rebases == 1 and visible(entries) == {43, 44}
    assert sum(e.stored_bytes for e in entries if e.hidden) <= 4 * 1062


def test_at_most_one_rebase_per_plan_and_only_when_it_frees_more_than_it_writes() -> None:
    policy = RetentionPolicy(keep_every=100, keep_last=1)
    entries = chain(100, base_interval=1000, delta_bytes=100)  # 98 dropped before 100
    todo = plan(entries, policy)
    assert todo.groups == [] and todo.rebase is None
    assert [k.step for k in todo.hide] == list(range(1, 100))  # hidden first
    for e in entries[:-1]:
        e.hidden = True
    assert plan(entries, policy).rebase == StepKey("r", 0, 100)
    small = chain(100, base_interval=1000, delta_bytes=0)  # 1000 < a rewrite: no
    for e in small[:-1]:
        e.hidden = True
    assert plan(small, policy) == plan(small, policy).__class__([])


def test_hidden_steps_nothing_needs_go_even_without_a_policy() -> None:
    entries = chain(10, base_interval=5)  # bases 1 and 6
    for e in entries[:3]:
        e.hidden = True  # 4 and 5 were dropped since: 1..3 restore nothing kept
    todo = plan([e for e in entries if e.manifest.key.step not in (4, 5)], RetentionPolicy())
    assert todo.groups == [[StepKey("r", 0, s) for s in (3, 2, 1)]] and not todo.hide
