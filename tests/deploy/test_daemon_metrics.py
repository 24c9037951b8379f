"""The metrics module: families, labels, and the real HTTP endpoint a Prometheus scrapes.

These feed ``Metrics`` by hand; ``tests/server/test_daemon_observability.py`` checks the
same families against what a real daemon did.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import prometheus_client
import pytest
from ckptd.daemon.config import DaemonConfig, parse_listen
from ckptd.daemon.domain import StepKey
from ckptd.daemon.engine.observer import ChainHead, DurableSave
from ckptd.daemon.server.metrics import (
    Metrics,
    MetricsEndpoint,
    make_registry,
    start_metrics_server,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@pytest.fixture
def endpoint_and_metrics() -> Iterator[tuple[MetricsEndpoint, Metrics]]:
    registry = make_registry()
    metrics = Metrics(registry)
    endpoint = start_metrics_server(registry, "127.0.0.1", 0)
    yield endpoint, metrics
    endpoint.close()


def scrape(port: int) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name}{labels} in {samples}"
    return matches[0]


def exercise(metrics: Metrics) -> None:
    first, second = StepKey("run-a", 0, 7), StepKey("run-a", 1, 7)
    metrics.save_accepted(first, 4000)
    metrics.save_accepted(second, 6000)
    metrics.save_durable(DurableSave(first, "delta", 4000, 400, encode_s=0.2, latency_s=0.7))
    metrics.chain_head("run-a", 0, ChainHead(7, chain_depth=2, raw_bytes=4000, stored_bytes=400))
    metrics.save_failed(second, "StorageError", "disk full")
    metrics.restore_done(1.5, 4000)
    metrics.rpc_error("Save", "RESOURCE_EXHAUSTED", "BusyError")
    metrics.rpc_error("Save", "RESOURCE_EXHAUSTED", "BusyError")
    metrics.track_inflight(lambda: 6000, lambda: 1)


def test_endpoint_serves_every_family_with_the_recorded_values(
    endpoint_and_metrics: tuple[MetricsEndpoint, Metrics],
) -> None:
    endpoint, metrics = endpoint_and_metrics
    assert endpoint.port > 0
    exercise(metrics)

    families = scrape(endpoint.port)

    saves = families["ckptd_saves"]
    assert value(saves, "ckptd_saves_total", outcome="received") == 2
    assert value(saves, "ckptd_saves_total", outcome="durable") == 1
    assert value(saves, "ckptd_saves_total", outcome="failed") == 1
    assert value(families["ckptd_bytes_received"], "ckptd_bytes_received_total") == 10000
    assert value(families["ckptd_bytes_durable"], "ckptd_bytes_durable_total") == 4000
    assert value(families["ckptd_bytes_stored"], "ckptd_bytes_stored_total") == 400
    assert value(families["ckptd_bytes_restored"], "ckptd_bytes_restored_total") == 4000
    chain = {"run": "run-a", "rank": "0"}
    assert value(families["ckptd_compression_ratio"], "ckptd_compression_ratio", **chain) == 10
    assert value(families["ckptd_chain_length"], "ckptd_chain_length", **chain) == 3
    assert value(families["ckptd_inflight_bytes"], "ckptd_inflight_bytes") == 6000
    assert value(families["ckptd_inflight_saves"], "ckptd_inflight_saves") == 1
    encode = families["ckptd_encode_seconds"]
    assert value(encode, "ckptd_encode_seconds_count") == 1
    assert value(encode, "ckptd_encode_seconds_sum") == pytest.approx(0.2)
    assert value(encode, "ckptd_encode_seconds_bucket", le="0.25") == 1
    assert value(encode, "ckptd_encode_seconds_bucket", le="0.1") == 0
    latency = families["ckptd_save_latency_seconds"]
    assert value(latency, "ckptd_save_latency_seconds_bucket", le="1.0") == 1
    assert value(latency, "ckptd_save_latency_seconds_bucket", le="0.5") == 0
    assert value(families["ckptd_restore_seconds"], "ckptd_restore_seconds_count") == 1
    errors = families["ckptd_rpc_errors"]
    busy = {"method": "Save", "code": "RESOURCE_EXHAUSTED", "error": "BusyError"}
    assert value(errors, "ckptd_rpc_errors_total", **busy) == 2
    failures = families["ckptd_save_failures"]
    assert value(failures, "ckptd_save_failures_total", error="StorageError") == 1
    assert "process_resident_memory_bytes" in families


def test_inflight_bytes_are_read_at_scrape_time(
    endpoint_and_metrics: tuple[MetricsEndpoint, Metrics],
) -> None:
    endpoint, metrics = endpoint_and_metrics
    budget = {"bytes": 123}
    metrics.track_inflight(lambda: budget["bytes"], lambda: 0)
    assert value(scrape(endpoint.port)["ckptd_inflight_bytes"], "ckptd_inflight_bytes") == 123
    budget["bytes"] = 0
    assert value(scrape(endpoint.port)["ckptd_inflight_bytes"], "ckptd_inflight_bytes") == 0


def test_outcomes_are_exported_before_any_save(
    endpoint_and_metrics: tuple[MetricsEndpoint, Metrics],
) -> None:
    endpoint, _ = endpoint_and_metrics
    saves = scrape(endpoint.port)["ckptd_saves"]
    for outcome in ("received", "durable", "failed"):
        assert value(saves, "ckptd_saves_total", outcome=outcome) == 0


def samples(metrics: Metrics, name: str) -> list[Sample]:
    return [s for f in metrics.registry.collect() for s in f.samples if s.name == name]


def test_only_chain_gauges_carry_run_labels_and_a_deleted_chain_drops_them() -> None:
    metrics = Metrics(make_registry(process_metrics=False))
    exercise(metrics)
    metrics.chain_head("run-b", 3, ChainHead(1, chain_depth=0, raw_bytes=10, stored_bytes=5))
    run_labelled = {
        s.name for f in metrics.registry.collect() for s in f.samples if "run" in s.labels
    }
    assert run_labelled == {"ckptd_compression_ratio", "ckptd_chain_length"}
    assert {s.labels["run"] for s in samples(metrics, "ckptd_chain_length")} == {"run-a", "run-b"}

    metrics.chain_head("run-a", 0, None)
    metrics.chain_head("never-saved", 0, None)  # nothing to drop: not an error
    for name in ("ckptd_chain_length", "ckptd_compression_ratio"):
        assert [s.labels for s in samples(metrics, name)] == [{"run": "run-b", "rank": "3"}]


def test_registries_are_independent_and_the_global_one_is_untouched() -> None:
    first, second = Metrics(make_registry()), Metrics(make_registry())
    first.save_accepted(StepKey("r", 0, 1), 100)

    def received(metrics: Metrics) -> float | None:
        return metrics.registry.get_sample_value("ckptd_bytes_received_total")

    assert received(first) == 100
    assert received(second) == 0
    assert prometheus_client.REGISTRY.get_sample_value("ckptd_bytes_received_total") is None


def test_closed_endpoint_refuses_connections() -> None:
    registry = make_registry(process_metrics=False)
    endpoint = start_metrics_server(registry, "127.0.0.1", 0)
    assert scrape(endpoint.port) == {}  # reachable before close; nothing registered
    endpoint.close()
    assert not endpoint.thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        scrape(endpoint.port)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::]:9100", ("::", 9100)),
        (":9100", ("0.0.0.0", 9100)),
        ("metrics.local:65535", ("metrics.local", 65535)),
    ],
)
def test_parse_listen_accepts(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen(address) == expected


@pytest.mark.parametrize("address", ["9100", "0.0.0.0", "host:70000", "::1:9100", "h:p"])
def test_parse_listen_rejects_naming_the_address(address: str) -> None:
    with pytest.raises(ValueError, match="metrics listen address") as info:
        parse_listen(address)
    assert repr(address) in str(info.value)
    with pytest.raises(ValueError, match="metrics listen address"):
        DaemonConfig(storage_url="/unused", metrics_listen=address)


def test_taken_port_fails_naming_the_address() -> None:
    registry = make_registry(process_metrics=False)
    endpoint = start_metrics_server(registry, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{endpoint.port}"):
            start_metrics_server(registry, "127.0.0.1", endpoint.port)
    finally:
        endpoint.close()
