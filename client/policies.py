"""Per-tensor storage policies chosen by glob patterns on tensor names.

A rule is ``(pattern, spec)``: ``pattern`` is an ``fnmatch`` glob matched against the full
tensor name (``*`` also crosses ``/``, so ``"optim/*"`` covers every optimizer tensor), and
``spec`` is one of ``"auto"``, ``"exact"``, ``"lossy"``, ``"lossy:<bits>"`` (bits 1..8),
``"lossy-log"`` or ``"lossy-log:<bits>"`` (lossy in the log domain: relative error, never
negative; for tensors that must stay non-negative), ``"lossy-scaled"`` or
``"lossy-scaled:<bits>"`` (lossy against a fitted multiple of the previous save: for tensors
that decay between saves).
Rules are tried in order and the first match wins. After the user's rules come the
built-in ones, one set per save chosen by what the state holds (``builtin_rules``): Adam's
moments (``ADAM_RULES``), SGD's momentum (``SGD_RULES``), else ``DEFAULT_RULES``. A tensor
no rule matches is ``auto``: the daemon stores float tensors above its size threshold
lossily and everything else exactly.

A lossy rule (any of the ``lossy*`` specs, any width) applies to floating-point tensors
only, the user's as the built-in ones: the codec quantizes float deltas, and a glob such as
``("*", "lossy:3")`` is read as "every float tensor", so the non-float tensors it matches
(RNG states, integer buffers and counters, bool masks) skip it and stay exact. A user rule
that names a non-float tensor by its exact name (a pattern without ``*``, ``?`` or ``[``)
asked for the impossible on purpose, so the save raises ``InvalidCheckpointError`` naming
the tensor and the rule rather than silently storing it exactly.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ckptd.protos import installed_version
from ckptd.protos.v1 import pb

from .errors import InvalidCheckpointError

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


# The built-in rule sets, consulted after the user's rules (so a user rule for the same names
# wins) and chosen per save by what the state holds (``builtin_rules``): the optimizer
# decides which widths the evidence supports (bench/README.md, "The per-optimizer rule for
# AdamW" and "Finer buckets for the weights"). A width of 0 is the daemon's
# default (``--bits``); an explicit ``bits=`` replaces every built-in width.
#
# Adam's second moment is a running mean of squared gradients: it must stay >= 0, and its
# square root divides every update. A linear lossy delta can push small elements below
# zero, and then the restored run's parameters turn NaN (bench/RESULTS.md: every diverged
# restore of the AdamW workload). In the log domain the error is relative to each element
# and a restored element is never negative (bench/README.md, "Adam's second moment").
#
# Adam's first moment decays by beta1 every step where no gradient arrives; a linear delta
# drops those small changes, so the restored ``m`` stays stale where ``v`` decayed and the
# restored update grows. Against a fitted multiple of the previous save the decay is
# predicted (bench/README.md, "Adam's first moment").
#
# The Adam set (Adam, AdamW: the state holds ``*exp_avg_sq``): the 22.4M-parameter decoder
# with AdamW at both K (10, 50) and both seeds: weights b3, ``exp_avg`` b2, ``exp_avg_sq``
# b3, small tensors lossy: delta 21.5-25.0x smaller than torch.save, rework 0.56-0.67x
# exact, 0 of 36 restores diverged or capped. ``exp_avg_sq`` at b2 was 3.6x larger at K=50
# (its log domain's exceptions); all-b3 was 19.0x at K=50. The step counters (0-dim floats
# the bias correction divides by) stay exact. Kept as one table so a change to one moment's
# rule is one line.
#
# Every set keeps optimizers' step counters exact (Adam's, but also RMSprop's, Adagrad's,
# NAdam's...): the daemon's size threshold (``min_lossy_elements``) ships at 1, so without
# a rule a 0-dim float counter would be stored lossily like any other float tensor.
STEP_COUNTER_RULES: tuple[PolicyRule, ...] = (
    PolicyRule("*/step", pb.POLICY_EXACT, 0),
    PolicyRule("*.step", pb.POLICY_EXACT, 0),  # DCP's dotted names (ckptd.client.dcp)
)
# Every set also keeps other state that must not come back negative in the log domain
# (relative error, never negative; a negative element is stored verbatim), at the set's
# width: RMSprop's ``square_avg``, Adamax's ``exp_inf``, Adagrad's ``sum`` and BatchNorm's
# ``running_var`` (a square root or a division of each; with the threshold at 1 a linear
# lossy delta could bring them back below zero).
NON_NEGATIVE_RULES: tuple[PolicyRule, ...] = (
    PolicyRule("*square_avg", pb.POLICY_LOSSY_LOG, 0),
    PolicyRule("*exp_inf", pb.POLICY_LOSSY_LOG, 0),
    PolicyRule("*/sum", pb.POLICY_LOSSY_LOG, 0),
    PolicyRule("*.sum", pb.POLICY_LOSSY_LOG, 0),
    PolicyRule("*running_var", pb.POLICY_LOSSY_LOG, 0),
)
COMMON_RULES: tuple[PolicyRule, ...] = (*STEP_COUNTER_RULES, *NON_NEGATIVE_RULES)
ADAM_RULES: tuple[PolicyRule, ...] = (
    PolicyRule("*exp_avg_sq", pb.POLICY_LOSSY_LOG, 3),
    PolicyRule("*exp_avg", pb.POLICY_LOSSY_SCALED, 2),
    *COMMON_RULES,
    PolicyRule("*", pb.POLICY_LOSSY, 3),  # the weights: last, the fallback
)
# The SGD set (the state holds ``*momentum_buffer``): LeNet with SGD + momentum, both seeds,
# 87-91 failures per K: the momentum at b2, the weights as the daemon decides (AUTO: its
# shipped b4 with 2 buckets per octave, small tensors lossy): delta 16.8-17.3x / 16.0-17.1x
# per seed at K=10 / K=50, rework 0.85-0.99x exact, 0 of 178 diverged or capped. The other
# candidate, a state-relative adaptive width (budget 0.03), was 14.2x on seed 1 at K=50.
# The momentum is replaced almost wholesale between saves (0.9^10 = 0.35), so b2 restores
# it ~100 % off at no measured rework cost.
SGD_RULES: tuple[PolicyRule, ...] = (
    PolicyRule("*momentum_buffer", pb.POLICY_LOSSY, 2),
    *COMMON_RULES,
)
# Any other state (no optimizer, or one whose state has neither name): today's optimizer
# rules at the daemon's width, every other tensor as the daemon decides (AUTO).
DEFAULT_RULES: tuple[PolicyRule, ...] = (
    PolicyRule("*exp_avg_sq", pb.POLICY_LOSSY_LOG, 0),
    PolicyRule("*exp_avg", pb.POLICY_LOSSY_SCALED, 0),
    *COMMON_RULES,
)
# Which set a save gets: the first whose marker glob matches one of its tensor names and
# whose "unless" glob (if any) matches none. RMSprop with momentum also holds a
# ``momentum_buffer``, but SGD's widths were measured for SGD only: it gets the default set.
# A state holding both Adam's and SGD's names (two optimizers) gets the Adam set.
BUILTIN_SETS: tuple[tuple[str, str, str, tuple[PolicyRule, ...]], ...] = (
    ("adam", "*exp_avg_sq", "", ADAM_RULES),
    ("sgd", "*momentum_buffer", "*square_avg", SGD_RULES),
)


def builtin_rules(names: Iterable[str]) -> tuple[str, tuple[PolicyRule, ...]]:
    """The built-in rule set for a save whose tensors are ``names``: ``("adam", ...)``
    when it holds Adam's second moment, ``("sgd", ...)`` when it holds SGD's momentum
    (and no RMSprop ``square_avg``), else ``("default", DEFAULT_RULES)``."""
    names = tuple(_unsharded(name) for name in names)
    for label, marker, unless, rules in BUILTIN_SETS:
        if any(fnmatch.fnmatchcase(name, marker) for name in names) and not (
                unless and any(fnmatch.fnmatchcase(name, unless) for name in names)):
            return label, rules
    return "default", DEFAULT_RULES


# Where the built-in widths and the daemon defaults they rely on were measured.
EVIDENCE = ("bench/README.md: 'The per-optimizer rule for AdamW' (Adam set), 'Finer buckets "
            "for the weights' (SGD set; daemon bits 4, 2 buckets per octave)")


def describe_builtin() -> list[tuple[str, str]]:
    """The built-in rule sets as ``(name, text)`` rows (``ckptd info``), after a
    ``client_rules`` row saying whose they are: this install's client library, which a
    trainer on another machine (or with another version installed) need not share, since
    each client applies its own rules before the daemon hears of any."""
    rows = [("client_rules",
             f"the built-in rules of the ckptd client library installed here (ckptd "
             f"{installed_version()}), not read from any trainer: a trainer applies those "
             "of the client it has installed")]
    for label, marker, unless, rules in (*BUILTIN_SETS, ("default", "", "", DEFAULT_RULES)):
        when = f"when the state holds {marker}" if marker else "otherwise"
        when += f" and no {unless}" if unless else ""
        rows.append((f"client_rules_{label}",
                     f"{when}: " + ", ".join(f"{r.pattern} {format_spec(r)}" for r in rules)))
    return [*rows, ("client_rules_evidence", EVIDENCE)]


def format_spec(rule: PolicyRule) -> str:
    """A rule's spec as ``parse_spec`` reads it (width 0: none, the daemon's)."""
    kinds: dict[int, str] = {pb.POLICY_EXACT: "exact", pb.POLICY_UNSPECIFIED: "auto",
                             **{v: k for k, v in _LOSSY_KINDS.items()}}
    kind = kinds[rule.policy]
    return f"{kind}:{rule.bits}" if rule.bits and kind not in ("exact", "auto") else kind


def resolve(
    rules: tuple[PolicyRule, ...],
    name: str,
    default_bits: int,
    builtin: tuple[PolicyRule, ...] = DEFAULT_RULES,
    *,
    is_float: bool = True,
) -> tuple[int, int]:
    """Returns (policy, bits) for tensor ``name``: the first of the user's ``rules`` and
    then the ``builtin`` set to match decides. A user rule without a width and every
    built-in rule take ``default_bits`` when it is given (``bits=``); a built-in rule
    otherwise keeps its own width (0: the daemon's); a DCP shard's name (``fqn@offsets``)
    matches every rule as its tensor's too. Exact tensors carry bits 0.

    Lossy rules, the user's and the built-in ones, skip tensors that are not floats
    (``is_float`` False: RNG states, counters, masks), which the daemon stores exactly
    and refuses to be asked to quantize: a glob means "the float tensors it matches".

    Raises:
        InvalidCheckpointError: a user's lossy rule names this non-float tensor by its
            exact name (no wildcard): a request that cannot be honoured, told at save
            rather than ignored.
    """
    unsharded = _unsharded(name)
    for rule in rules:
        if not (fnmatch.fnmatchcase(name, rule.pattern)
                or fnmatch.fnmatchcase(unsharded, rule.pattern)):
            continue
        if not is_float and rule.policy in _LOSSY_POLICIES:
            if not _is_glob(rule.pattern):
                raise InvalidCheckpointError(
                    f"policy rule ({rule.pattern!r}, {format_spec(rule)!r}) names tensor "
                    f"{name!r}, which is not a floating-point tensor; lossy compression "
                    "applies to float tensors only: give it 'exact' or 'auto', or drop "
                    "the rule"
                )
            continue
        return _bits_of(rule, rule.bits or default_bits)
    for rule in builtin:
        if not is_float and rule.policy in _LOSSY_POLICIES:
            continue
        if fnmatch.fnmatchcase(unsharded, rule.pattern):
            return _bits_of(rule, default_bits or rule.bits)
    return pb.POLICY_UNSPECIFIED, default_bits


_LOSSY_POLICIES = frozenset(_LOSSY_KINDS.values())


def _is_glob(pattern: str) -> bool:
    """Whether ``pattern`` holds an ``fnmatch`` wildcard (else it names one tensor)."""
    return any(char in pattern for char in "*?[")


def _unsharded(name: str) -> str:
    """A DCP shard's name (``fqn@offsets``, ``ckptd.client.dcp``) as its tensor's, so a
    shard of Adam's second moment gets the second moment's rule. Only a trailing ``@`` and
    integer offsets are a shard's: any other ``@`` is part of the name."""
    return _SHARD_SUFFIX.sub("", name)


_SHARD_SUFFIX = re.compile(r"@\d+(,\d+)*$")


def _bits_of(rule: PolicyRule, bits: int) -> tuple[int, int]:
    return (rule.policy, 0) if rule.policy == pb.POLICY_EXACT else (rule.policy, bits)
