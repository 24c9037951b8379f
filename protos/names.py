"""Names both sides of the wire check by one rule: run names, ranks, steps, daemon targets.

The client checks a run name before it connects and the daemon checks it again before it
becomes a storage path segment; both ask ``run_name_problem`` so that they can never
disagree. ``normalize_target`` turns whatever a user typed as a daemon address (a CLI
flag, ``CKPTD_TARGET``, ``Checkpointer(target)``, ``CKPTD_LISTEN`` for a health probe) into
what gRPC dials. Stdlib only.
"""

from __future__ import annotations

import re

RUN_NAME_RULE = "1-128 characters from [A-Za-z0-9._-], not starting with '.'"
_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MAX_RANK = 2**32 - 1  # uint32 on the wire
MAX_STEP = 2**64 - 1  # uint64 on the wire
# A probe or client given the wildcard address a daemon listens on dials loopback instead.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}


def run_name_problem(run: object) -> str | None:
    """Returns why ``run`` cannot name a run (it becomes a storage path segment), or None."""
    if isinstance(run, str) and _RUN_NAME.fullmatch(run):
        return None
    shown = f"{run[:64]!r}... ({len(run)} characters)" if isinstance(run, str) and len(
        run) > 64 else repr(run)
    return f"invalid run name {shown}: use {RUN_NAME_RULE}"


def normalize_target(target: str) -> str:
    """Returns the gRPC target for a daemon address.

    ``host:port`` and ``unix:`` targets pass through; a bare absolute path is a Unix
    socket; the wildcard hosts ``0.0.0.0``/``[::]`` (and an empty host) become loopback.

    Raises:
        ValueError: ``target`` is empty or not a string.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(
            f"daemon target must be 'host:port' or 'unix:///path/to/socket', got {target!r}"
        )
    target = target.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return target
    if target.startswith("/"):
        return f"unix:{target}"
    host, sep, port = target.rpartition(":")
    if sep and host in _WILDCARDS:
        return f"{_WILDCARDS[host]}:{port}"
    return target
