"""Regenerate the Python gRPC code from ``protos/ckptd/v1/ckptd.proto``.

Run ``python protos/generate.py`` after editing the ``.proto``; the generated modules are
committed so that users need no ``grpcio-tools``. ``tests/server/test_daemon_protos.py``
fails when they are stale. ``protoc`` writes absolute imports
(``from ckptd.v1 import ckptd_pb2``) that only resolve with the proto root on ``sys.path``;
they are rewritten as relative imports so the modules live inside the ``ckptd.protos``
package.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "ckptd/v1/ckptd.proto"
GENERATED = ("ckptd_pb2.py", "ckptd_pb2.pyi", "ckptd_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Writes the generated modules under ``out_root/ckptd/v1`` and returns their paths."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}")
    paths = [out_root / "ckptd" / "v1" / name for name in GENERATED]
    grpc_module = paths[2]
    text = re.sub(
        r"^from ckptd\.v1 import ckptd_pb2 as", "from . import ckptd_pb2 as",
        grpc_module.read_text(), flags=re.MULTILINE,
    )
    grpc_module.write_text(text)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTO_ROOT / "ckptd" / "v1" / path.name)
            print(f"wrote protos/ckptd/v1/{path.name}")


if __name__ == "__main__":
    main()
