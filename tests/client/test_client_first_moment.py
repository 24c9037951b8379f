"""End to end: Adam's first moment goes through the scaled-reference domain by default.

Through a real daemon and the client's built-in rule (``*exp_avg`` -> lossy-scaled): an
embedding-like first moment whose idle rows decay between saves (``m <- 0.9^10 m``) comes
back decayed, not stale, and the manifest records the policy.
"""

from __future__ import annotations

import numpy as np
import torch
from ckptd.daemon.codec import blob_info
from ckptd.daemon.domain import Policy
from ckptd.daemon.store.manifest import Manifest
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon


def _states(saves: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """(256, 512) first moments: every save, a few rows get a fresh gradient, all decay;
    and the rows idle since the first save, at each save."""
    rng = np.random.default_rng(0)
    m = (rng.standard_normal((256, 512)) * 1e-3).astype(np.float32)
    out, idle = [m.copy()], [np.ones(256, bool)]
    for _ in range(saves - 1):
        m = m * np.float32(0.9**10)
        rows = rng.choice(256, 16, replace=False)
        m[rows] += (rng.standard_normal((16, 512)) * 1e-2).astype(np.float32)
        out.append(m.copy())
        idle.append(idle[-1] & ~np.isin(np.arange(256), rows))
    return [torch.from_numpy(state) for state in out], idle


def test_first_moment_restores_decayed_through_the_scaled_domain(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(daemon.address, "adam-m", bits=2)
    states, idle = _states(5)
    for step, m in enumerate(states):
        ckpt.save(step, {"optim": {"state": {0: {"exp_avg": m.clone()}}}})
    ckpt.wait(timeout_s=120)

    for step, want in enumerate(states):
        got = ckpt.restore(step)["optim"]["state"][0]["exp_avg"]
        assert bool(torch.isfinite(got).all())
        # The idle rows' change is far below the fresh rows': a linear delta drops it and
        # they stay stale, 1 / 0.35^k too large (185% off after one save); scaled, they
        # decay.
        rows = torch.from_numpy(idle[step])
        error = float(torch.linalg.norm(got[rows] - want[rows]) / torch.linalg.norm(want[rows]))
        assert error < 0.2, f"step {step}: idle rows' relative error {error:.3f}"
    blobs = [path.read_bytes() for path in daemon.storage_path.rglob("*.blob")]
    assert {blob_info(b).domain for b in blobs if blob_info(b).kind == "delta"} == {"scaled"}
    manifests = [Manifest.from_bytes(p.read_bytes(), str(p))
                 for p in daemon.storage_path.rglob("manifest.json")]
    assert len(manifests) == len(states)
    assert {spec.policy for m in manifests for spec in m.specs} == {Policy.LOSSY_SCALED}
