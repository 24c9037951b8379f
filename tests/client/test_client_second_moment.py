"""End to end: Adam's second moment, lossy by default, never restores negative.

Through a real daemon and the client's built-in rule (``*exp_avg_sq`` -> lossy-log), on
adversarial values: exact zeros, subnormals, 1e-30 to 1e3, a collapse to zero between
saves, and NaN/Inf/negative elements (stored verbatim, as the codec stores non-finite ones).
"""

from __future__ import annotations

import numpy as np
import torch
from ckptd.daemon.codec import blob_info
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon


def _spanning(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    values = (10.0 ** rng.uniform(-30, 3, 4096)).astype(np.float32)
    values[rng.random(4096) < 0.1] = 0.0
    values[rng.random(4096) < 0.05] = np.float32(1e-40)
    return torch.from_numpy(values)


def _states() -> list[torch.Tensor]:
    odd = _spanning(3) * 1.3
    odd[:4] = torch.tensor([float("nan"), float("inf"), -1.0, -0.0])
    return [_spanning(1), _spanning(1) * 0.5, torch.zeros(4096), _spanning(2),
            torch.full((4096,), 1e-40), odd, _spanning(3)]


def test_lossy_second_moment_restores_non_negative(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(daemon.address, "adam", bits=2)
    states = _states()
    for step, sq in enumerate(states):
        ckpt.save(step, {"optim": {"state": {0: {"exp_avg_sq": sq.clone()}}}})
    ckpt.wait(timeout_s=120)

    lossy_seen = False
    for step, want in enumerate(states):
        got = ckpt.restore(step)["optim"]["state"][0]["exp_avg_sq"]
        inside = ~(torch.isnan(want) | torch.isinf(want) | torch.signbit(want))
        assert not bool(torch.signbit(got[inside]).any()), f"step {step}: negative element"
        assert bool(torch.isfinite(got[inside]).all())
        assert bool((got[want == 0] == 0).all()), f"step {step}: a zero did not survive"
        outside = ~inside
        assert got[outside].numpy().tobytes() == want[outside].numpy().tobytes()
        lossy_seen = lossy_seen or not torch.equal(got, want)
    assert lossy_seen, "no step was stored lossily"
    domains = {blob_info(path.read_bytes()).domain
               for path in daemon.storage_path.rglob("*.blob")
               if blob_info(path.read_bytes()).kind == "delta"}
    assert domains == {"log"}
