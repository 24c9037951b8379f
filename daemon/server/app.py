"""The daemon's lifecycle: start → serve → drain → close.

``Daemon.serve`` is the whole life of a daemon process: start the metrics endpoint when
one is configured, open storage, start the engine (which rebuilds its index from storage
and reports to the daemon's ``Metrics``), bind and start the gRPC server with health and
reflection, report ready, then wait for SIGTERM/SIGINT (or ``request_stop``). Stopping is
ordered so that nothing accepted is lost: health turns NOT_SERVING (load balancers and
clients stop sending), the engine drains (new saves get UNAVAILABLE while accepted ones
become durable, up to ``drain_timeout_s``; status and wait RPCs keep working), then the
gRPC server stops, the engine closes, storage closes, and the metrics endpoint closes last
(a scrape during the drain still sees it).

``serve_in_thread`` runs the same lifecycle on a private thread and loop, for tests and
benchmarks that want a real daemon inside their own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from ckptd.daemon import codec
from ckptd.daemon.config import DaemonConfig
from ckptd.daemon.engine.core import Engine
from ckptd.daemon.logs import fields, get_logger
from ckptd.daemon.server import allocator, listen, loops, shm
from ckptd.daemon.server.auth import Guard
from ckptd.daemon.server.metrics import (
    Metrics,
    MetricsEndpoint,
    make_registry,
    start_metrics_server,
)
from ckptd.daemon.server.policy import load_auth
from ckptd.daemon.server.servicer import CheckpointdServicer, add_to_server
from ckptd.daemon.storage import Storage, open_storage
from ckptd.protos import API_VERSION, installed_version
from ckptd.protos.v1 import pb
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = get_logger("server")
T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CheckpointdService"].full_name
_HEALTH_SERVICES = ("", SERVICE_NAME)
# After draining, in-flight RPCs (restores, waits) get this long to finish.
_STOP_GRACE_S = 5.0


class Daemon:
    """One daemon: storage, engine and gRPC server, started and stopped in order.

    All methods run on the daemon's event loop except ``request_stop_threadsafe``.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.address = ""
        # ``host:port`` of the metrics endpoint with its real port; empty without one.
        self.metrics_address = ""
        # One registry per daemon, so daemons sharing a process count apart.
        self.metrics = Metrics(make_registry())
        self.engine: Engine | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._storage: Storage | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._stop_requested: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reclaimer: asyncio.Task[None] | None = None
        # (path, inode) of the unix socket this daemon created, removed when it stops.
        self._socket: tuple[Path, int] | None = None

    @property
    def storage_url(self) -> str:
        return self._storage.url if self._storage is not None else self.config.storage_url

    async def start(self) -> str:
        """Opens storage, starts the engine and the server; returns the bound address."""
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._start_metrics_endpoint()
        if not allocator.tune():
            log.info("malloc thresholds left at the C library's defaults (not glibc)")
        # The codec's compiled kernels load (or compile) while storage opens and the engine
        # scans it, not on the first save; a save arriving sooner waits for them.
        threading.Thread(target=_warm_up_codec, name="ckptd-codec-warm-up", daemon=True).start()
        try:
            self._storage = storage = await asyncio.to_thread(
                open_storage, self.config.storage_url, file_mode=self.config.storage_mode)
            # Before the engine's start-up scan, which removes what it takes for leftovers.
            holder = (f"ckptd serve (pid {os.getpid()} on {socket.gethostname()}, "
                      f"--listen {self.config.listen})")
            await asyncio.to_thread(storage.claim, holder)
            self.engine = engine = Engine(self._storage, self.config.engine, self.metrics)
            self.metrics.track_inflight(lambda: engine.inflight_bytes,
                                        lambda: engine.inflight_saves)
            self.metrics.track_restores(lambda: engine.restore_bytes)
            await self.engine.start()
            self._server, self._health = self._build_server(self.engine)
            self.address = listen.bind(self._server, self.config)
            self._socket = listen.socket_identity(self.config.listen)
            await self._server.start()
            if shm.available():
                sweeper = shm.OrphanSweeper()
                await asyncio.to_thread(sweeper.sweep)
                self._reclaimer = asyncio.create_task(sweeper.sweep_every())
        except BaseException:
            await self._close_all()
            raise
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", fields(address=self.address, storage=self.storage_url,
                                      metrics=self.metrics_address or None))
        return self.address

    def _start_metrics_endpoint(self) -> None:
        """Binds the metrics endpoint first, so a taken port fails the start at once."""
        where = self.config.metrics_address
        if where is not None:
            host, port = where
            self._metrics_endpoint = start_metrics_server(self.metrics.registry, host, port)
            shown = f"[{host}]" if ":" in host else host
            self.metrics_address = f"{shown}:{self._metrics_endpoint.port}"

    def _build_server(self, engine: Engine) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Two daemons must not share a port (and split a run's saves between them).
                ("grpc.so_reuseport", 0),
                # Fixed 64 KiB HTTP/2 windows. With BDP probing gRPC grows each stream's
                # window and buffers what Python has not read yet, outside the in-flight
                # budget: 8 clients streaming 1 MiB chunks cost +100-250 MB RSS in gRPC
                # alone, against +40 MB without, for ~15-20% less loopback throughput
                # (bench/daemon.py's 8-client peak: 640-930 MB with it, 560 MB without).
                ("grpc.http2.bdp_probe", 0),
            ]
        )
        servicer = CheckpointdServicer(
            engine, self._server_info(), self.config.max_chunk_bytes, self.metrics,
            guard=self._guard(),
            stream_idle_timeout_s=self.config.stream_idle_timeout_s,
        )
        add_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server, health_servicer

    def _guard(self) -> Guard:
        """The servicer's auth check; open (and said so in the log) without any settings."""
        config = self.config
        policy, tokens = load_auth(config)
        if policy is None and not config.listen.startswith("unix:"):
            log.warning("no authentication: every client that reaches the port may read, "
                        "write and delete every run %s", fields(listen=config.listen))
        return Guard(policy, tokens, unix_socket=config.listen.startswith("unix:"),
                     metrics=self.metrics)

    def _server_info(self) -> pb.ServerInfo:
        engine = self.config.engine
        return pb.ServerInfo(
            version=installed_version(),
            api_version=API_VERSION,
            storage_url=self.storage_url,
            max_inflight_bytes=engine.max_inflight_bytes,
            max_message_bytes=self.config.max_message_bytes,
            max_chunk_bytes=self.config.max_chunk_bytes,
            max_checkpoint_bytes=engine.max_checkpoint_bytes,
            max_tensors=engine.max_tensors,
            default_bits=engine.default_bits,
            base_interval=engine.base_interval,
            shared_memory=shm.available(),
            hostname=socket.gethostname(),
            boot_id=_boot_id(),
            lossy_min_elements=engine.min_lossy_elements,
            auto_bits_max_error=engine.auto_bits_max_error,
            auto_bits_relative_to=engine.auto_bits_relative_to,
            buckets_per_octave=engine.buckets_per_octave,
        )

    def request_stop(self) -> None:
        """Asks ``serve`` to stop gracefully; call on the loop (signal handlers do)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    def request_stop_threadsafe(self) -> None:
        """Like ``request_stop``, from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.request_stop)

    async def stop(self) -> bool:
        """Drains and shuts down in order; returns whether every accepted save finished."""
        log.info("draining %s", fields(timeout_s=self.config.drain_timeout_s))
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        drained = True
        if self.engine is not None:
            drained = await self.engine.drain(self.config.drain_timeout_s)
            if not drained:
                log.warning(
                    "drain timed out; unfinished saves are not durable %s",
                    fields(timeout_s=self.config.drain_timeout_s),
                )
        if self._server is not None:
            await self._server.stop(_STOP_GRACE_S)
        await self._close_all()
        log.info("stopped %s", fields(drained=drained))
        return drained

    async def _close_all(self) -> None:
        if self._socket is not None:
            listen.remove_socket(*self._socket)
            self._socket = None
        if self._reclaimer is not None:
            self._reclaimer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reclaimer
            self._reclaimer = None
        try:
            if self.engine is not None:
                await self.engine.close()
        finally:
            try:
                if self._storage is not None:
                    await asyncio.to_thread(self._storage.close)
            finally:
                if self._metrics_endpoint is not None:
                    endpoint, self._metrics_endpoint = self._metrics_endpoint, None
                    await asyncio.to_thread(endpoint.close)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        if self._health is not None:
            for service in _HEALTH_SERVICES:
                await self._health.set(service, status)

    async def serve(
        self,
        *,
        install_signal_handlers: bool = True,
        on_ready: Callable[[Daemon], None] | None = None,
    ) -> bool:
        """Starts, reports ready, waits for a stop request or signal, then stops.

        Returns whether the drain finished every accepted save.
        """
        await self.start()
        assert self._stop_requested is not None
        try:
            with _SignalHandlers(self, enabled=install_signal_handlers):
                if on_ready is not None:
                    on_ready(self)
                await self._stop_requested.wait()
        finally:
            drained = await self.stop()
        return drained


