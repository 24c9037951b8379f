"""How to store the small float tensors of a delta (issue 16, item 3): measured options.

Tensors under ``min_lossy_elements`` (biases, LayerNorm, LeNet's first conv, Adam's moments
of those) are stored exactly in every delta today. This measures, per checkpoint of the
``lenet`` (SGD) and ``lm`` (AdamW) recovery workloads at K=10, the bytes of their blobs:

* ``exact``: today's exact blob (``encode_exact``: zstd of byte planes);
* ``xor``: the XOR of each element's bit pattern with the previous checkpoint's value,
  byte planes, zstd level 1 (lossless: identical high bytes become zero bytes);
* ``lossy-b<n>``: the lossy delta at width n against the previous checkpoint, with its
  relative L2 error on the tensor.

Usage: ``python -m bench.small_tensors`` (~30 s) -> ``bench/out/small-tensors.json`` and a
summary on stdout.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from ckptd.daemon.codec import encode_delta, encode_exact

from bench.workloads import make_workload

_OUT = Path(__file__).resolve().parent / "out" / "small-tensors.json"
_SMALL = 1024  # EngineConfig.min_lossy_elements
_STEPS, _K = 200, 10
_WIDTHS = (4, 6, 8)


def _small_floats(state: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {f"model/{k}": v for k, v in state["model"].items()}
    for index, moments in state["optim"]["state"].items():
        out.update({f"optim/{index}/{k}": v for k, v in moments.items() if v.dim() > 0})
    return {k: v.detach().numpy().astype(np.float32).reshape(-1) for k, v in out.items()
            if v.is_floating_point() and v.numel() < _SMALL}


def _xor_bytes(current: np.ndarray, previous: np.ndarray) -> int:
    words = current.view(np.uint32) ^ previous.view(np.uint32)
    planes = words.view(np.uint8).reshape(-1, 4).T.copy()  # byte planes, as exact blobs
    return len(zstandard.ZstdCompressor(level=1).compress(planes.tobytes()))


def measure(name: str) -> dict[str, Any]:
    """Bytes of the small tensors of each delta checkpoint under every option."""
    torch.set_num_threads(1)
    trainer = make_workload(name).trainer(0)
    states = []
    for step in range(1, _STEPS + 1):
        trainer.train_step()
        if step % _K == 0:
            states.append(_small_floats(trainer.state()))
    totals: dict[str, list[float]] = {"exact": [], "xor": []}
    errors: dict[str, list[float]] = {}
    for previous, current in itertools.pairwise(states):
        sizes = {"exact": 0, "xor": 0, **{f"lossy-b{b}": 0 for b in _WIDTHS}}
        for key, value in current.items():
            sizes["exact"] += len(encode_exact(value))
            sizes["xor"] += _xor_bytes(value, previous[key])
            domain = "log" if key.endswith("exp_avg_sq") else "linear"
            for b in _WIDTHS:
                blob, recon = encode_delta(value, previous[key], bits=b, domain=domain)
                sizes[f"lossy-b{b}"] += len(blob)
                norm = float(np.linalg.norm(value))
                errors.setdefault(f"lossy-b{b}", []).append(
                    float(np.linalg.norm(recon - value)) / norm if norm else 0.0)
        for option, size in sizes.items():
            totals.setdefault(option, []).append(size)
    count = sum(v.size for v in states[-1].values())
    return {"workload": name, "tensors": len(states[-1]), "elements": count,
            "median_bytes": {k: statistics.median(v) for k, v in totals.items()},
            "median_relative_error": {k: statistics.median(v) for k, v in errors.items()}}


def main() -> int:
    results = [measure(name) for name in ("lenet", "lm")]
    _OUT.parent.mkdir(parents=True, exist_ok=True)
    _OUT.write_text(json.dumps(results, indent=1))
    for r in results:
        sizes = ", ".join(f"{k} {v:.0f} B" for k, v in r["median_bytes"].items())
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["median_relative_error"].items())
        print(f"{r['workload']}: {r['tensors']} small float tensors, {r['elements']} elements; "
              f"median bytes per delta: {sizes}; relative L2 error: {errs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
