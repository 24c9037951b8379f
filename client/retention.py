"""``Retention``: which steps of a run the daemon keeps, set from the trainer.

``Checkpointer(..., retention=Retention(keep_last=5, keep_every=1000))`` sends the policy
once, when the checkpointer connects (``SetRetention``); the daemon stores it beside the
run and applies it after every commit, so it outlives the trainer and a restarted daemon
keeps applying it. The rules mirror Orbax's ``CheckpointManagerOptions``: ``keep_last`` is
``max_to_keep``, ``keep_every`` is ``keep_period``, ``keep_interval_s`` is
``keep_time_interval``, ``keep_best``/``best_metric``/``best_mode`` are
``best_fn``/``best_mode``. A step is kept when any rule keeps it; the latest step always
is; ``max_bytes`` caps the run's stored bytes. README, "Retention".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ckptd.protos.retention import check_policy
from ckptd.protos.v1 import pb


@dataclass(frozen=True)
class Retention:
    """A run's retention policy; a rule left 0 (or empty) is off.

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
        check_policy(self, "Retention")

    def to_proto(self) -> pb.RetentionPolicy:
        return pb.RetentionPolicy(
            keep_last=self.keep_last, keep_every=self.keep_every,
            keep_interval_s=self.keep_interval_s, keep_best=self.keep_best,
            best_metric=self.best_metric, best_mode=self.best_mode, max_bytes=self.max_bytes,
        )

    @classmethod
    def from_proto(cls, message: pb.RetentionPolicy) -> Retention:
        return cls(
            keep_last=message.keep_last, keep_every=message.keep_every,
            keep_interval_s=message.keep_interval_s, keep_best=message.keep_best,
            best_metric=message.best_metric, best_mode=message.best_mode or "min",
            max_bytes=message.max_bytes,
        )


def check_metrics(metrics: object) -> dict[str, float]:
    """Validates ``save(..., metrics=...)``: names to finite numbers."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict of str to float, got {type(metrics).__name__}")
    result = {}
    for name, value in metrics.items():
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else math.nan
        if not isinstance(name, str) or not name or not math.isfinite(number):
            raise ValueError(f"metric {name!r}: {value!r}; metrics map names to finite numbers")
        result[name] = number
    return result


__all__ = ["Retention", "check_metrics"]
