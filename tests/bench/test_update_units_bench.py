"""``bench/update_units.py``: Adam's first moment saved in the update's units (issue 16).

Through a real daemon on port 0 and a real ``Checkpointer``: the harness's save hands the
daemon ``w = m / (sqrt(v) + eps)`` under ``exp_avg``'s name, its restore gives training
back ``m``; with lossy moments the restored update is ``w_hat`` itself, whatever the
restored second moment's error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ckptd.client import Checkpointer
from ckptd.daemon.server.app import serve_in_thread

from bench.auto_budget import fine_settings
from bench.first_moment import code_update
from bench.recovery_ckptd import Setting, _restorer, client_policies, daemon_config
from bench.update_units import UPDATE_EPS, from_update_units, to_update_units


def _adam_state(seed: int) -> dict[str, Any]:
    """A small model after a few AdamW steps: moments over many octaves, a 2000-element
    matrix (lossy under the daemon's 1024-element threshold) and a bias."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(50, 40)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(8, 50) * torch.logspace(-4, 1, 50)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optim": optimizer.state_dict()}


def _update(entry: dict[str, torch.Tensor]) -> torch.Tensor:
    return entry["exp_avg"].double() / (entry["exp_avg_sq"].double().sqrt() + UPDATE_EPS)


def test_transform_leaves_its_input_and_the_rest_of_the_state_alone() -> None:
    state = _adam_state(0)
    m = state["optim"]["state"][0]["exp_avg"].clone()
    saved = to_update_units(state)
    assert torch.equal(state["optim"]["state"][0]["exp_avg"], m)  # the snapshot untouched
    entry = saved["optim"]["state"][0]
    assert entry["exp_avg"].dtype == m.dtype and entry["exp_avg"].shape == m.shape
    assert torch.allclose(entry["exp_avg"].double(), _update(state["optim"]["state"][0]))
    assert entry["exp_avg_sq"] is state["optim"]["state"][0]["exp_avg_sq"]
    assert saved["model"] is state["model"]
    back = from_update_units(saved)["optim"]["state"][0]["exp_avg"]
    assert torch.allclose(back, m, rtol=1e-6, atol=0)


def test_settings_code_w_in_the_first_moments_domain(tmp_path: Path) -> None:
    [scaled, linear] = fine_settings(["4:2"], [50], [1], ["upd:2-sq3", "updlin:3"], True)
    assert scaled.name == "fine2-b4-K50-minlossy1-optim-upd2-sq3"
    assert client_policies(scaled, False)[1:3] == [("optim/state/*/exp_avg_sq", "lossy-log:3"),
                                                   ("optim/state/*/exp_avg", "lossy-scaled:2")]
    assert ("optim/state/*/exp_avg", "lossy:3") in client_policies(linear, False)
    assert daemon_config(scaled, tmp_path).engine.buckets_per_octave == 2


def _save_and_restore(tmp_path: Path, optim: str) -> tuple[dict, dict, dict]:
    """(the state, what the daemon restores, what training resumes with) of one base and
    one delta saved through a real daemon with ``optim``'s policies."""
    setting = Setting("upd", "test", 10, 2, optim=optim, min_lossy_elements=1024)
    first, state = _adam_state(1), _adam_state(2)
    with serve_in_thread(daemon_config(setting, tmp_path / "store")) as daemon, Checkpointer(
        daemon.address, "upd", bits=2, policies=client_policies(setting, False),
    ) as checkpointer:
        for step, snapshot in ((10, first), (20, state)):
            checkpointer.save(step, to_update_units(snapshot))
        checkpointer.wait()
        stored = checkpointer.restore(20)
        resumed = _restorer(checkpointer, True)(20)
    return state, stored, resumed


def test_restore_gives_training_the_first_moment_back(tmp_path: Path) -> None:
    state, stored, resumed = _save_and_restore(tmp_path, "exact")
    for index, entry in state["optim"]["state"].items():
        w = stored["optim"]["state"][index]["exp_avg"]
        assert torch.allclose(w.double(), _update(entry), rtol=1e-6, atol=0)
        assert torch.allclose(resumed["optim"]["state"][index]["exp_avg"], entry["exp_avg"],
                              rtol=1e-6, atol=0)


def test_restored_update_is_the_restored_w_whatever_v_hat(tmp_path: Path) -> None:
    state, stored, resumed = _save_and_restore(tmp_path, "upd:2")
    entry = state["optim"]["state"][0]  # the 2000-element matrix: lossy
    back, raw = resumed["optim"]["state"][0], stored["optim"]["state"][0]
    assert not torch.equal(back["exp_avg_sq"], entry["exp_avg_sq"])  # v_hat is lossy
    assert not torch.equal(raw["exp_avg"].double(), _update(entry).float().double())
    assert torch.allclose(_update(back), raw["exp_avg"].double(), rtol=1e-6, atol=0)


def test_offline_update_coding_matches_the_identity() -> None:
    """``bench.first_moment``'s ``update-*`` options: the restored ``m`` over
    ``sqrt(v_rec) + eps`` is the reconstruction of ``w`` the chain keeps."""
    rng = np.random.default_rng(3)
    v = (10.0 ** rng.uniform(-12, -2, 4096)).astype(np.float32)
    m = (rng.standard_normal(4096) * np.sqrt(v)).astype(np.float32)
    w_prev = (m / (np.sqrt(v) + UPDATE_EPS) * 0.9).astype(np.float32)
    v_rec = (v * rng.uniform(0.7, 1.4, 4096)).astype(np.float32)
    size, m_rec, w_rec = code_update(m, v, v_rec, w_prev, bits="2", alpha="codec")
    assert 0 < size < m.nbytes / 4
    assert np.allclose(m_rec / (np.sqrt(v_rec.astype(np.float64)) + UPDATE_EPS), w_rec,
                       rtol=1e-6, atol=0)
