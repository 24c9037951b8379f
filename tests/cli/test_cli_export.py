"""``ckptd export``: files that load without ckptd and hold what ``restore()`` returns."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from ckptd.client.structure import flatten, unflatten
from cli_support import CliRunner, Store, assert_same_state


@pytest.mark.parametrize("key", [("alpha", 1, 2), ("beta", 0, 20)])
def test_export_pt_loads_as_the_restored_state(
    cli: CliRunner, source: list[str], store: Store, tmp_path: Path, key: tuple[str, int, int]
) -> None:
    run, rank, step = key
    out_file = tmp_path / "step.pt"
    code, out, err = cli("export", run, "--rank", str(rank), "--step", str(step),
                         "-o", str(out_file), *source)
    assert (code, err) == (0, "")
    assert out.startswith(f"exported {run}/rank{rank}/step{step} (3 tensors")
    loaded = torch.load(out_file, weights_only=True)
    assert_same_state(loaded, store.restored[(run, rank, step)])
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_safetensors_keeps_flat_names_and_metadata(
    cli: CliRunner, source: list[str], store: Store, tmp_path: Path
) -> None:
    out_file = tmp_path / "step.safetensors"
    code, _, err = cli("export", "alpha", "--step", "3", "-o", str(out_file), *source)
    assert (code, err) == (0, "")
    expected = store.restored[("alpha", 0, 3)]
    loaded = safetensors.torch.load_file(out_file)
    leaves = {leaf.name: leaf.value for leaf in flatten(expected).leaves}
    assert sorted(loaded) == sorted(leaves)
    for name, tensor in leaves.items():
        assert_same_state(loaded[name], tensor, name)
    assert loaded["model/b"].dtype == torch.bfloat16
    with safetensors.safe_open(out_file, "pt") as f:
        metadata = f.metadata()
    assert (metadata["ckptd.run"], metadata["ckptd.step"]) == ("alpha", "3")
    assert_same_state(unflatten(metadata["ckptd.structure"], loaded), expected)


def test_safetensors_header_is_aligned_and_dtyped(
    cli: CliRunner, source: list[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "x.safetensors"
    assert cli("export", "beta", "-o", str(out_file), *source)[0] == 0
    data = out_file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    assert header["model/b"] == {"dtype": "BF16", "shape": [32], "data_offsets": [8192, 8256]}
    assert header["model/steps_seen"]["dtype"] == "I64"
    assert header["__metadata__"]["ckptd.step"] == "20"  # the latest step by default
    assert len(data) == 8 + length + 8192 + 64 + 8


def test_export_refuses_an_unknown_suffix_before_restoring(
    cli: CliRunner, source: list[str], tmp_path: Path
) -> None:
    code, out, err = cli("export", "alpha", "--step", "1", "-o", str(tmp_path / "x.npz"),
                         *source)
    assert (code, out) == (1, "")
    assert err.startswith("ckptd: error: cannot tell the export format of")
    assert ".safetensors" in err and err.count("\n") == 1
    assert not list(tmp_path.glob("*x.npz*"))
