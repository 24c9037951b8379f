"""``RetentionPolicy``: which steps of a run the daemon keeps — one record for both sides.

The trainer sets it (``ckptd.client.Retention`` is this class), the daemon stores it beside
the run and applies it after every commit (``ckptd.daemon.store.retention``), the CLI shows
it. The rules mirror Orbax's ``CheckpointManagerOptions``: ``keep_last`` is ``max_to_keep``,
``keep_every`` is ``keep_period``, ``keep_interval_s`` is ``keep_time_interval``,
``keep_best``/``best_metric``/``best_mode`` are ``best_fn``/``best_mode``. Its wire form is
``ckptd.v1.RetentionPolicy``; this module imports the generated messages only, never gRPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ckptd.protos.ckptd.v1 import ckptd_pb2 as pb

BEST_MODES = ("min", "max")
COUNT_FIELDS = ("keep_last", "keep_every", "keep_best", "max_bytes")


def check_policy(policy: Any, owner: str) -> None:
    """Raises ``ValueError`` naming ``owner.field`` for the first bad rule of ``policy``."""
    for name in COUNT_FIELDS:
        value = getattr(policy, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}.{name} must be an int >= 0, got {value!r}")
    interval = policy.keep_interval_s
    if not (interval >= 0 and math.isfinite(interval)):
        raise ValueError(f"{owner}.keep_interval_s must be finite and >= 0, got {interval}")
    if policy.best_mode not in BEST_MODES:
        raise ValueError(f"{owner}.best_mode must be one of {BEST_MODES}, "
                         f"got {policy.best_mode!r}")
    if policy.keep_best and not policy.best_metric:
        raise ValueError(f"{owner}.keep_best={policy.keep_best} needs best_metric, the name "
                         "of a metric passed to save(..., metrics=...)")


@dataclass(frozen=True)
class RetentionPolicy:
    """A run's retention policy; a rule left 0 (or empty) is off.

    A step is kept when any rule keeps it; the latest step always is; a policy with every
    ``keep_*`` rule off keeps every step.

    Attributes:
        keep_last: Keep the newest N steps of each rank.
        keep_every: Keep steps that are multiples of M, forever.
        keep_interval_s: Keep the oldest step, then each step committed at least this many
            seconds after the last step this rule kept.
        keep_best: Keep the K steps with the best ``best_metric`` (passed with
            ``save(..., metrics={...})``; steps without it are not ranked).
        best_metric: The metric ``keep_best`` ranks by.
        best_mode: ``"min"`` (lower is better, a loss) or ``"max"`` (an accuracy).
        max_bytes: Cap on the run's stored bytes, all ranks together: its oldest steps are
            deleted even where another rule would keep them (never the latest step).
    """

    keep_last: int = 0
    keep_every: int = 0
    keep_interval_s: float = 0.0
    keep_best: int = 0
    best_metric: str = ""
    best_mode: str = "min"
    max_bytes: int = 0

    def __post_init__(self) -> None:
        check_policy(self, "retention")

    @property
    def prunes(self) -> bool:
        """Whether the policy may delete anything at all."""
        keeps_some = self.keep_last or self.keep_every or self.keep_interval_s or self.keep_best
        return bool(keeps_some or self.max_bytes)

    def describe(self) -> str:
        """One line for ``ckptd ls``/``info`` and logs, the rules that are on."""
        parts = [f"{name}={getattr(self, name)}" for name in
                 ("keep_last", "keep_every", "keep_interval_s", "keep_best", "max_bytes")
                 if getattr(self, name)]
        if self.keep_best:
            parts.append(f"best={self.best_mode}({self.best_metric})")
        return " ".join(parts) or "keep all"

    def to_message(self) -> pb.RetentionPolicy:
        return pb.RetentionPolicy(
            keep_last=self.keep_last, keep_every=self.keep_every,
            keep_interval_s=self.keep_interval_s, keep_best=self.keep_best,
            best_metric=self.best_metric, best_mode=self.best_mode, max_bytes=self.max_bytes,
        )

    @classmethod
    def from_message(cls, message: pb.RetentionPolicy) -> RetentionPolicy:
        """Raises ``ValueError`` naming a rule the policy cannot have."""
        return cls(
            keep_last=message.keep_last, keep_every=message.keep_every,
            keep_interval_s=message.keep_interval_s, keep_best=message.keep_best,
            best_metric=message.best_metric, best_mode=message.best_mode or "min",
            max_bytes=message.max_bytes,
        )
