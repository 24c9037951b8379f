"""Adam's first moment in the update's units: a bench-level transform (issue 16, i16n).

What a restore must bring back is Adam's update ``u = m / (sqrt(v) + eps)``, but the LC
delta of ``m`` keeps the largest-magnitude buckets of ``m``'s change, so the elements with
a small ``m`` *and* a small ``v`` (large updates) are the ones it drops. This hands the
``Checkpointer`` ``w = m / (sqrt(v) + eps)`` under ``exp_avg``'s name (same dtype and
shape; ``exp_avg_sq`` and ``step`` untouched; ``v`` the exact ``exp_avg_sq`` the trainer
holds at the save) and turns a restored ``w_hat`` back into ``m = w_hat * (sqrt(v_hat) +
eps)`` with the *restored* ``v_hat``: the restored update's error is then ``w``'s own
quantization error, whatever ``v_hat``'s.

It is opt-in for the recovery harness (``Setting.optim`` ``"upd:<b>[-sq<b'>]"``: ``w`` in
the built-in ``exp_avg`` domain, lossy-scaled; ``"updlin:..."``: linear), not a client
feature: a shipped one would need the sibling ``exp_avg_sq`` at save and at restore, a
marker an older client refuses, and selection restores that pull the sibling
(``bench/README.md``, "The first moment in the update's units").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Adam's default eps: with it, w_hat * (sqrt(v_hat) + eps) / (sqrt(v_hat) + eps) == w_hat.
UPDATE_EPS = 1e-8
PREFIXES = ("upd:", "updlin:")


def _map_moments(state: dict[str, Any],
                 change: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """A copy of a ``{"model", "optim"}`` state whose Adam ``exp_avg`` tensors are
    ``change(exp_avg, exp_avg_sq)``; the input (a reference snapshot, or a restore's
    possibly read-only tensors) is not modified."""
    optim = dict(state["optim"])
    moments = {}
    for index, entry in optim.get("state", {}).items():
        moments[index] = entry
        if "exp_avg" in entry and "exp_avg_sq" in entry:
            m = entry["exp_avg"]
            moments[index] = {**entry, "exp_avg": change(m.double(),
                                                         entry["exp_avg_sq"].double()).to(m.dtype)}
    optim["state"] = moments
    return {**state, "optim": optim}


def to_update_units(state: dict[str, Any], eps: float = UPDATE_EPS) -> dict[str, Any]:
    """What is saved: each ``exp_avg`` replaced by ``exp_avg / (sqrt(exp_avg_sq) + eps)``."""
    return _map_moments(state, lambda m, v: m / (v.sqrt() + eps))


def from_update_units(state: dict[str, Any], eps: float = UPDATE_EPS) -> dict[str, Any]:
    """What training resumes with: each restored ``w_hat`` times ``sqrt(v_hat) + eps``."""
    return _map_moments(state, lambda w, v: w * (v.sqrt() + eps))


def uses_update_units(optim: str) -> bool:
    """Whether a ``Setting.optim`` value asks for this transform."""
    return optim.startswith(PREFIXES)
