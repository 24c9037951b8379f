"""Smoke test of the codec benchmark: ``bench/codec.py --quick`` runs end to end.

Tiny sizes only (the real run takes minutes); nothing here looks at timings. What it pins:
the CLI works from the repository root, every (optimizer, b, coder) case ran through the
real codec, decode reproduced the encoder's reconstruction, the report carries every
acceptance target, and the README writer replaces only its own section.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench
REPO = Path(__file__).resolve().parents[2]
OTHER_SECTION = "## Storage\n\nnumbers another bench wrote\n"


def run_quick_bench(tmp_path: Path) -> tuple[dict, str]:
    out, readme = tmp_path / "codec.json", tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\n## Codec\n\nstale table\n\n{OTHER_SECTION}")
    proc = subprocess.run(
        [sys.executable, "bench/codec.py", "--quick", "--elements", "50000",
         "--out", str(out), "--readme", str(readme)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), readme.read_text()


def test_quick_codec_bench_reports_every_case(tmp_path: Path) -> None:
    report, readme = run_quick_bench(tmp_path)

    for optimizer in ("sgd", "adam"):
        results = report["digits"][optimizer]["results"]
        assert {(r["bits"], r["coder"]) for r in results} == {
            (b, c) for b in (2, 3, 4) for c in ("zstd", "huffman")
        }
        for r in results:
            assert r["decode_matches_encode"], r
            assert r["ratio_vs_raw"] > 1.0, r
            assert 0.0 <= r["rel_err_u_max"] < 1.0, r
            assert 0.0 <= r["p0"] <= 1.0, r
    synth = report["synthetic"]
    assert synth["elements"] == 50_000
    assert len(synth["results"]) == 6
    for case in synth["results"]:
        assert case["decode_matches_encode"], case
        assert math.isfinite(case["encode_x_zstd1_compress"]), case
        assert case["encode_peak_x_tracemalloc"] > 0.0, case

    names = [t["target"] for t in report["targets"]]
    assert len(names) == 6, names
    assert all(isinstance(t["pass"], bool) for t in report["targets"])

    assert "stale table" not in readme
    assert readme.count("## Codec") == 1
    assert readme.endswith(OTHER_SECTION)
    assert "python bench/codec.py --quick" in readme
