"""What the ``ckptd`` inspection commands need from a checkpoint store, without transport.

``ls``, ``info``, ``export``, ``verify`` and ``rm`` are written once against ``Catalog``;
two implementations serve them:

* ``DaemonCatalog`` (``ckptd.daemon.cli.daemon_catalog``) asks a running daemon through the
  ckptd.v1 gRPC API (``--target``);
* ``StorageCatalog`` (``ckptd.daemon.cli.storage_catalog``) reads a storage location directly
  through the same ``Repository`` the engine uses (``ckptd.daemon.store``), with no daemon
  and no gRPC
  (``--storage``).

The storage catalog raises the daemon's exception tree (``ckptd.daemon.errors``); the
daemon catalog is a client of the wire contract and raises the client's tree
(``ckptd.client.errors``, mapped at one choke point), so commands never see a
``grpc.RpcError``. Both trees refine the same builtins (``LookupError``, ``ValueError``,
``OSError``), and ``ckptd.daemon.cli.commands`` handles them in one place.

Call order: ``open_catalog(...)`` → any number of calls, one at a time, from one thread →
``close()`` (or use it as a context manager).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from ckptd.daemon.domain import RestoredCheckpoint, RunInfo, StepKey, TensorSpec
from ckptd.daemon.errors import InvalidRequestError
from ckptd.daemon.store.quarantine import DamagedStep, QuarantinedStep
from ckptd.protos.records import StepInfo

if TYPE_CHECKING:
    from ckptd.client.credentials import TlsFiles

__all__ = ["Catalog", "StepDetail", "TensorRow", "open_catalog"]

ProgressCallback = Callable[[int], None]
"""Called with a number of bytes just received (restore progress)."""


@dataclass(frozen=True)
class TensorRow:
    """One tensor of a step's table; storage facts are None when the source cannot tell."""

    spec: TensorSpec
    encoding: str | None = None  # "exact" | "delta"
    stored_bytes: int | None = None


@dataclass(frozen=True)
class StepDetail:
    """A step's tensor table and metadata (``info RUN --step N``)."""

    key: StepKey
    tensors: tuple[TensorRow, ...]
    metadata: dict[str, str]
    checksum: str


class Catalog(abc.ABC):
    """Lists, restores and deletes committed checkpoints.

    Attributes:
        location: Human-readable source (``daemon at 127.0.0.1:5000``, ``storage file:///x``),
            named in messages.
        direct: Whether writes bypass any daemon serving the same storage.
    """

    location: str
    # True when writes bypass any daemon serving the same storage (``StorageCatalog``).
    direct: bool = False

    @abc.abstractmethod
    def describe(self) -> list[tuple[str, str]]:
        """Ordered (field, value) pairs about the source: the daemon's settings, or the
        storage URL."""

    @abc.abstractmethod
    def list_runs(self) -> list[RunInfo]:
        """Every (run, rank) chain with at least one committed step, sorted."""

    @abc.abstractmethod
    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        """The committed steps of (run, rank) in step order; ``RunNotFoundError`` if none."""

    @abc.abstractmethod
    def step_detail(self, key: StepKey) -> StepDetail:
        """The tensor table of one step; ``StepNotFoundError``/``RunNotFoundError``."""

    @abc.abstractmethod
    def restore(
        self, key: StepKey, on_progress: ProgressCallback | None = None
    ) -> RestoredCheckpoint:
        """The step's reconstructed tensors, verified against its manifest checksum."""

    @abc.abstractmethod
    def delete_step(self, key: StepKey) -> int:
        """Deletes one step (its dependant is rebased first); returns the count (1)."""

    @abc.abstractmethod
    def delete_run(self, run: str) -> int:
        """Deletes every step of every rank of ``run``; returns how many."""

    def damaged(self) -> list[DamagedStep]:
        """Step directories under ``runs/`` that a daemon's next start will quarantine (a
        manifest missing without the pending marker, or unreadable)."""
        raise self._storage_only("finding damaged steps")

    def quarantined(self) -> list[QuarantinedStep]:
        """The step directories in the quarantine area."""
        raise self._storage_only("listing quarantined steps")

    def delete_quarantined(self, entries: list[QuarantinedStep]) -> None:
        """Deletes quarantined step directories for good."""
        raise self._storage_only("deleting quarantined steps")

    def _storage_only(self, what: str) -> InvalidRequestError:
        # The wire API has no quarantine call yet: the quarantine lies in storage, outside
        # the key space a daemon serves, and reading it directly is safe while one runs.
        return InvalidRequestError(
            f"{what} reads storage directly: pass --storage PATH_OR_URL (the daemon's "
            f"--storage) instead of {self.location}")

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases the channel or storage; idempotent."""

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_catalog(
    *, target: str | None = None, storage: str | None = None, timeout_s: float = 10.0,
    tls: TlsFiles | None = None, token: str | None = None,
) -> Catalog:
    """Opens the daemon at ``target`` or the storage at ``storage`` (exactly one).

    Args:
        target: ``host:port``, ``unix:///path`` or an absolute socket path.
        storage: A directory, ``file:///dir`` or ``s3://bucket/prefix``.
        timeout_s: Longest wait for the daemon to answer a listing or info call.
        tls: TLS files for a daemon serving TLS (``target`` only).
        token: Bearer token for a daemon that asks for one (``target`` only).

    Raises:
        InvalidRequestError: neither or both were given.
    """
    if (target is None) == (storage is None):
        raise InvalidRequestError(
            "name exactly one source: --target HOST:PORT|unix:///PATH (a running daemon, "
            "default $CKPTD_TARGET) or --storage PATH_OR_URL (a storage location)"
        )
    if storage is not None:
        from ckptd.daemon.cli.storage_catalog import StorageCatalog

        return StorageCatalog.open(storage)
    from ckptd.daemon.cli.daemon_catalog import DaemonCatalog

    assert target is not None
    return DaemonCatalog(target, timeout_s=timeout_s, tls=tls, token=token)
