"""``bench/log_exceptions.py``: where a log-domain second moment's bytes go.

The counts come from the blobs themselves (their exception lists and coded symbols), so a
chain of real states (LM, trained here) must account for every byte it reports, and a
synthetic second moment whose buckets are known splits its exceptions as built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ckptd.daemon.codec import encode_delta

from bench.log_exceptions import exceptions, measure
from tests.bench.bench_support import run_bench

_OCTAVE = 1 << 23


def _state(v: np.ndarray, step: int) -> dict:
    moments = {"exp_avg": torch.from_numpy(np.sqrt(v)), "exp_avg_sq": torch.from_numpy(v),
               "step": torch.tensor(float(step))}
    return {"optim": {"state": {0: moments}}}


def test_exceptions_are_split_by_their_bucket() -> None:
    rng = np.random.default_rng(0)
    reference = (10.0 ** rng.uniform(-6, -4, 4000)).astype(np.float32)
    current = reference * rng.uniform(0.9, 1.1, reference.size).astype(np.float32)
    jumped = rng.choice(reference.size, 40, replace=False)
    current[jumped] *= np.float32(1e6)  # ~20 octaves: a kept bucket, its stragglers verbatim
    vanished = rng.choice(np.setdiff1d(np.arange(reference.size), jumped), 30, replace=False)
    current[vanished] = 0.0  # collapses to zero: a step no bucket at b=1 keeps
    blob, _ = encode_delta(current, reference, bits=1, domain="log")
    counts = exceptions(current, reference, blob)
    assert counts["bit_elements"] == current.size  # b=1
    assert counts["exceptions"] == counts["exceptions_dropped_bucket"] + counts[
        "exceptions_kept_bucket"]
    assert counts["exceptions_dropped_bucket"] >= 30
    assert counts["exceptions_step_over_an_octave"] == counts["exceptions"]
    assert counts["symbol_bytes"] + counts["exception_bytes"] < len(blob)
    assert counts["elements"] == current.size


def test_a_chain_reports_each_delta_and_width() -> None:
    rng = np.random.default_rng(1)
    v0 = (10.0 ** rng.uniform(-8, -4, 3000)).astype(np.float32)
    states = [(50 * i, _state(v0 * np.float32(0.08 ** (i - 1)), 50 * i)) for i in (1, 2, 3)]
    rows = measure(iter(states), [2, 3], {0: "mlp"})
    assert [(r["step"], r["bits"]) for r in rows] == [(100, 2), (100, 3), (150, 2), (150, 3)]
    for row in rows:  # every element decayed 3.6 octaves: one bucket, no exception at all
        assert row["exceptions"] == 0
        assert set(row["update_error"]) == {"mlp"}
        assert row["update_error"]["mlp"] < 0.5


@pytest.mark.bench
def test_end_to_end_on_a_trained_lm(tmp_path: Path) -> None:
    out = tmp_path / "lx.json"
    printed, result = run_bench("log_exceptions", out, "--workload", "lm", "--steps", "20",
                                "--every", "10", "--bits", "2")
    [row] = result["rows"]
    assert (row["step"], row["bits"]) == (20, 2)
    assert row["blob_bytes"] > row["symbol_bytes"] + row["exception_bytes"]
    assert "| 20 | 2 |" in printed and out.with_suffix(".md").is_file()
