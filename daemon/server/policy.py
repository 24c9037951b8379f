"""Who may do what: the bearer-token table and the scope policy (no gRPC here).

Both files are read once at start (``load_tokens``, ``load_policy``); a change needs a
restart (SECURITY.md, "Rotation"). ``daemon/server/auth.py`` asks them on every call.

**Tokens** (``--auth-tokens FILE``): one token per line, ``<sha256 hex of the token>
<identity>``; ``#`` starts a comment. Only hashes are at rest, so the file (and a leaked
copy of it) cannot be replayed; ``ckptd token new IDENTITY`` prints a fresh token and its
line. **Policy** (``--auth-policy FILE``), JSON::

    {"grants": [
        {"identity": "trainer-a", "runs": ["team-a-*"], "scopes": ["read", "write"]},
        {"identity": "*", "runs": ["public-*"], "scopes": ["read"]},
        {"identity": "ops", "runs": ["*"], "scopes": ["admin"]}
    ]}

``identity`` and ``runs`` are globs (``fnmatch``, case-sensitive); ``admin`` holds every
scope. Whatever no grant names is refused, except the daemon's own uid on its unix socket
(``uid:<n>``), which holds every scope on every run (``builtin_grants``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase
from pathlib import Path

from ckptd.daemon.config import DaemonConfig


class Scope(str, Enum):
    """What a call does to a run; each RPC needs one (see ``auth.py``)."""

    READ = "read"
    WRITE = "write"
    DELETE = "delete"
    ADMIN = "admin"


_SCOPES = {scope.value: scope for scope in Scope}
# The largest token we hash; longer ones are refused before hashing.
MAX_TOKEN_CHARS = 512
_SHA256_HEX_CHARS = 64


def hash_token(token: str) -> str:
    """The sha256 hex digest a tokens file stores for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe text)."""
    return "ckptd_" + secrets.token_urlsafe(32)


def uid_identity(uid: int) -> str:
    """The identity of a unix-socket peer running as ``uid``."""
    return f"uid:{uid}"


@dataclass(frozen=True)
class TokenTable:
    """Hashed bearer tokens → identity."""

    by_hash: Mapping[str, str]

    def identity_of(self, token: str) -> str | None:
        """The identity ``token`` stands for, or None when it is unknown."""
        if len(token) > MAX_TOKEN_CHARS:
            return None
        # A dict lookup on the digest: timing reveals nothing about a stored token.
        return self.by_hash.get(hash_token(token))


def load_tokens(path: Path) -> TokenTable:
    """Reads a tokens file; raises ``ValueError`` naming the file and line that is wrong."""
    by_hash: dict[str, str] = {}
    for number, line in enumerate(_read(path, "auth tokens").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        digest, _, identity = text.partition(" ")
        digest, identity = digest.lower(), identity.strip()
        if len(digest) != _SHA256_HEX_CHARS or not _is_hex(digest) or not identity:
            raise ValueError(
                f"auth tokens file {path}, line {number}: expected '<sha256 hex> <identity>' "
                "(64 hex digits, a space, a name; `ckptd token new NAME` prints one), got "
                f"{text[:80]!r}"
            )
        by_hash[digest] = identity
    return TokenTable(by_hash)


@dataclass(frozen=True)
class Grant:
    """``scopes`` on the runs matching any of ``runs``, for identities matching ``identity``."""

    identity: str
    runs: tuple[str, ...]
    scopes: frozenset[Scope]

    def allows(self, identity: str, scope: Scope, run: str) -> bool:
        return (
            (scope in self.scopes or Scope.ADMIN in self.scopes)
            and fnmatchcase(identity, self.identity)
            and any(fnmatchcase(run, pattern) for pattern in self.runs)
        )


@dataclass(frozen=True)
class Policy:
    """The grants of a policy file plus the built-in ones; refuses what none allows."""

    grants: tuple[Grant, ...]

    def allows(self, identity: str, scope: Scope, run: str) -> bool:
        return any(grant.allows(identity, scope, run) for grant in self.grants)

    def with_grants(self, extra: Iterable[Grant]) -> Policy:
        return Policy(tuple(extra) + self.grants)


def builtin_grants(daemon_uid: int) -> tuple[Grant, ...]:
    """Every scope on every run for the daemon's own user (on its unix socket)."""
    return (Grant(uid_identity(daemon_uid), ("*",), frozenset({Scope.ADMIN})),)


def load_policy(path: Path) -> Policy:
    """Reads a JSON policy file; raises ``ValueError`` naming the file and the bad grant."""
    try:
        document = json.loads(_read(path, "auth policy"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"auth policy file {path} is not JSON: {exc}") from None
    grants = document.get("grants") if isinstance(document, dict) else None
    if not isinstance(grants, list):
        raise ValueError(f'auth policy file {path}: expected {{"grants": [...]}} at the top')
    return Policy(tuple(_grant(path, index, entry) for index, entry in enumerate(grants)))


def _grant(path: Path, index: int, entry: object) -> Grant:
    where = f"auth policy file {path}, grant {index}"
    if not isinstance(entry, dict) or set(entry) != {"identity", "runs", "scopes"}:
        raise ValueError(f'{where}: expected {{"identity": ..., "runs": [...], "scopes": [...]}}')
    identity, runs, scopes = entry["identity"], entry["runs"], entry["scopes"]
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"{where}: identity must be a non-empty string, got {identity!r}")
    if not isinstance(runs, list) or not runs or not all(isinstance(r, str) for r in runs):
        raise ValueError(f"{where}: runs must be a non-empty list of globs, got {runs!r}")
    unknown = [s for s in scopes if s not in _SCOPES] if isinstance(scopes, list) else [scopes]
    if unknown or not scopes:
        raise ValueError(
            f"{where}: scopes must be a non-empty list of {', '.join(_SCOPES)}; got {scopes!r}"
        )
    return Grant(identity, tuple(runs), frozenset(_SCOPES[s] for s in scopes))


def load_auth(config: DaemonConfig) -> tuple[Policy | None, TokenTable]:
    """The policy (None: open mode, nothing configured) and token table ``config`` names."""
    tokens = load_tokens(Path(config.auth_tokens)) if config.auth_tokens else TokenTable({})
    if not config.auth_configured:
        return None, tokens
    return (load_policy(Path(config.auth_policy)) if config.auth_policy else Policy(())), tokens


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc}") from None


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
