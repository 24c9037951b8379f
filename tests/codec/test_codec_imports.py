"""The codec is a pure library: importing it pulls in neither gRPC nor asyncio nor the server."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_codec_leaves_server_modules_out() -> None:
    probe = (
        "import json, sys\n"
        "import ckptd.daemon.codec\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, timeout=60)
    modules = set(json.loads(result.stdout))
    assert "ckptd.daemon.codec" in modules
    assert not {m for m in modules if m == "grpc" or m.startswith(("grpc.", "grpc_"))}
    assert "asyncio" not in modules and "uvloop" not in modules
    daemon_modules = {m for m in modules if m.startswith("ckptd.")}
    assert all(m.startswith("ckptd.daemon.codec") for m in daemon_modules - {"ckptd",
                                                                             "ckptd.daemon"})
