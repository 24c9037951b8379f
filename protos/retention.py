"""The rule a retention policy's fields must follow, shared by the client's ``Retention``
and the daemon's ``RetentionPolicy`` so that both refuse the same policies alike."""

from __future__ import annotations

import math
from typing import Any

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
