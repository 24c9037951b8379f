"""Prometheus metrics of one daemon, and the HTTP endpoint that serves them.

Every daemon owns its registry: ``Metrics(make_registry())`` registers its families in the
registry it is given and never touches ``prometheus_client``'s global default, so two
daemons in one process (tests, embedding) count separately.

Call order (the lead wires these; each method is thread-safe and cheap):

* servicer, once a save's bytes are all in and the engine accepted it: ``save_received``;
* engine pipeline, when a save is committed: ``save_durable``; when it fails after
  acceptance: ``save_failed``;
* servicer, after a restore streamed its last chunk: ``restore_done``;
* servicer's error table, for every error status it returns: ``error``;
* server, once after the engine exists: ``track_inflight_bytes(lambda: engine.inflight_bytes)``
  (read at scrape time; ``set_inflight_bytes`` is the push alternative).

Labels stay bounded: outcomes and error kinds are fixed sets, and run/rank labels appear
only when ``per_run_labels=True`` (a deployment with few, long runs may want them; a shared
daemon with thousands of runs must not).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import NamedTuple, TypeVar
from wsgiref.simple_server import WSGIServer

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
# Encoding a multi-GiB checkpoint takes seconds to minutes; restores span the same range.
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RUN_LABELS = ("run", "rank")
_MetricT = TypeVar("_MetricT", Counter, Gauge)
_LISTEN = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})$")


def make_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    """Returns a fresh registry, with the standard ``process_*`` and ``python_info``
    collectors unless ``process_metrics`` is False (they read ``/proc/self``)."""
    registry = CollectorRegistry()
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


class Metrics:
    """The daemon's metric families, registered in a registry the caller owns.

    Args:
        registry: Where the families are registered; one registry per daemon.
        per_run_labels: Label the per-save families (bytes, compression ratio, chain
            length) by ``run`` and ``rank``. Off by default: label cardinality grows with
            the number of runs and Prometheus keeps every series it ever saw.
    """

    def __init__(self, registry: CollectorRegistry, *, per_run_labels: bool = False) -> None:
        self.registry = registry
        self.per_run_labels = per_run_labels
        run_labels = _RUN_LABELS if per_run_labels else ()
        ns = NAMESPACE
        self._saves = Counter(
            "saves", "Saves by outcome: received (accepted), durable, failed.",
            ["outcome"], namespace=ns, registry=registry,
        )
        for outcome in SAVE_OUTCOMES:
            self._saves.labels(outcome=outcome)
        self._bytes_received = Counter(
            "bytes_received", "Raw tensor bytes of accepted saves.",
            run_labels, namespace=ns, registry=registry,
        )
        self._bytes_stored = Counter(
            "bytes_stored", "Bytes written to storage by durable saves (after compression).",
            run_labels, namespace=ns, registry=registry,
        )
        self._ratio = Gauge(
            "compression_ratio", "Raw over stored bytes of the latest durable save.",
            run_labels, namespace=ns, registry=registry,
        )
        self._chain = Gauge(
            "chain_length", "Deltas between the latest durable save and its base (0: a base).",
            run_labels, namespace=ns, registry=registry,
        )
        self._inflight = Gauge(
            "inflight_bytes", "Bytes reserved in the in-flight budget (accepted, not yet durable).",
            namespace=ns, registry=registry,
        )
        self._encode = Histogram(
            "encode_seconds", "Time to encode one save (delta, quantize, entropy-code).",
            namespace=ns, registry=registry, buckets=DURATION_BUCKETS_S,
        )
        self._latency = Histogram(
            "save_latency_seconds", "Time from a save's acceptance to its commit (durable).",
            namespace=ns, registry=registry, buckets=DURATION_BUCKETS_S,
        )
        self._restore = Histogram(
            "restore_seconds", "Time to serve one restore, first request to last chunk.",
            namespace=ns, registry=registry, buckets=DURATION_BUCKETS_S,
        )
        self._errors = Counter(
            "errors", "Errors by kind: gRPC status code name, or exception class of a failed save.",
            ["kind"], namespace=ns, registry=registry,
        )

    def _per_run(self, metric: _MetricT, run: str, rank: int) -> _MetricT:
        """The series of ``metric`` for this save: its run's child, or the metric itself."""
        return metric.labels(run=run, rank=str(rank)) if self.per_run_labels else metric

    def save_received(self, run: str, rank: int, nbytes: int) -> None:
        """Counts a save the daemon accepted, with its raw tensor bytes."""
        self._saves.labels(outcome="received").inc()
        self._per_run(self._bytes_received, run, rank).inc(nbytes)

    def save_durable(
        self, run: str, rank: int, *, raw_bytes: int, stored_bytes: int, encode_s: float,
        chain_depth: int, latency_s: float | None = None,
    ) -> None:
        """Counts a committed save: its stored size, encode time and place in the chain,
        and, when given, how long it took from acceptance to durable."""
        self._saves.labels(outcome="durable").inc()
        self._per_run(self._bytes_stored, run, rank).inc(stored_bytes)
        if stored_bytes > 0:
            self._per_run(self._ratio, run, rank).set(raw_bytes / stored_bytes)
        self._per_run(self._chain, run, rank).set(chain_depth)
        self._encode.observe(encode_s)
        if latency_s is not None:
            self._latency.observe(latency_s)

    def save_failed(self, kind: str) -> None:
        """Counts a save that failed after acceptance; ``kind`` is the exception class name."""
        self._saves.labels(outcome="failed").inc()
        self._errors.labels(kind=kind).inc()

    def restore_done(self, seconds: float) -> None:
        """Records the duration of a restore that completed."""
        self._restore.observe(seconds)

    def error(self, kind: str) -> None:
        """Counts an error returned to a client; ``kind`` is the gRPC status code name."""
        self._errors.labels(kind=kind).inc()

    def set_inflight_bytes(self, nbytes: int) -> None:
        """Sets the bytes currently held in the in-flight budget."""
        self._inflight.set(nbytes)

    def track_inflight_bytes(self, source: Callable[[], float]) -> None:
        """Reads the in-flight bytes from ``source`` at every scrape instead.

        ``source`` runs on the metrics server's thread, so it must only read a value
        (``lambda: engine.inflight_bytes`` reads one int, which is safe without the loop).
        """
        self._inflight.set_function(source)


class MetricsEndpoint(NamedTuple):
    """A running metrics HTTP server; unpacks as ``(server, thread, port)``."""

    server: WSGIServer
    thread: threading.Thread
    port: int

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops serving, closes the socket and joins the thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout_s)


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serves ``registry`` in the Prometheus text format on ``http://host:port/metrics``.

    Port 0 binds a free port; the bound one is in the result. The server runs in a daemon
    thread of its own, so a scrape never waits on the daemon's event loop.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread, server.server_address[1])


def parse_listen(address: str) -> tuple[str, int]:
    """Splits ``host:port`` or ``[v6]:port`` (as ``--metrics-listen`` takes it).

    Raises:
        ValueError: naming the address when it has no port or the port is out of range.
    """
    match = _LISTEN.match(address.strip())
    port = int(match.group("port")) if match else -1
    if match is None or port > 65535:
        raise ValueError(
            f"metrics listen address {address!r} is not HOST:PORT (e.g. 0.0.0.0:9100, "
            "[::]:9100, 127.0.0.1:0) with a port in 0..65535"
        )
    host = match.group("v6") or match.group("host") or "0.0.0.0"
    return host, port
