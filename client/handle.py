"""``SaveHandle``: what ``Checkpointer.save`` returns, one per save.

A save moves through ``pending → accepted → durable``, or ends ``failed`` or ``skipped``:

* **accepted** — the daemon holds every byte; the staging buffer is free again.
* **durable** — the step is committed in storage and survives a daemon crash.
* **skipped** — the client did not save (every staging buffer busy past
  ``busy_timeout_s``, or the daemon busy and ``when_busy="skip"``); reported, never raised
  in the training loop.
* **failed** — the save will never be durable; ``exception()`` says why.

The client's background threads drive the transitions; any thread may wait on them.
"""

from __future__ import annotations

import threading

from ckptd.protos.records import SaveState

from .errors import CkptdClientError, CkptdTimeoutError, SaveSkippedError


class SaveHandle:
    """The future of one save (``Checkpointer.save`` returns it)."""

    def __init__(self, run: str, rank: int, step: int) -> None:
        self.run = run
        self.rank = rank
        self.step = step
        self._state = SaveState.PENDING
        self._error: CkptdClientError | None = None
        self._was_accepted = False
        self._skip_reason = ""
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        return f"<SaveHandle {self.run}/rank{self.rank}/step{self.step} {self._state.value}>"

    @property
    def state(self) -> SaveState:
        return self._state

    @property
    def skipped(self) -> bool:
        """True when the client did not save this step (see ``skip_reason``)."""
        return self._state is SaveState.SKIPPED

    @property
    def skip_reason(self) -> str:
        return self._skip_reason

    def done(self) -> bool:
        """True once the save is durable, failed or skipped."""
        return self._state.finished

    def accepted(self, timeout: float | None = None) -> bool:
        """Waits until the daemon accepted the save (or it ended otherwise); True when the
        daemon accepted it — even if it failed later — False on skip, refusal or timeout."""
        self._wait_for(lambda: self._state is not SaveState.PENDING, timeout)
        return self._was_accepted

    def durable(self, timeout: float | None = None) -> bool:
        """Waits until the save is durable or ended; True only when it is durable."""
        self._wait_for(self.done, timeout)
        return self._state is SaveState.DURABLE

    def wait_accepted(self, timeout: float | None = None) -> None:
        """Like ``accepted`` but raises instead of returning False.

        Raises:
            CkptdTimeoutError: Not accepted within ``timeout``.
            SaveSkippedError: The save was skipped.
            CkptdClientError: The save failed (the specific class says why).
        """
        if not self.accepted(timeout):
            self._raise_outcome("accepted", timeout)

    def wait_durable(self, timeout: float | None = None) -> None:
        """Like ``durable`` but raises instead of returning False (see ``wait_accepted``)."""
        if not self.durable(timeout):
            self._raise_outcome("durable", timeout)

    def exception(self, timeout: float | None = None) -> CkptdClientError | None:
        """Waits until the save ended and returns its failure, or None when it is durable
        or skipped (a skip is not an error).

        Raises:
            CkptdTimeoutError: The save did not end within ``timeout``.
        """
        if not self._wait_for(self.done, timeout):
            raise CkptdTimeoutError(
                f"step {self.step} did not finish within {timeout} s (state {self._state.value})"
            )
        return self._error

    # Transitions, called by the client's background threads.

    def _set_accepted(self) -> None:
        self._was_accepted = True
        self._transition(SaveState.ACCEPTED)

    def _set_durable(self) -> None:
        self._was_accepted = True
        self._transition(SaveState.DURABLE)

    def _set_failed(self, error: CkptdClientError) -> None:
        self._error = error
        self._transition(SaveState.FAILED)

    def _set_skipped(self, reason: str) -> None:
        self._skip_reason = reason
        self._transition(SaveState.SKIPPED)

    def _transition(self, state: SaveState) -> None:
        with self._cond:
            if not self.done():
                self._state = state
            self._cond.notify_all()

    def _wait_for(self, predicate: object, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)  # type: ignore[arg-type]

    def _raise_outcome(self, goal: str, timeout: float | None) -> None:
        if self._state is SaveState.SKIPPED:
            raise SaveSkippedError(f"step {self.step} was skipped: {self._skip_reason}")
        if self._error is not None:
            raise self._error
        raise CkptdTimeoutError(
            f"step {self.step} was not {goal} within {timeout} s (state {self._state.value})"
        )
