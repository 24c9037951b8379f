"""A 50-delta chain from a real (tiny) training run does not drift: each delta is taken
against the previous reconstruction, so quantization error never accumulates."""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.daemon.codec import decode_delta, encode_delta
from sklearn.datasets import load_digits


def _adam_snapshots(count: int, steps_between: int) -> dict[str, list[np.ndarray]]:
    """Weights and Adam moments of a 64-64-10 tanh MLP on digits, after every few steps."""
    features, labels = load_digits(return_X_y=True)
    x_all = (features / 16).astype(np.float32)
    y_all = np.eye(10, dtype=np.float32)[labels]
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((64, 64)).astype(np.float32) * np.float32(0.1),
              rng.standard_normal((64, 10)).astype(np.float32) * np.float32(0.1)]
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    snaps: dict[str, list[np.ndarray]] = {"w1": [], "w2": [], "m1": [], "v1": []}
    step = 0
    for _ in range(count):
        for _ in range(steps_between):
            step += 1
            batch = rng.integers(0, len(x_all), 64)
            x, y = x_all[batch], y_all[batch]
            hidden = np.tanh(x @ params[0])
            logits = hidden @ params[1]
            prob = np.exp(logits - logits.max(1, keepdims=True))
            prob /= prob.sum(1, keepdims=True)
            g2 = hidden.T @ (prob - y) / 64
            g1 = x.T @ ((prob - y) @ params[1].T * (1 - hidden * hidden)) / 64
            for i, grad in enumerate((g1, g2)):
                first[i] = 0.9 * first[i] + 0.1 * grad
                second[i] = 0.999 * second[i] + 0.001 * grad * grad
                update = (first[i] / (1 - 0.9**step)) / (np.sqrt(second[i] / (1 - 0.999**step))
                                                          + 1e-8)
                params[i] = (params[i] - 3e-3 * update).astype(np.float32)
        snaps["w1"].append(params[0].copy())
        snaps["w2"].append(params[1].copy())
        snaps["m1"].append(first[0].astype(np.float32))
        snaps["v1"].append(second[0].astype(np.float32))
    return snaps


@pytest.fixture(scope="module")
def snapshots() -> dict[str, list[np.ndarray]]:
    return _adam_snapshots(51, 4)


@pytest.mark.parametrize("name", ["w1", "w2", "m1", "v1"])
def test_chain_error_stays_at_single_step_level(snapshots: dict[str, list[np.ndarray]],
                                                name: str) -> None:
    series = snapshots[name]
    recon = series[0].copy()  # the base is stored exactly
    naive = series[0].copy()
    chain_err, single_err, naive_err = [], [], []
    for t in range(1, len(series)):
        blob, new_recon = encode_delta(series[t], recon)
        assert decode_delta(blob, recon).tobytes() == new_recon.tobytes()
        recon = new_recon
        chain_err.append(float(np.linalg.norm(series[t] - recon)))
        # One step quantized against the true previous value: the reference error level.
        _, one_step = encode_delta(series[t], series[t - 1])
        single_err.append(float(np.linalg.norm(series[t] - one_step)))
        # What chaining against the true previous value would do: errors add up.
        naive = naive + (one_step - series[t - 1])
        naive_err.append(float(np.linalg.norm(series[t] - naive)))
    chain, single = np.array(chain_err), np.array(single_err)
    # Within a constant factor of one step's quantization error, at every step (measured
    # <= 1.71x here), and no growth with t.
    assert np.all(chain <= 2.5 * single)
    assert chain[-10:].mean() <= 1.5 * chain[:10].mean()
    # The test can tell drift apart: the naive chain does drift on the same data.
    assert np.mean(naive_err[-10:]) > 3 * chain[-10:].mean()
