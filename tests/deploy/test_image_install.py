"""The daemon image's install, run for real outside Docker.

The Dockerfile's build stage copies a few paths and runs ``deploy/install-daemon.sh``; this
test copies the same paths (read from the Dockerfile's ``COPY`` lines), runs the same
script into a fresh virtual environment (pip resolves the daemon's dependencies from the
configured index, as the image build does), and checks that the result is the daemon
without torch: it imports, its console script runs, and it serves a health check.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import wait_until
from deploy_files import DOCKERFILE, build_context_copies, copy_like_docker, read_dockerfile
from packaging.requirements import Requirement

INSTALL_TIMEOUT_S = 600
DAEMON_MODULES = (
    "ckptd.daemon.server.app", "ckptd.daemon.cli", "ckptd.daemon.server.healthcheck",
    "ckptd.daemon.server.metrics", "ckptd.protos.v1", "ckptd.daemon.cli.daemon_catalog",
)
# Never in the daemon image: the trainer's framework, and what only tests or extras need.
FORBIDDEN_DISTRIBUTIONS = {"torch", "pytest", "hypothesis", "boto3", "moto", "scikit-learn"}


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment minus what would leak the dev venv into the clean one."""
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("CKPTD_")
    }
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def image_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The virtual environment the image's build stage would produce."""
    root = tmp_path_factory.mktemp("image")
    build_stage = read_dockerfile(DOCKERFILE)[0]
    copy_like_docker(build_context_copies(build_stage), root / "src")
    venv = root / "venv"
    result = subprocess.run(
        ["sh", str(root / "src/deploy/install-daemon.sh"), str(venv), str(root / "src")],
        cwd=root, env=clean_env(PYTHON=sys.executable), capture_output=True, text=True,
        timeout=INSTALL_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, f"install failed:\n{result.stdout}\n{result.stderr}"
    yield venv


def run_in(venv: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], env=clean_env(), capture_output=True,
        text=True, timeout=timeout_s, check=False, cwd=venv,
    )


def test_daemon_dependencies_never_include_torch() -> None:
    """The cheap guard: torch may only come in through an extra."""
    requirements = [Requirement(text) for text in importlib.metadata.requires("ckptd") or []]
    in_extra = {r.name.lower() for r in requirements if "extra" in str(r.marker)}
    core = {r.name.lower() for r in requirements if "extra" not in str(r.marker)}
    assert "torch" not in core
    assert core.isdisjoint(FORBIDDEN_DISTRIBUTIONS)
    assert "torch" in in_extra  # the client extra


@pytest.mark.install
def test_installed_daemon_imports_without_torch(image_env: Path) -> None:
    probe = (
        "import importlib, importlib.metadata as md, sys\n"
        f"for name in {DAEMON_MODULES!r}: importlib.import_module(name)\n"
        "import ckptd.daemon\n"
        "print(ckptd.daemon.__path__[0])\n"
        "print(' '.join(sorted(d.metadata['Name'].lower() for d in md.distributions())))\n"
        "print('torch' in sys.modules)\n"
    )
    result = run_in(image_env, "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    package_dir, distributions, torch_imported = result.stdout.splitlines()
    assert Path(package_dir).is_relative_to(image_env)  # the installed copy, not the checkout
    installed = set(distributions.split())
    assert "ckptd" in installed
    assert installed.isdisjoint(FORBIDDEN_DISTRIBUTIONS), installed & FORBIDDEN_DISTRIBUTIONS
    assert torch_imported == "False"
    assert run_in(image_env, "python", "-c", "import torch").returncode != 0


@pytest.mark.install
def test_entrypoint_serves_and_the_healthcheck_sees_it(image_env: Path, tmp_path: Path) -> None:
    """``ckptd serve`` from the image env, probed the way the image's HEALTHCHECK probes."""
    target = f"unix://{tmp_path / 'ckptd.sock'}"
    ready_file = tmp_path / "ready.json"
    serve = [
        str(image_env / "bin/ckptd"), "serve", "--storage", str(tmp_path / "storage"),
        "--ready-file", str(ready_file),
    ]
    health_module = "ckptd.daemon.server.healthcheck"
    assert run_in(image_env, "python", "-m", health_module, target).returncode == 1
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            serve, env=clean_env(CKPTD_LISTEN=target), stdout=log, stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_until(lambda: ready_file.exists() or proc.poll() is not None, 60, "ready file")
        assert proc.poll() is None, log_path.read_text(errors="replace")
        health = run_in(image_env, "python", "-m", health_module, target)
        assert health.returncode == 0, health.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log_path.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
