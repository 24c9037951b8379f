"""The committed generated code matches what ``protos/generate.py`` makes of the .proto."""

from __future__ import annotations

from pathlib import Path

import ckptd.protos.generate as generate_module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    committed_dir = Path(generate_module.PROTO_ROOT) / "ckptd" / "v1"
    fresh = generate_module.generate(tmp_path)
    assert [path.name for path in fresh] == list(generate_module.GENERATED)
    for path in fresh:
        committed = committed_dir / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python protos/generate.py` and commit the result"
        )

