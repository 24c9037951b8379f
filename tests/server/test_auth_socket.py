"""The unix socket's identity rule, and the start-up refusal of an open network port.

gRPC Python cannot read a unix peer's credentials, so the daemon makes its socket 0600 and
names every peer by its own uid (``daemon/server/auth.py``). These tests check the mode,
that another uid is refused by the kernel (as root: a child switches to ``nobody``), that
the owner gets every scope with no credentials (shared-memory saves included) even when
tokens are configured, and that a non-loopback TCP listener without authentication does
not start.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from auth_support import tokens_file
from ckptd.client import Checkpointer
from ckptd.daemon.cli import main as cli_main
from ckptd.daemon.config import DaemonConfig
from ckptd.daemon.server import shm
from ckptd.daemon.server.healthcheck import check
from daemon_harness import InProcessDaemon, start_in_process

NOBODY = 65534
# The child runs as nobody: it needs an interpreter it may execute (not a venv under /root).
PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
               if os.access(p, os.X_OK)), None)
_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # World-traversable (tmp_path is not), so only the socket's own mode keeps others out.
    directory = Path(tempfile.mkdtemp(prefix="ckptd-sock-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path: Path, socket_dir: Path) -> Iterator[InProcessDaemon]:
    tokens = tokens_file(tmp_path / "tokens", {"someone-elses-token-0123": "ci"})
    running = start_in_process(tmp_path / "storage", listen=f"unix://{socket_dir}/ckptd.sock",
                               auth_tokens=str(tokens))
    try:
        yield running
    finally:
        running.stop()


def test_the_socket_is_owner_only_and_removed_on_stop(
    tmp_path: Path, socket_dir: Path
) -> None:
    path = socket_dir / "ckptd.sock"
    running = start_in_process(tmp_path / "storage", listen=f"unix://{path}")
    try:
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert sorted(p.name for p in socket_dir.iterdir()) == ["ckptd.sock"]
    finally:
        running.stop()
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0 or PYTHON is None,
                    reason="needs root (to switch uid) and a python3 outside /root")
def test_another_uid_cannot_connect(daemon: InProcessDaemon, socket_dir: Path) -> None:
    path = socket_dir / "ckptd.sock"

    def connect_as_nobody() -> str:
        return subprocess.run([PYTHON, "-c", _CONNECT, str(path)], user=NOBODY,
                              capture_output=True, text=True, check=True, timeout=30).stdout
    assert connect_as_nobody().strip() == "refused"
    path.chmod(0o666)  # control: the mode alone made the difference
    assert connect_as_nobody().strip() == "connected"


@pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory here")
def test_the_owner_saves_through_shared_memory_without_credentials(
    daemon: InProcessDaemon,
) -> None:
    state = {"w": torch.arange(1 << 12, dtype=torch.float32)}
    with Checkpointer(daemon.address, "owned", transport="shm") as ckpt:
        ckpt.save(1, state).wait_durable(60)
        assert ckpt._worker.transport.name == "shm"
        assert torch.equal(ckpt.restore()["w"], state["w"])
        ckpt.delete_step(1)
    assert check(daemon.address, timeout_s=60) == "SERVING"  # what it answers, not how fast


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "10.1.2.3:50051"])
def test_a_network_listener_without_authentication_refuses_to_start(listen: str) -> None:
    with pytest.raises(ValueError, match=r"without authentication.*--insecure"):
        DaemonConfig(storage_url="/unused", listen=listen)
    DaemonConfig(storage_url="/unused", listen=listen, insecure=True)
    DaemonConfig(storage_url="/unused", listen=listen, auth_tokens="/etc/ckptd/tokens")


def test_ckptd_serve_says_why_it_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["serve", "--storage", "/unused", "--listen", "0.0.0.0:0"], environ={})
    assert code == 2
    assert "refusing to listen on '0.0.0.0:0' without authentication" in capsys.readouterr().err
