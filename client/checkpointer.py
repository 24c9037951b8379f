"""``Checkpointer``: the trainer-side API of ckptd.

``save`` snapshots the state into a pooled staging buffer and returns a ``SaveHandle`` at
once; the client's sender thread hands the snapshot to the daemon, and its watcher thread
follows it to durability (``saver.py``, over the transport ``selection.py`` chose). With
``snapshot="overlap"`` a third thread makes the copy while the trainer computes on
(``overlap.py``). ``restore`` streams a step back and rebuilds the saved structure
(``restore.py``). Everything runs on gRPC's sync API and private threads: nothing imposes an
event loop on the trainer, and nothing in the background raises into it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import torch
from ckptd.protos.names import normalize_target
from ckptd.protos.records import StepInfo, step_info_from_message
from ckptd.protos.v1 import pb

from .config import CheckpointerConfig, check_run, check_world
from .credentials import TlsArg, resolve_token, tls_files
from .errors import CheckpointNotFoundError
from .grpc_transport import Connection
from .handle import SaveHandle
from .header import HeaderBuilder
from .overlap import Guard, SnapshotThread
from .policies import check_bits, parse_rules
from .restore import RestoredState, RestoreRoom, restore_state
from .retention import Retention
from .retry import Retry
from .saver import Saver, shutdown
from .selection import choose_transport
from .shm import ShmTransport
from .staging import StagingPool
from .worker import SaveWorker

# How long a checkpointer left open at interpreter exit keeps handing over queued saves.
EXIT_TIMEOUT_S = 30.0


class Checkpointer:
    """Saves and restores the training state of one (run, rank) through a ckptd daemon.

    Args:
        target: The daemon's address: ``"host:port"``, ``"unix:///path"`` or ``"unix:/path"``.
        run: The training job's name (1-128 characters from ``[A-Za-z0-9._-]``).
        rank: Which shard of the job's state this process saves (0 for one process).
        world_size: How many ranks save the run (``torch.distributed.get_world_size()``).
            A step is then *complete* once every rank committed it: ``latest_step`` and
            ``restore()`` mean the latest complete step, and ``restore(step)`` of a step
            some rank lacks raises ``StepIncompleteError`` naming them. Every step of a run
            keeps one world size. None: no world, each rank's steps stand alone.
        reshardable: The saves carry their own global layout, so the run's world size may
            change between them (``ckptd.client.dcp`` sets it: DCP reshards on load).
        transport: ``"shm"`` writes snapshots into shared memory the daemon reads in place
            (same host, over the daemon's unix socket only); ``"grpc"`` streams them;
            ``"auto"`` picks shm on a unix socket when the daemon reports this host's
            hostname and boot id, and falls back to streaming if the daemon then refuses
            the segment (e.g. it runs in another container: for good) or ``/dev/shm`` is
            full (until it has room again, or every 8th save or restore; one warning each;
            README, "Sizing /dev/shm").
        bits: Default bit width of lossy tensors (1..8): every built-in rule's width (the
            domains stay; exact stays exact), the width of your rules that name none, and
            the daemon's default. None: the built-in rules' own widths and the daemon's
            default.
        policies: Ordered ``(glob, spec)`` rules matched against tensor names
            (``"optim/*"``), spec ``"auto"|"exact"|"lossy[:<bits>]"|"lossy-log[:<bits>]"|
            "lossy-scaled[:<bits>]"``; the first match wins. The built-in rules come after
            them, one set per save chosen by the optimizer state it holds
            (``ckptd.client.policies.builtin_rules``): with Adam's ``*exp_avg_sq``, every
            float tensor lossy at b=3, ``*exp_avg`` lossy-scaled b=2, ``*exp_avg_sq``
            lossy-log b=3; with SGD's ``*momentum_buffer`` (and no RMSprop ``*square_avg``),
            that lossy at b=2 and the weights as the daemon decides; otherwise
            ``*exp_avg_sq`` lossy-log and ``*exp_avg`` lossy-scaled at the daemon's width.
            Every set keeps step counters (``*/step``, ``*.step``) exact and other state
            that must stay non-negative (``*square_avg``, ``*exp_inf``, ``*/sum``,
            ``*running_var``) lossy-log; a DCP shard (``fqn@offsets``) matches every rule,
            yours included, as its tensor.
        when_busy: When every staging buffer is still busy (or the daemon's budget is full):
            ``"wait"`` up to ``busy_timeout_s`` then skip, or ``"skip"`` at once. Skipped
            saves are logged and marked on their handle; they never raise.
        busy_timeout_s: Longest ``save`` waits for a staging buffer.
        connect_timeout_s: How long the constructor waits for the daemon to answer.
        reconnect_timeout_s: How long every later call that needs the daemon (a save's
            hand-over, its durability check, ``restore``, ``steps``, ``delete_step``) keeps
            retrying while the daemon is unreachable, shutting down or not answering
            (restarting, stalled) before it raises one ``DaemonUnavailableError``; a
            background save's error lands on its handle (``client/retry.py``).
        call_timeout_s: Deadline of each attempt of a unary call (readiness probe,
            listing, deleting) and the grace a durability poll gets beyond its wait; an
            attempt past it is retried within ``reconnect_timeout_s`` (except a delete).
        max_staging_bytes: Cap on staging memory; None: ``staging_buffers`` times the state size.
        staging_buffers: Snapshots that may be in flight at once.
        snapshot: ``"copy"``: ``save`` copies the tensors before it returns, so the trainer
            may change them at once. ``"overlap"``: ``save`` returns before the copy, which
            runs while the trainer computes its next forward and backward pass; the
            optimizer step must wait for it — register it with ``guard`` (or call
            ``wait_snapshot``). A tensor changed during its copy fails that save with
            ``SnapshotConflictError`` when its version counter shows it (``overlap.py``
            lists the writes it cannot see).
        tls: TLS to a daemon serving it: the CA file that signed the daemon's certificate
            (``str``), or ``TlsFiles(ca, cert, key)`` to also present a client certificate
            (mTLS). None: plaintext (loopback, a unix socket).
        token: Bearer token the daemon's ``--auth-tokens`` knows; None: ``$CKPTD_TOKEN``
            if set. On the daemon's unix socket, neither is needed (SECURITY.md).
        retention: The run's retention policy, sent to the daemon once here (replacing the
            run's stored one; it needs the ``delete`` scope); the daemon stores it with
            the run and deletes what it no longer keeps after each commit. None: leave
            the run's policy as it is (the daemon's default if it never had one).
        save_interval_steps: ``should_save(step)`` is true for multiples of this.

    Raises:
        DaemonUnavailableError: No daemon answered within ``connect_timeout_s``.
        UnauthenticatedError: The daemon accepts none of the credentials given.
        ValueError: An argument is invalid (the message names it and the allowed values).
    """

    def __init__(
        self,
        target: str,
        run: str,
        rank: int = 0,
        *,
        world_size: int | None = None,
        reshardable: bool = False,
        transport: str = "auto",
        bits: int | None = None,
        policies: Iterable[tuple[str, str]] | None = None,
        when_busy: str = "wait",
        busy_timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        reconnect_timeout_s: float = 30.0,
        call_timeout_s: float = 30.0,
        max_staging_bytes: int | None = None,
        staging_buffers: int = 2,
        snapshot: str = "copy",
        tls: TlsArg = None,
        token: str | None = None,
        retention: Retention | None = None,
        save_interval_steps: int = 1,
    ) -> None:
        check_run(run, rank)
        world = check_world(rank, world_size)
        if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int) \
                or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be an int >= 1, got "
                             f"{save_interval_steps!r}")
        if retention is not None and not isinstance(retention, Retention):
            raise ValueError(f"retention must be a ckptd.client.Retention, got {retention!r}")
        self.save_interval_steps = save_interval_steps
        self.config = CheckpointerConfig(
            transport=transport,
            bits=check_bits(bits, "bits"),
            policies=parse_rules(policies),
            when_busy=when_busy,
            busy_timeout_s=busy_timeout_s,
            connect_timeout_s=connect_timeout_s,
            reconnect_timeout_s=reconnect_timeout_s,
            call_timeout_s=call_timeout_s,
            max_staging_bytes=max_staging_bytes,
            staging_buffers=staging_buffers,
            snapshot=snapshot,
        )
        self.target = normalize_target(target)
        self.run, self.rank = run, rank
        self._connection = Connection(
            self.target,
            call_timeout_s=self.config.call_timeout_s,
            reconnect_timeout_s=self.config.reconnect_timeout_s,
            tls=tls_files(tls),
            token=resolve_token(token, os.environ),
        )
        try:
            self.server_info = self._connection.wait_ready(
                Retry(self.config.connect_timeout_s, "connect_timeout_s")
            )
            transport_impl, fallback = choose_transport(
                self.config.transport, self.target, self._connection, self.server_info)
            # Restores follow the save's choice: shared memory where saves use it.
            self._restore_shm = isinstance(transport_impl, ShmTransport)
            self._restore_fallback = fallback is not None
            self._restore_room = RestoreRoom()  # what refused restores taught: one warning
            if retention is not None:
                self._connection.set_retention(
                    pb.SetRetentionRequest(run=run, policy=retention.to_message()))
        except BaseException:
            self._connection.close()
            raise
        headers = HeaderBuilder(run, rank, self.config.policies, self.server_info,
                                world_size=world, reshardable=bool(reshardable))
        self._saver = Saver(self.config, self._connection, transport_impl, headers,
                            fallback=fallback)
        self._worker = self._saver.worker
        self._latest_known = False  # whether the saver's last step covers steps saved before us
        self._closed = False
        self._pid = os.getpid()
        # A checkpointer dropped or left open at exit still hands over its queued saves and
        # unlinks its shared memory (the threads and the pool do not reference self).
        self._finalizer = weakref.finalize(
            self, _shutdown_in, self._saver.copier, self._worker, self._connection,
            self._saver.pool, EXIT_TIMEOUT_S, owner_pid=self._pid,
        )  # fmt: skip

    # Public API.

    @property
    def transport(self) -> str:
        """The transport saves use now: ``"shm"`` or ``"grpc"``."""
        return self._worker.transport.name

    @property
    def staging_pool(self) -> StagingPool:
        """The staging buffers (exposed for tests and benchmarks: ``stats``, ``buffers``)."""
        return self._saver.pool

    def save(
        self,
        step: int,
        state: Any,
        *,
        bits: int | None = None,
        metadata: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> SaveHandle:
        """Snapshots ``state`` as ``step`` and returns once the trainer may change it
        (with ``snapshot="overlap"``: once the copy is queued; see ``guard``).

        Args:
            step: Training step; must be greater than every step saved before for this run
                and rank.
            state: Nested dicts/lists/tuples of tensors, numpy arrays and plain Python
                values (int, float, bool, str, bytes, None); ``restore`` gives it back with
                tied tensors still one tensor, Parameters and ``requires_grad`` kept, and
                complex and float8 tensors bit for bit (README, "What can be saved").
            bits: Bit width of lossy tensors for this save (overrides the default ``bits``,
                with the same meaning: every built-in width, the daemon's default).
            metadata: Extra string metadata stored with the step (keys must not start
                with ``"ckptd."``).
            metrics: Finite numbers to store with the step (``{"val_loss": 0.31}``),
                listed by ``step_infos`` and ranked by ``Retention.keep_best`` and
                ``best_step``.

        Returns:
            The save's handle; it is already ``skipped`` when no staging buffer came free
            in time.

        Raises:
            TypeError: Part of the state cannot be saved (the message names its path).
            ValueError: Bad step, bits, metadata, or a state beyond the daemon's limits
                (tensor count, bytes, a header larger than one gRPC message).
            RuntimeError: Called in a process forked from the one that created the
                checkpointer (create a new one there), or after ``close``.
        """
        self._check_open()
        return self._saver.save(step, state, bits, metadata, metrics)

    def guard(self, *targets: torch.nn.Module | torch.optim.Optimizer) -> Guard:
        """Makes the calls that change a saved state wait for overlapped copies in flight.

        For each optimizer, ``step()`` waits. Each module's buffers (batch norm's running
        statistics, which the forward pass changes) are copied inside ``save()``; the
        weights are only read by the forward and backward pass, so they are copied
        alongside it. Needed only with ``snapshot="overlap"`` (harmless otherwise);
        ``close`` removes the hooks, and so does the returned guard's ``remove()``.

        Raises:
            TypeError: A target is neither an optimizer nor a module.
        """
        self._check_open()
        return self._saver.guard(targets)

    def wait_snapshot(self, timeout_s: float | None = None) -> None:
        """Waits until every overlapped copy started so far has finished (returns at once
        with ``snapshot="copy"``); afterwards the saved tensors may change.

        Raises:
            CkptdTimeoutError: Copies were still running after ``timeout_s``.
        """
        self._check_process()
        self._saver.wait_snapshot(timeout_s)

    def wait(self, timeout_s: float | None = None) -> None:
        """Waits until every save made so far is durable (skipped ones are ignored).

        Raises:
            CkptdTimeoutError: Some save was not durable within ``timeout_s``.
            CkptdClientError: The first failed save's error (each failure is raised once).
        """
        self._check_process()
        self._saver.wait(timeout_s)

    def restore(
        self,
        step: int | None = None,
        *,
        map_location: str | torch.device = "cpu",
        allow_incomplete: bool = False,
        zero_copy: bool = False,
    ) -> Any:
        """Returns the state saved at ``step`` (None: the latest durable step; for a run
        saved with a world, the latest step every rank committed), rebuilt with the same
        containers, dtypes and shapes, tensors on ``map_location``. ``allow_incomplete``
        returns this rank's own copy of a step other ranks lack (with ``step=None``, this
        rank's latest step). ``zero_copy`` (shared memory only): the tensors are views of
        the segment the daemon wrote, not copies — the fastest restore and half its peak
        memory, but the segment's pages stay allocated (in ``/dev/shm``, and charged to the
        daemon's memory cgroup, which wrote them) until the last restored tensor dies.

        Raises:
            CheckpointNotFoundError: The run, rank or step does not exist.
            StepIncompleteError: A rank of the step's world has not committed it (or no step
                is complete); the message names the missing ranks.
            DaemonUnavailableError: No daemon answered within ``reconnect_timeout_s``.
        """
        return self.restore_info(step, map_location=map_location,
                                 allow_incomplete=allow_incomplete, zero_copy=zero_copy).state

    def restore_info(
        self,
        step: int | None = None,
        *,
        map_location: str | torch.device = "cpu",
        allow_incomplete: bool = False,
        zero_copy: bool = False,
    ) -> RestoredState:
        """Like ``restore`` but also returns the step number, metadata and checksum."""
        self._check_open()
        request = pb.RestoreRequest(run=self.run, rank=self.rank,
                                    allow_incomplete=allow_incomplete)
        if step is not None:
            request.step = step
        return restore_state(self._connection, request, map_location,
                             shared_memory=self._restore_shm,
                             fallback=self._restore_fallback, zero_copy=zero_copy,
                             room=self._restore_room)

    def step_infos(self) -> list[StepInfo]:
        """The committed steps of this run and rank, oldest first ([] for a new run)."""
        self._check_open()
        try:
            infos = self._connection.list_steps(self.run, self.rank)
        except CheckpointNotFoundError:
            return []
        return sorted((step_info_from_message(info) for info in infos), key=lambda info: info.step)

    def steps(self, metric: str | None = None) -> list[int]:
        """The committed step numbers of this run and rank, ascending; with ``metric``,
        only those saved with that metric."""
        return [info.step for info in self.step_infos()
                if metric is None or metric in info.metrics]

    def best_step(self, metric: str, mode: str = "min") -> int | None:
        """The committed step with the lowest (``mode="min"``) or highest (``"max"``)
        ``metric``, the newest on a tie; None when no step has it."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        sign = 1.0 if mode == "min" else -1.0
        scored = [(sign * info.metrics[metric], -info.step) for info in self.step_infos()
                  if metric in info.metrics]
        return -min(scored)[1] if scored else None

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due under ``save_interval_steps`` (Orbax's ``should_save``):
        true for the first save of a run, never for a step at or before the latest saved
        one, else when ``step`` is a multiple of ``save_interval_steps``. Asks the daemon
        for the run's latest step once; later calls only look at this checkpointer's."""
        self._check_open()
        if not self._latest_known:
            latest = max(self.steps(), default=None)  # this rank's own: steps only grow
            last = self._saver.last_step
            if latest is not None and (last is None or latest > last):
                self._saver.last_step = latest
            self._latest_known = True
        last = self._saver.last_step
        if last is None:
            return True
        return step > last and step % self.save_interval_steps == 0

    def latest_step(self) -> int | None:
        """The newest committed step (for a run saved with a world, the newest step every
        rank committed), or None when there is none."""
        complete = [info.step for info in self.step_infos() if info.complete]
        return complete[-1] if complete else None

    def delete_step(self, step: int) -> int:
        """Deletes one committed step (later steps stay restorable); returns steps removed
        (0 when a retry after a lost answer found the step already gone)."""
        self._check_open()
        return self._connection.delete_step(pb.StepRef(run=self.run, rank=self.rank, step=step))

    def close(self, timeout_s: float = 60.0) -> None:
        """Hands over queued saves (up to ``timeout_s``), then frees threads, shared memory
        and the connection. Idempotent. Call ``wait()`` first to confirm durability."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        if os.getpid() == self._pid:  # a forked child's copy owns none of it (see _shutdown_in)
            self._saver.close(timeout_s)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Helpers.

    def _check_open(self) -> None:
        self._check_process()
        if self._closed:
            raise RuntimeError(f"the checkpointer for run {self.run!r} rank {self.rank} is closed")

    def _check_process(self) -> None:
        # After fork() the child has a copy of this object but not its threads (a save
        # would be queued for a sender that does not exist) nor a usable gRPC channel.
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"the checkpointer for run {self.run!r} rank {self.rank} was created in "
                f"process {self._pid}, and this is process {os.getpid()} (forked from it): "
                "its threads and connection stay with the parent; create a new Checkpointer "
                "in this process"
            )


def _shutdown_in(
    copier: SnapshotThread | None, worker: SaveWorker, connection: Connection,
    pool: StagingPool, timeout_s: float, *, owner_pid: int,
) -> None:
    """``shutdown`` in the process that made the checkpointer only: a forked child that
    exits normally runs the inherited finalizer too, and would unlink the parent's shared
    memory under it (and wait for threads that do not exist in the child)."""
    if os.getpid() == owner_pid:
        shutdown(copier, worker, connection, pool, timeout_s)


__all__ = ["Checkpointer"]
