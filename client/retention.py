"""``Retention``: which steps of a run the daemon keeps, set from the trainer.

``Checkpointer(..., retention=Retention(keep_last=5, keep_every=1000))`` sends the policy
once, when the checkpointer connects (``SetRetention``); the daemon stores it beside the
run and applies it after every commit, so it outlives the trainer and a restarted daemon
keeps applying it. ``Retention`` is the one record both sides use
(``ckptd.protos.retention.RetentionPolicy``, where the rules are documented). README,
"Retention".
"""

from __future__ import annotations

import math

from ckptd.protos.retention import RetentionPolicy as Retention

__all__ = ["Retention", "check_metrics"]


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
