"""The client's one retry policy: which failures wait for the daemon, and for how long.

``Connection`` runs every call that needs the daemon through ``call_with_retry``, so a
daemon that restarts or stalls (CPU starvation, a stopped process) costs the trainer a
wait, not an exception, for up to a ``Retry.window_s``: ``reconnect_timeout_s`` for every
call of a running checkpointer, ``connect_timeout_s`` while its constructor connects. Then
ONE ``DaemonUnavailableError`` names the operation, the target, how long it retried and
the last status (``gave_up``).

A failure is **transient** (``is_transient``) when the daemon could not take the call:

* UNAVAILABLE without a reason: gRPC found no daemon (down, restarting, socket absent);
* ``ERROR_REASON_SHUTTING_DOWN``: a draining daemon refused the call before doing anything;
* DEADLINE_EXCEEDED, for idempotent calls only: no answer within ``call_timeout_s``;
* CANCELLED, for idempotent calls only: a stopping daemon cancelled the call (the client's
  own cancellations come from ``close()``, which ends the retrying first).

Everything else is the daemon's answer and is raised at once: INVALID_ARGUMENT, NOT_FOUND,
ALREADY_EXISTS, BUSY, ..., and ``ERROR_REASON_STORAGE_UNAVAILABLE`` too (the daemon is up
but its storage failed; an operator must act, and waiting out the window would hide it).

Which calls retry, and why that is safe:

* **Idempotent** — ``GetServerInfo`` (readiness), ``WaitSave``, ``ListSteps`` and
  ``Restore`` only read, so repeating one changes nothing; a restore cut off mid-stream is
  received again from its first byte.
* **Save** (not idempotent, no deadline: a large save or a wait for the daemon's byte budget
  takes as long as it takes) is resent on UNAVAILABLE and SHUTTING_DOWN. Resending cannot
  save a step twice: the daemon refuses a step it already holds with STEP_EXISTS
  (ALREADY_EXISTS), and a resend refused so means an earlier attempt got through before the
  connection dropped, so it counts as accepted.
* **DeleteStep** (not idempotent) is retried on UNAVAILABLE and SHUTTING_DOWN but not on
  DEADLINE_EXCEEDED: the daemon may still be deleting (rebasing a large child) and a repeat
  would race it. A retry that finds the step gone (NOT_FOUND) means an earlier attempt
  deleted it before its answer was lost, so it counts as done — the client cannot tell that
  from a step that never existed once its first attempt got no answer, but either way the
  step is not there, which is what the caller asked for.

Backoff: the first pause is 0.05 s and each next one doubles, capped at 2 s; each pause is
drawn uniformly between half and all of that, so the ranks of a job that lost the same
daemon do not come back in lockstep. A daemon that returns is found within about 2 s.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import CkptdClientError, DaemonUnavailableError, RequestCancelledError

logger = logging.getLogger("ckptd.client")
T = TypeVar("T")

SHUTTING_DOWN = "ERROR_REASON_SHUTTING_DOWN"
_IDEMPOTENT_ONLY = frozenset({"DEADLINE_EXCEEDED", "CANCELLED"})


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: pause ``n`` (from 0) is drawn uniformly from
    ``[1 - jitter, 1]`` times ``min(max_s, first_s * multiplier**n)``."""

    first_s: float = 0.05
    max_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def pause_s(self, retry: int, draw: Callable[[], float] = random.random) -> float:
        nominal = min(self.max_s, self.first_s * self.multiplier ** min(retry, 64))
        return nominal * (1.0 - self.jitter * draw())


@dataclass(frozen=True)
class Retry:
    """How long one call keeps retrying transient failures.

    Attributes:
        window_s: Seconds from the first attempt during which attempts go on (the last
            one starts as it closes); 0 makes one attempt and raises its error as it is.
        setting: The setting ``window_s`` came from, named in the final error.
        backoff: The pauses between attempts.
    """

    window_s: float
    setting: str = "reconnect_timeout_s"
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True)
class Attempt:
    """One try of a retried call: ``number`` counts from 0; ``deadline`` (monotonic) ends
    the window, so an attempt that waits (readiness) can stop there."""

    number: int
    deadline: float

    @property
    def is_retry(self) -> bool:
        return self.number > 0

    def remaining_s(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)


def is_transient(error: CkptdClientError, *, idempotent: bool) -> bool:
    """Whether ``error`` means the daemon could not take the call (see the module doc)."""
    if error.reason is not None:
        return error.reason == SHUTTING_DOWN
    if error.code == "UNAVAILABLE":
        return True
    return idempotent and error.code in _IDEMPOTENT_ONLY


def call_with_retry(
    fn: Callable[[Attempt], T],
    *,
    operation: str,
    target: str,
    retry: Retry,
    idempotent: bool,
    closed: threading.Event,
    deadline: float | None = None,
) -> T:
    """Calls ``fn`` until it returns, raises a permanent error, or the window closes.

    Args:
        fn: One attempt; raises ``CkptdClientError`` (already mapped) on failure.
        operation: What the call does, for messages (``"list steps of run 'r' rank 0"``).
        target: The daemon's address, for messages.
        retry: The window and backoff.
        idempotent: Whether a call that may have run on the daemon can be repeated
            (decides DEADLINE_EXCEEDED and CANCELLED).
        closed: Set by ``Connection.close``; ends the retrying at once.
        deadline: Monotonic end of the window, when a caller shares one across calls.

    Raises:
        DaemonUnavailableError: Transient failures for the whole window (``gave_up``).
        RequestCancelledError: ``closed`` was set while retrying.
        CkptdClientError: A permanent error, raised at once as ``fn`` raised it.
    """
    start = time.monotonic()
    end = start + retry.window_s if deadline is None else deadline
    last: CkptdClientError | None = None
    number = 0
    while True:
        if closed.is_set():
            raise RequestCancelledError(f"{operation}: the checkpointer was closed") from last
        try:
            return fn(Attempt(number, end))
        except CkptdClientError as exc:
            if not is_transient(exc, idempotent=idempotent) or closed.is_set():
                raise
            last = exc
        if retry.window_s <= 0 and deadline is None:
            raise last
        remaining_s = end - time.monotonic()
        if remaining_s <= 0:
            elapsed_s = time.monotonic() - start
            raise gave_up(
                operation, target, retry=retry, elapsed_s=elapsed_s, attempts=number + 1, last=last
            ) from last
        if number == 0:
            logger.info("retrying for up to %g s (%s): %s", retry.window_s, retry.setting, last)
        # The last pause is cut to the window, so the last attempt is made as it closes.
        closed.wait(min(retry.backoff.pause_s(number), remaining_s))
        number += 1


def gave_up(
    operation: str,
    target: str,
    *,
    retry: Retry,
    elapsed_s: float,
    attempts: int,
    last: CkptdClientError,
) -> DaemonUnavailableError:
    """The one error a call raises after retrying for its whole window (raise it ``from``
    the last error); it keeps the last error's ``code``, ``reason`` and ``details``."""
    status = f"gRPC status {last.code}"
    if last.reason:
        status = f"{last.reason}, {status}"
    error = DaemonUnavailableError(
        f"{operation}: no ckptd daemon answered at {target!r} within {retry.setting}="
        f"{retry.window_s:g} s ({attempts} attempts over {elapsed_s:.1f} s); last error: "
        f"{last.details or 'none given'} ({status}). Is the daemon running (and not stalled), "
        f"and is the address right? A longer {retry.setting} rides out longer restarts."
    )
    error.code, error.reason, error.details = last.code, last.reason, last.details
    return error
