"""Who is calling, and may they: the servicer's one authentication and authorization check.

Every ckptd RPC asks ``Guard.require(context, scope, run)`` (``ListRuns`` and
``GetServerInfo`` only ``Guard.identify``) before it touches the engine; health and
reflection are other services and stay open to probes. The engine never sees a context:
it gets the identity as a string, at most.

**Identity**, in this order (``Guard.identify``):

1. a bearer token (``authorization: Bearer <token>`` metadata) found in ``--auth-tokens``;
   a token the daemon does not know is refused, never ignored;
2. a client certificate verified against ``--tls-client-ca`` (mTLS): its first
   subject alternative name, else its subject CN, as gRPC's auth context reports it;
3. on a unix-socket listener, ``uid:<the daemon's uid>``. gRPC Python cannot tell us the
   peer's credentials: its local credentials carry none (``local_check_peer`` never reads
   ``SO_PEERCRED``; grpc/grpc#15511, #28755), ``context.peer()`` of a unix connection names
   no process, and its server cannot adopt a socket we accepted and checked ourselves.
   Instead the daemon creates its socket mode 0600 (``daemon/server/listen.py``) so the
   kernel lets only the daemon's own uid connect (and root, which can read the storage
   anyway): every peer of the socket *is* that uid, by construction, not by a check;
4. otherwise the call is UNAUTHENTICATED.

**Open mode**: with no tokens, client CA or policy configured, every caller holds every
scope (as before authentication existed). ``listen.py`` allows that only on a unix socket,
on loopback, or with ``--insecure``.
"""

from __future__ import annotations

import os

import grpc
from ckptd.daemon.errors import PermissionDeniedError, UnauthenticatedError
from ckptd.daemon.logs import fields, get_logger
from ckptd.daemon.server.metrics import Metrics
from ckptd.daemon.server.policy import Policy, Scope, TokenTable, builtin_grants, uid_identity

log = get_logger("auth")

ANONYMOUS = "anonymous"
_BEARER = "bearer "
# Run names in refusals are cut here: a hostile name must not swell the status.
_SHOWN_RUN_CHARS = 128


class Guard:
    """Resolves each call's identity and checks its scope on a run (on the daemon's loop).

    Args:
        policy: The grants; None for open mode (no authentication configured).
        tokens: Hashed bearer tokens; empty when ``--auth-tokens`` is not set.
        unix_socket: Whether the daemon listens on a (0600) unix socket.
        metrics: Where refusals are counted (``ckptd_auth_denied_total{reason}``).
    """

    def __init__(
        self, policy: Policy | None, tokens: TokenTable, *, unix_socket: bool, metrics: Metrics
    ) -> None:
        self._uid_identity = uid_identity(os.getuid()) if unix_socket else None
        self._policy = policy.with_grants(builtin_grants(os.getuid())) if policy else None
        self._tokens = tokens
        self._metrics = metrics

    @property
    def open(self) -> bool:
        """Whether every caller holds every scope (no authentication configured)."""
        return self._policy is None

    def identify(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's identity; raises ``UnauthenticatedError`` when it has none we accept."""
        token = _bearer_token(context)
        if token is not None and self._tokens.by_hash:
            identity = self._tokens.identity_of(token)
            if identity is None:
                raise self._refuse_unknown("the bearer token is not one the daemon knows "
                                           "(revoked, mistyped, or for another daemon)")
            return identity
        peers = context.peer_identities()
        if peers:
            return bytes(peers[0]).decode(errors="replace")
        if self._uid_identity is not None:
            return self._uid_identity
        if self.open:
            return ANONYMOUS
        raise self._refuse_unknown(
            "the call carries no credentials: pass a bearer token (token=, --token or "
            "CKPTD_TOKEN) or a client certificate (tls=, --tls-cert/--tls-key)")

    def require(self, context: grpc.aio.ServicerContext, scope: Scope, run: str) -> str:
        """The caller's identity once it holds ``scope`` on ``run``; raises
        ``UnauthenticatedError`` or ``PermissionDeniedError`` (counted and logged) if not."""
        identity = self.identify(context)
        if self.allows(identity, scope, run):
            return identity
        shown = run if len(run) <= _SHOWN_RUN_CHARS else run[:_SHOWN_RUN_CHARS] + "..."
        self._metrics.auth_denied("permission_denied")
        log.warning("access denied %s", fields(identity=identity, scope=scope.value, run=shown))
        raise PermissionDeniedError(
            f"identity {identity!r} has no {scope.value!r} scope on run {shown!r}; the "
            "daemon's --auth-policy must grant it")

    def allows(self, identity: str, scope: Scope, run: str) -> bool:
        """Whether ``identity`` holds ``scope`` on ``run`` (no counting, no logging)."""
        return self._policy is None or self._policy.allows(identity, scope, run)

    def _refuse_unknown(self, why: str) -> UnauthenticatedError:
        self._metrics.auth_denied("unauthenticated")
        log.warning("unauthenticated call %s", fields(why=why))
        return UnauthenticatedError(why)


def _bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value[len(_BEARER):].strip() if value.lower().startswith(_BEARER) else value
    return None
