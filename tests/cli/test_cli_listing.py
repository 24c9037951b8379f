"""``ckptd ls`` and ``ckptd info``, against a daemon and directly on its storage."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from ckptd.client.structure import flatten
from ckptd.daemon.config import AUTO_BITS, EngineConfig
from cli_support import RUNS, CliRunner, Store, make_state
from daemon_harness import start_in_process


def test_ls_lists_every_run_and_rank(cli: CliRunner, source: list[str]) -> None:
    code, out, _ = cli("ls", "--json", *source)
    assert code == 0
    runs = json.loads(out)
    assert [(r["run"], r["rank"], r["step_count"], r["latest_step"]) for r in runs] == [
        (run, rank, len(steps), steps[-1]) for (run, rank), steps in sorted(RUNS.items())
    ]
    assert all(0 < r["stored_bytes"] < r["raw_bytes"] for r in runs)
    assert all(r["hidden_steps"] == r["hidden_bytes"] == 0 for r in runs)

    code, out, _ = cli("ls", *source)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "RANK", "STEPS", "LATEST", "RAW", "STORED", "RATIO",
                                "HIDDEN", "RETENTION"]
    assert [line.split()[:2] for line in lines[1:]] == [["alpha", "0"], ["alpha", "1"],
                                                         ["beta", "0"]]


def test_ls_run_shows_base_and_delta_steps(cli: CliRunner, source: list[str]) -> None:
    code, out, _ = cli("ls", "alpha", "--json", *source)
    assert code == 0
    ranks = json.loads(out)["ranks"]
    assert sorted(ranks) == ["0", "1"]
    steps = ranks["0"]
    assert [(s["step"], s["kind"], s["parent_step"], s["chain_depth"]) for s in steps] == [
        (1, "base", None, 0), (2, "delta", 1, 1), (3, "delta", 2, 2)]
    delta = steps[1]
    assert delta["compression_ratio"] == delta["raw_bytes"] / delta["stored_bytes"] > 2

    code, out, _ = cli("ls", "alpha", "--rank", "1", *source)
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("1", "1", "base"), ("1", "2", "delta"), ("1", "3", "delta")]
    assert all(row[-2].endswith("x") and row[-1] == "-" for row in rows)  # RATIO, METRICS


def test_info_summarizes_the_source(cli: CliRunner, source: list[str], store: Store) -> None:
    code, out, _ = cli("info", "--json", *source)
    assert code == 0
    info = json.loads(out)
    assert info["storage_url"] == f"file://{store.storage_path}"
    assert (info["runs"], info["chains"], info["steps"]) == ("2", "3", "8")
    assert info["hidden_bytes"] == "0"
    if source[0] == "--target":
        assert info["api_version"] == "ckptd.v1" and info["target"] == store.daemon.address
        # The daemon's config, over the wire (the shipped threshold: every float tensor).
        assert info["lossy_min_elements"] == str(EngineConfig().min_lossy_elements)
    else:
        assert info["access"] == "direct (no daemon)"
    # The client's per-optimizer built-in rules beside the daemon's defaults, with their
    # evidence, labelled as this install's client library's (not a remote trainer's).
    assert info["client_rules"] == (
        f"the built-in rules of the ckptd client library installed here (ckptd "
        f"{metadata.version('ckptd')}), not read from any trainer: a trainer applies those "
        "of the client it has installed")
    assert list(info).index("client_rules") + 1 == list(info).index("client_rules_adam")
    common = ("*/step exact, *.step exact, *square_avg lossy-log, *exp_inf lossy-log, "
              "*/sum lossy-log, *.sum lossy-log, *running_var lossy-log")
    assert info["client_rules_adam"] == (
        "when the state holds *exp_avg_sq: *exp_avg_sq lossy-log:3, *exp_avg lossy-scaled:2, "
        f"{common}, * lossy:3")
    assert info["client_rules_sgd"] == (
        "when the state holds *momentum_buffer and no *square_avg: *momentum_buffer lossy:2, "
        f"{common}")
    assert info["client_rules_default"].startswith("otherwise: *exp_avg_sq lossy-log, ")
    assert "bench/README.md" in info["client_rules_evidence"]
    code, out, _ = cli("info", *source)  # the table says it as plainly
    assert code == 0
    [label] = [line for line in out.splitlines() if line.startswith("client_rules ")]
    assert label.split(None, 1)[1] == info["client_rules"]


def test_info_of_a_step_shows_its_tensor_table(cli: CliRunner, source: list[str]) -> None:
    code, out, _ = cli("info", "alpha", "--step", "2", "--json", *source)
    assert code == 0
    info = json.loads(out)
    assert (info["step"]["step"], info["step"]["kind"]) == (2, "delta")
    flat = flatten(make_state(2))
    assert [(t["name"], t["shape"]) for t in info["tensors"]] == [
        (leaf.name, list(leaf.shape)) for leaf in flat.leaves]
    assert [t["dtype"] for t in info["tensors"]] == ["float32", "bfloat16", "int64"]
    assert info["metadata"]["ckptd.structure"] == flat.structure
    by_name = {t["name"]: t for t in info["tensors"]}
    if source[0] == "--storage":  # only storage knows how each tensor was stored
        assert by_name["model/w"]["encoding"] == "delta"
        assert by_name["model/w"]["stored_bytes"] < by_name["model/w"]["raw_bytes"]
    else:
        assert by_name["model/w"]["encoding"] is None

    code, out, _ = cli("info", "beta", *source)  # the latest step by default
    assert code == 0
    assert out.splitlines()[0].split() == ["step", "beta/rank0/step20"]
    assert any(line.startswith("model/w ") and "float32" in line for line in out.splitlines())


def test_info_shows_an_adaptive_bit_width(cli: CliRunner, tmp_path: Path) -> None:
    engine = EngineConfig(default_bits=AUTO_BITS, auto_bits_max_error=0.25,
                          auto_bits_relative_to="state", buckets_per_octave=2)
    daemon = start_in_process(tmp_path / "storage", engine=engine)
    try:
        code, out, _ = cli("info", "--json", "--target", daemon.address)
    finally:
        daemon.stop()
    assert code == 0
    info = json.loads(out)
    assert (info["default_bits"], info["auto_bits_max_error"], info["auto_bits_relative_to"],
            info["buckets_per_octave"]) == ("auto", "0.25", "state", "2")
