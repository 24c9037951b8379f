"""docs/ARCHITECTURE.md names only paths that exist, so a moved or renamed file fails here.

Every inline code span that looks like a repository path (it contains ``/`` or ends in
``.py``, ``.proto``, ``.md`` or ``.toml``) must exist relative to the repository root.
Fenced blocks (diagrams, the key layout) and spans that are not repository paths are
skipped: URLs (``s3://...``), templates (``{run}``, ``<storage>``), globs, absolute paths
and shell commands. Imports nothing of ckptd.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+)`")
_SUFFIXES = (".py", ".proto", ".md", ".toml")
_NOT_A_PATH = re.compile(r"://|[\s{}<>*?\[\]|$]")


def path_tokens(markdown: str) -> list[str]:
    """The inline code spans of ``markdown`` that name repository paths, in order."""
    text = _FENCE.sub("", markdown)
    tokens = []
    for span in _SPAN.findall(text):
        if _NOT_A_PATH.search(span) or span.startswith(("/", "~", "-")):
            continue
        if "/" in span or span.endswith(_SUFFIXES):
            tokens.append(span)
    return tokens


def missing_paths(markdown: str, root: Path) -> list[str]:
    return sorted({token for token in path_tokens(markdown) if not (root / token).exists()})


def test_path_tokens_skip_what_is_not_a_repository_path() -> None:
    sample = (
        "`daemon/engine/core.py` `client/` `pyproject.toml` `s3://bucket/prefix` "
        "`runs/{run}/manifest.json` `<storage>/.ckptd.lock` `tests/*.py` `/dev/shm` "
        "`Engine.open_save` `grep -rl x daemon` `.ckptd.lock`\n"
        "```\n`daemon/not/here.py`\n```\n"
    )
    assert path_tokens(sample) == ["daemon/engine/core.py", "client/", "pyproject.toml"]


def test_missing_paths_names_them() -> None:
    sample = "`daemon/engine/core.py` and `daemon/engine/nowhere.py`"
    assert missing_paths(sample, ROOT) == ["daemon/engine/nowhere.py"]


def test_every_path_the_architecture_doc_names_exists() -> None:
    markdown = DOC.read_text(encoding="utf-8")
    assert len(path_tokens(markdown)) > 50  # the parser still finds the doc's paths
    missing = missing_paths(markdown, ROOT)
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"
