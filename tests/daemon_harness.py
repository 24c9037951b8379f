"""Real daemons for tests: in-process (own thread and loop) or as a subprocess.

Plain module (no pytest) so that conftest fixtures and other tests can share it. Readiness
is a condition polled with a deadline, never a sleep: the in-process daemon returns once
it serves, and the subprocess writes its ready file only after it is bound and serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ckptd.daemon.engine.core import Engine
    from ckptd.daemon.server.app import RunningDaemon

T = TypeVar("T")
READY_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.02


@dataclass
class InProcessDaemon:
    """A daemon served on a thread of the test process."""

    running: RunningDaemon
    storage_path: Path

    @property
    def address(self) -> str:
        return self.running.address

    def call(self, fn: Callable[[Engine], T]) -> T:
        """Runs ``fn(engine)`` on the daemon's loop (e.g. ``lambda e: e.inflight_bytes``)."""
        return self.running.call(fn)

    def stop(self) -> None:
        self.running.stop()


def start_in_process(storage_path: Path, **config: Any) -> InProcessDaemon:
    """Starts a daemon on 127.0.0.1:0 storing under ``storage_path``; ``config`` overrides
    ``DaemonConfig`` fields (``engine=EngineConfig(...)`` included)."""
    from ckptd.daemon.config import DaemonConfig
    from ckptd.daemon.server.app import serve_in_thread

    settings: dict[str, Any] = {"listen": "127.0.0.1:0", "drain_timeout_s": 60.0}
    settings.update(config)
    running = serve_in_thread(DaemonConfig(storage_url=str(storage_path), **settings))
    return InProcessDaemon(running, storage_path)


@dataclass
class DaemonProcess:
    """A ``python -m ckptd.daemon.cli serve`` subprocess that reported ready."""

    proc: subprocess.Popen[bytes]
    address: str
    storage_path: Path
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout_s: float = 60.0) -> int:
        """Sends SIGTERM and waits for the exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> int:
        """Sends SIGKILL (a crash: no drain, no cleanup) and reaps the process."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(30)

    def log(self) -> str:
        """Everything the daemon printed (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")


SpawnDaemon = Callable[..., DaemonProcess]
"""The ``spawn_daemon`` fixture: ``(storage_path, *extra_args, env=None) -> DaemonProcess``."""


def spawn(
    storage_path: Path,
    workdir: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> DaemonProcess:
    """Starts a daemon subprocess on 127.0.0.1:0 and waits until its ready file appears.

    ``extra_args`` come after the defaults, so ``--listen`` there wins. The child gets the
    parent's environment without any ``CKPTD_*`` variable, plus ``env``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{time.monotonic_ns()}"
    ready_file = workdir / f"ready-{tag}.json"
    log_path = workdir / f"daemon-{tag}.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    child_env.update(env or {})
    cmd = [
        sys.executable, "-m", "ckptd.daemon.cli", "serve",
        "--storage", str(storage_path), "--listen", "127.0.0.1:0",
        "--ready-file", str(ready_file), *extra_args,
    ]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env)
    try:
        info = _wait_ready(proc, ready_file, log_path, ready_timeout_s)
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise
    return DaemonProcess(proc, info["address"], storage_path, log_path, info)


def _wait_ready(
    proc: subprocess.Popen[bytes], ready_file: Path, log_path: Path, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready_file.exists():
            info: dict[str, Any] = json.loads(ready_file.read_text())
            return info
        if proc.poll() is not None:
            raise RuntimeError(
                f"daemon exited with {proc.returncode} before it was ready:\n"
                f"{log_path.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(
        f"daemon not ready after {timeout_s} s:\n{log_path.read_text(errors='replace')[-4000:]}"
    )


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    """Polls ``condition`` until it holds; raises ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(POLL_INTERVAL_S)


def stored_blob_key(storage_root: Path, run: str, rank: int, step: int, index: int) -> str:
    """The key of tensor ``index``'s blob of a committed step in local storage at
    ``storage_root``, read from its manifest: each save names its blobs with its own tag."""
    from ckptd.daemon.domain import StepKey
    from ckptd.daemon.store.manifest import Manifest, manifest_key

    key = manifest_key(StepKey(run, rank, step))
    return Manifest.from_bytes((storage_root / key).read_bytes(), key).tensors[index].blob_key
