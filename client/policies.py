"""Per-tensor storage policies chosen by glob patterns on tensor names.

A rule is ``(pattern, spec)``: ``pattern`` is an ``fnmatch`` glob matched against the full
tensor name (``*`` also crosses ``/``, so ``"optim/*"`` covers every optimizer tensor), and
``spec`` is one of ``"auto"``, ``"exact"``, ``"lossy"``, ``"lossy:<bits>"`` (bits 1..8),
``"lossy-log"`` or ``"lossy-log:<bits>"`` (lossy in the log domain: relative error, never
negative; for tensors that must stay non-negative), ``"lossy-scaled"`` or
``"lossy-scaled:<bits>"`` (lossy against a fitted multiple of the previous save: for tensors
that decay between saves).
Rules are tried in order and the first match wins. After the user's rules come the
built-in ones (``BUILTIN_RULES``); a tensor no rule matches is ``auto``: the daemon stores
float tensors above its size threshold lossily and everything else exactly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from ckptd.protos.v1 import pb

MIN_BITS = 1
MAX_BITS = 8


@dataclass(frozen=True)
class PolicyRule:
    """One parsed rule: tensors whose name matches ``pattern`` get ``policy`` and ``bits``."""

    pattern: str
    policy: int  # a ckptd.v1.Policy value
    bits: int  # 0: the checkpointer's (or daemon's) default


def check_bits(bits: int | None, what: str) -> int:
    """Validates a bit width (None means 0, the default) and returns it."""
    if bits is None:
        return 0
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


_LOSSY_KINDS = {"lossy": pb.POLICY_LOSSY, "lossy-log": pb.POLICY_LOSSY_LOG,
                "lossy-scaled": pb.POLICY_LOSSY_SCALED}


def parse_spec(spec: str) -> tuple[int, int]:
    """Parses ``"auto"``, ``"exact"``, ``"lossy[:<bits>]"``, ``"lossy-log[:<bits>]"`` or
    ``"lossy-scaled[:<bits>]"`` into (policy, bits)."""
    kind, colon, bits_text = spec.partition(":")
    if kind == "exact" and not colon:
        return pb.POLICY_EXACT, 0
    if kind == "auto" and not colon:
        return pb.POLICY_UNSPECIFIED, 0
    if kind in _LOSSY_KINDS:
        if not colon:
            return _LOSSY_KINDS[kind], 0
        if bits_text.isdigit():
            return _LOSSY_KINDS[kind], check_bits(int(bits_text), f"bits in policy {spec!r}")
    raise ValueError(
        f"invalid policy {spec!r}; expected 'auto', 'exact', 'lossy', 'lossy:<bits>', "
        f"'lossy-log', 'lossy-log:<bits>', 'lossy-scaled' or 'lossy-scaled:<bits>' with bits "
        f"in {MIN_BITS}..{MAX_BITS}"
    )


def parse_rules(rules: Iterable[tuple[str, str]] | None) -> tuple[PolicyRule, ...]:
    """Parses user rules, failing early (at construction) on a malformed one."""
    parsed = []
    for rule in rules or ():
        if not (
            isinstance(rule, tuple | list)
            and len(rule) == 2
            and all(isinstance(x, str) for x in rule)
        ):
            raise ValueError(
                f"a policy rule must be a (pattern, spec) pair of strings, got {rule!r}"
            )
        policy, bits = parse_spec(rule[1])
        parsed.append(PolicyRule(rule[0], policy, bits))
    return tuple(parsed)


# Consulted after the user's rules, so a user rule for the same names wins.
#
# Adam's second moment is a running mean of squared gradients: it must stay >= 0, and its
# square root divides every update. A linear lossy delta can push small elements below
# zero, and then the restored run's parameters turn NaN (bench/RESULTS.md: every diverged
# restore of the AdamW workload). In the log domain the error is relative to each element
# and a restored element is never negative; bench/second_moment.py measured the restored
# update within a few percent of exact for about 2 bits per element instead of 26
# (bench/README.md, "Adam's second moment").
#
# Adam's first moment decays by beta1 every step where no gradient arrives; a linear delta
# drops those small changes, so the restored ``m`` stays stale where ``v`` decayed and the
# restored update grows. Against a fitted multiple of the previous save the decay is
# predicted: bench/first_moment.py measured the restored update's error lower in every
# tensor group for the same bytes (bench/README.md, "Adam's first moment").
BUILTIN_RULES: tuple[PolicyRule, ...] = (
    PolicyRule("*exp_avg_sq", pb.POLICY_LOSSY_LOG, 0),
    PolicyRule("*exp_avg", pb.POLICY_LOSSY_SCALED, 0),
)


def resolve(rules: tuple[PolicyRule, ...], name: str, default_bits: int) -> tuple[int, int]:
    """Returns (policy, bits) for tensor ``name``: the first of ``rules`` and then
    ``BUILTIN_RULES`` to match decides; exact tensors always carry bits 0."""
    for rule in (*rules, *BUILTIN_RULES):
        if fnmatch.fnmatchcase(name, rule.pattern):
            if rule.policy == pb.POLICY_EXACT:
                return rule.policy, 0
            return rule.policy, rule.bits or default_bits
    return pb.POLICY_UNSPECIFIED, default_bits
