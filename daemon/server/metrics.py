"""Prometheus metrics of one daemon, and the HTTP endpoint that serves them.

Every daemon owns its registry: ``Metrics(make_registry())`` registers its families in the
registry it is given and never touches ``prometheus_client``'s global default, so two
daemons in one process (tests, embedding) count separately.

Who calls what (each method is thread-safe and cheap):

* the engine, through the ``EngineObserver`` interface ``Metrics`` implements:
  ``save_accepted``, ``save_durable``, ``save_failed``, ``chain_head``,
  ``step_quarantined``, ``quarantine_size``, ``resident_heads``, ``head_evicted``,
  ``retention_deleted``;
* the servicer: ``restore_done`` after a restore streamed its last chunk, ``rpc_error``
  for every error status it returns;
* the server, once: ``track_inflight`` and ``track_restores`` (read at scrape time, on the
  endpoint's thread).

Labels stay bounded: outcomes, methods, status codes and error classes are fixed sets;
counters are daemon totals; only the per-chain gauges carry ``run`` and ``rank``, one series
per (run, rank) that has steps in storage, removed when its last step is deleted.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import NamedTuple
from wsgiref.simple_server import WSGIServer

from ckptd.daemon.domain import StepKey
from ckptd.daemon.engine.observer import ChainHead, DurableSave, EngineObserver
from ckptd.daemon.engine.stages import SAVE_STAGES
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

NAMESPACE = "ckptd"
SAVE_OUTCOMES = ("received", "durable", "failed")
AUTH_DENIALS = ("unauthenticated", "permission_denied")
# Encoding a multi-GiB checkpoint takes seconds to minutes; restores span the same range.
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def make_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    """Returns a fresh registry, with the standard ``process_*`` and ``python_info``
    collectors unless ``process_metrics`` is False (they read ``/proc/self``)."""
    registry = CollectorRegistry()
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


class Metrics(EngineObserver):
    """The daemon's metric families, registered in a registry the caller owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(
                name, doc, namespace=NAMESPACE, registry=registry, buckets=DURATION_BUCKETS_S
            )

        self._saves = counter("saves", "Saves by outcome: received (accepted), durable, failed.",
                              ("outcome",))
        for outcome in SAVE_OUTCOMES:
            self._saves.labels(outcome=outcome)
        self._received = counter("bytes_received", "Raw tensor bytes of accepted saves.")
        self._durable = counter("bytes_durable", "Raw tensor bytes of durable saves.")
        self._stored = counter("bytes_stored",
                               "Storage bytes of durable saves (blobs and manifests).")
        self._restored = counter("bytes_restored", "Raw tensor bytes served by restores.")
        self._failures = counter("save_failures",
                                 "Accepted saves that failed, by exception class.", ("error",))
        self._errors = counter("rpc_errors", "Error statuses returned to clients, by RPC "
                               "method, gRPC status code and exception class.",
                               ("method", "code", "error"))
        self._auth_denied = counter(
            "auth_denied", "Calls refused by authentication or authorization, by reason: "
            "unauthenticated (no credentials the daemon accepts) or permission_denied.",
            ("reason",))
        for reason in AUTH_DENIALS:
            self._auth_denied.labels(reason=reason)
        self._quarantined = counter(
            "steps_quarantined", "Step directories this daemon moved to quarantine at start: "
            "a manifest missing or unreadable, the step possibly committed.")
        self._quarantine = gauge(
            "quarantine_steps", "Step directories in the quarantine area at start (cleared "
            "by `ckptd rm --quarantined`; nonzero needs an operator).")
        chain = ("run", "rank")
        self._ratio = gauge("compression_ratio",
                            "Raw over stored bytes of the latest durable step of a chain.", chain)
        self._chain = gauge("chain_length", "Steps a restore of a chain's latest durable step "
                            "reads: its base plus the deltas up to it (1 for a base).", chain)
        self._inflight_bytes = gauge(
            "inflight_bytes", "Bytes held in the in-flight budget (accepted, not yet durable).")
        self._inflight_saves = gauge(
            "inflight_saves", "Saves being received or waiting to become durable.")
        self._resident = gauge(
            "resident_reconstruction_bytes", "Bytes of chain-head reconstructions held in "
            "memory (bounded by max_resident_bytes, plus heads of chains saving).")
        self._evictions = counter(
            "reconstruction_evictions", "Chain heads dropped from memory, least recently "
            "used first, to stay within max_resident_bytes (rebuilt from storage on use).")
        self._retention_deleted = counter(
            "retention_deleted_steps", "Steps removed by retention policies: deleted, or "
            "hidden while a kept step still restores through them (counted once).")
        self._retention_seconds = counter(
            "retention_seconds", "Wall time retention held chain locks to delete steps and "
            "to rewrite kept deltas as bases.")
        self._restore_bytes = gauge(
            "restore_bytes", "Bytes held by restores being streamed (max_restore_bytes).")
        self._encode = histogram("encode_seconds",
                                 "Wall time to encode one save, first tensor to last.")
        self._stage_seconds = counter(
            "save_stage_seconds", "Busy seconds of durable saves by pipeline stage (receive, "
            "head, encode_exact, encode_delta, blob_checksum, write, sync, checksum, commit); "
            "stages overlap, so their sum may exceed the wall time.", ("stage",))
        for stage in SAVE_STAGES:
            self._stage_seconds.labels(stage=stage)
        self._latency = histogram("save_latency_seconds",
                                  "Wall time from a save's acceptance to its commit (durable).")
        self._restore = histogram("restore_seconds",
                                  "Wall time to serve one restore, request to last chunk.")

    # -- EngineObserver ------------------------------------------------------------------

    def save_accepted(self, key: StepKey, raw_bytes: int) -> None:
        self._saves.labels(outcome="received").inc()
        self._received.inc(raw_bytes)

    def save_durable(self, save: DurableSave) -> None:
        self._saves.labels(outcome="durable").inc()
        self._durable.inc(save.raw_bytes)
        self._stored.inc(save.stored_bytes)
        self._encode.observe(save.encode_s)
        self._latency.observe(save.latency_s)
        for stage, seconds in save.stages.items():
            self._stage_seconds.labels(stage=stage).inc(seconds)

    def save_failed(self, key: StepKey, kind: str, message: str) -> None:
        self._saves.labels(outcome="failed").inc()
        self._failures.labels(error=kind).inc()

    def step_quarantined(self, key: StepKey, reason: str) -> None:
        self._quarantined.inc()

    def quarantine_size(self, steps: int) -> None:
        self._quarantine.set(steps)

    def resident_heads(self, nbytes: int) -> None:
        self._resident.set(nbytes)

    def head_evicted(self, nbytes: int) -> None:
        self._evictions.inc()

    def retention_deleted(self, run: str, rank: int, steps: int, seconds: float) -> None:
        self._retention_deleted.inc(steps)
        self._retention_seconds.inc(seconds)

    def chain_head(self, run: str, rank: int, head: ChainHead | None) -> None:
        labels = (run, str(rank))
        if head is None:
            for gauge in (self._ratio, self._chain):
                # Absent when the chain never had a durable step.
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
            return
        self._ratio.labels(*labels).set(head.compression_ratio)
        self._chain.labels(*labels).set(head.chain_depth + 1)

    # -- transport and server ------------------------------------------------------------

    def restore_done(self, seconds: float, raw_bytes: int) -> None:
        """Records a restore that streamed its last chunk."""
        self._restore.observe(seconds)
        self._restored.inc(raw_bytes)

    def rpc_error(self, method: str, code: str, error: str) -> None:
        """Counts an error status returned to a client (``code`` is the status's name)."""
        self._errors.labels(method=method, code=code, error=error).inc()

    def auth_denied(self, reason: str) -> None:
        """Counts a call refused for its credentials (``reason`` is one of ``AUTH_DENIALS``)."""
        self._auth_denied.labels(reason=reason).inc()

    def track_inflight(
        self, inflight_bytes: Callable[[], float], inflight_saves: Callable[[], float]
    ) -> None:
        """Reads the in-flight gauges from these functions at every scrape.

        They run on the metrics server's thread, so they must only read a value
        (``lambda: engine.inflight_bytes`` reads one int, which is safe without the loop).
        """
        self._inflight_bytes.set_function(inflight_bytes)
        self._inflight_saves.set_function(inflight_saves)

    def track_restores(self, restore_bytes: Callable[[], float]) -> None:
        """Reads the restore gauge from this function at every scrape (as above)."""
        self._restore_bytes.set_function(restore_bytes)


class MetricsEndpoint(NamedTuple):
    """A running metrics HTTP server; unpacks as ``(server, thread, port)``."""

    server: WSGIServer
    thread: threading.Thread
    port: int

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops serving, closes the socket and joins the thread (blocks up to ~0.5 s:
        the server notices the shutdown at its next poll)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout_s)


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serves ``registry`` in the Prometheus text format on ``http://host:port/metrics``.

    Port 0 binds a free port; the bound one is in the result. The server runs in a daemon
    thread of its own, so a scrape never waits on the daemon's event loop.

    Raises:
        OSError: naming the address when it cannot be bound (in use, unknown host).
    """
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    return MetricsEndpoint(server, thread, server.server_address[1])