class _SignalHandlers:
    """Routes SIGTERM and SIGINT to ``Daemon.request_stop`` while the daemon serves."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, daemon: Daemon, *, enabled: bool) -> None:
        self._daemon = daemon
        self._enabled = enabled
        self._loop = asyncio.get_running_loop()

    def _handle(self, signum: int) -> None:
        log.info("signal received %s", fields(signal=signal.Signals(signum).name))
        self._daemon.request_stop()

    def __enter__(self) -> None:
        if self._enabled:
            for signum in self.SIGNALS:
                self._loop.add_signal_handler(signum, self._handle, signum)

    def __exit__(self, *exc_info: object) -> None:
        if self._enabled:
            for signum in self.SIGNALS:
                self._loop.remove_signal_handler(signum)


def _boot_id() -> str:
    # Same hostname and boot id: the client shares the daemon's kernel, so its shared
    # memory is reachable. Absent outside Linux; clients then fall back to streaming.
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _warm_up_codec() -> None:
    started = time.monotonic()
    try:
        codec.warm_up()
    except Exception:  # the first save compiles again and reports the error itself
        log.exception("codec warm-up failed")
        return
    log.info("codec kernels ready %s", fields(seconds=round(time.monotonic() - started, 3)))


def run(config: DaemonConfig, on_ready: Callable[[Daemon], None] | None = None) -> bool:
    """Serves ``config`` in this (main) thread until SIGTERM/SIGINT, on its configured loop."""
    return loops.run(Daemon(config).serve(on_ready=on_ready), config.loop)


class RunningDaemon:
    """A daemon serving on its own thread and loop (see ``serve_in_thread``)."""

    def __init__(self, daemon: Daemon, thread: threading.Thread, failures: list[BaseException]):
        self._daemon = daemon
        self._thread = thread
        self._failures = failures

    @property
    def address(self) -> str:
        return self._daemon.address

    @property
    def storage_url(self) -> str:
        return self._daemon.storage_url

    @property
    def metrics_address(self) -> str:
        """``host:port`` of the metrics endpoint (real port), or "" without one."""
        return self._daemon.metrics_address

    @property
    def metrics(self) -> Metrics:
        return self._daemon.metrics

    def call(self, fn: Callable[[Engine], T], timeout_s: float = 30.0) -> T:
        """Runs ``fn(engine)`` on the daemon's loop and returns its result (for tests that
        inspect the engine, e.g. ``engine.inflight_bytes``, without racing its loop)."""
        loop, engine = self._daemon._loop, self._daemon.engine
        if loop is None or engine is None or not self._thread.is_alive():
            raise RuntimeError("the daemon is not running")

        async def on_loop() -> T:
            return fn(engine)

        return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(timeout_s)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Drains and stops the daemon like SIGTERM would; idempotent."""
        if self._thread.is_alive():
            self._daemon.request_stop_threadsafe()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"daemon at {self.address} did not stop within {timeout_s} s")
        if self._failures:
            failure, self._failures[:] = self._failures[0], []
            raise failure

    def __enter__(self) -> RunningDaemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_in_thread(config: DaemonConfig, start_timeout_s: float = 60.0) -> RunningDaemon:
    """Starts a daemon on a new thread with its own event loop; returns once it serves.

    Signals stay with the caller's main thread; stop the daemon with ``.stop()`` or by
    leaving the ``with`` block. Raises whatever made the start fail.
    """
    daemon = Daemon(config)
    ready = threading.Event()
    failures: list[BaseException] = []

    def main() -> None:
        try:
            serving = daemon.serve(install_signal_handlers=False, on_ready=lambda _: ready.set())
            loops.run(serving, config.loop)
        except BaseException as exc:
            failures.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=main, name="ckptd-daemon", daemon=True)
    thread.start()
    if not ready.wait(start_timeout_s):
        daemon.request_stop_threadsafe()
        raise TimeoutError(f"daemon did not start within {start_timeout_s} s")
    running = RunningDaemon(daemon, thread, failures)
    if failures:
        thread.join()
        running.stop()  # raises the start's failure
    return running
