"""Readers for the deploy files that the deploy tests share (plain module, no pytest).

The Dockerfile reader is deliberately small: it understands what our Dockerfiles use
(comments, parser directives, line continuations, ``FROM ... AS name``) and no more.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
TRAINER_DOCKERFILE = DEPLOY / "trainer.Dockerfile"
INSTALL_SCRIPT = DEPLOY / "install-daemon.sh"
# What the build context must never carry into an image.
CONTEXT_JUNK = ("__pycache__", "*.pyc", "*.egg-info", ".mypy_cache", ".ruff_cache")


@dataclass
class Stage:
    """One ``FROM`` stage: its base image, name, and instructions as (KEYWORD, args)."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def read_dockerfile(path: Path) -> list[Stage]:
    """Parses a Dockerfile into stages, with ``${ARG}`` in FROM resolved to the defaults
    of the ``ARG`` lines before the first FROM."""
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for keyword, args in _instructions(path.read_text()):
        if keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], args).split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
    return stages


def _instructions(text: str) -> list[tuple[str, str]]:
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    result = []
    for entry in logical:
        keyword, _, args = entry.partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
    return result


def build_context_copies(stage: Stage) -> list[tuple[str, str]]:
    """(source, destination) pairs of the stage's ``COPY`` from the build context."""
    pairs: list[tuple[str, str]] = []
    for args in stage.args("COPY"):
        words = args.split()
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        pairs.extend((source, words[-1]) for source in words[:-1])
    return pairs


def copy_like_docker(pairs: list[tuple[str, str]], workdir: Path) -> None:
    """Copies build-context paths into ``workdir`` the way ``COPY`` places them."""
    for source, dest in pairs:
        origin = REPO / source
        target = workdir / dest
        if origin.is_dir():
            shutil.copytree(
                origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*CONTEXT_JUNK)
            )
        else:
            if dest.endswith("/"):
                target = target / origin.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


def project_version() -> str:
    """The ``[project] version`` of pyproject.toml (the tag the manifests' images carry)."""
    match = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert match is not None, "pyproject.toml has no version line"
    return match.group(1)
