"""The metrics module: families, labels, and the real HTTP endpoint a Prometheus scrapes."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import prometheus_client
import pytest
from ckptd.daemon.metrics import (
    Metrics,
    MetricsEndpoint,
    make_registry,
    parse_listen,
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
    metrics.save_received("run-a", 0, 4000)
    metrics.save_received("run-a", 1, 6000)
    metrics.save_durable(
        "run-a", 0, raw_bytes=4000, stored_bytes=400, encode_s=0.2, chain_depth=3,
        latency_s=0.7,
    )
    metrics.save_failed("StorageError")
    metrics.restore_done(1.5)
    metrics.error("RESOURCE_EXHAUSTED")
    metrics.error("RESOURCE_EXHAUSTED")
    metrics.set_inflight_bytes(6000)


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
    assert value(families["ckptd_bytes_stored"], "ckptd_bytes_stored_total") == 400
    assert value(families["ckptd_compression_ratio"], "ckptd_compression_ratio") == 10.0
    assert value(families["ckptd_chain_length"], "ckptd_chain_length") == 3
    assert value(families["ckptd_inflight_bytes"], "ckptd_inflight_bytes") == 6000
    encode = families["ckptd_encode_seconds"]
    assert value(encode, "ckptd_encode_seconds_count") == 1
    assert value(encode, "ckptd_encode_seconds_sum") == pytest.approx(0.2)
    assert value(encode, "ckptd_encode_seconds_bucket", le="0.25") == 1
    assert value(encode, "ckptd_encode_seconds_bucket", le="0.1") == 0
    latency = families["ckptd_save_latency_seconds"]
    assert value(latency, "ckptd_save_latency_seconds_bucket", le="1.0") == 1
    assert value(latency, "ckptd_save_latency_seconds_bucket", le="0.5") == 0
    assert value(families["ckptd_restore_seconds"], "ckptd_restore_seconds_count") == 1
    errors = families["ckptd_errors"]
    assert value(errors, "ckptd_errors_total", kind="RESOURCE_EXHAUSTED") == 2
    assert value(errors, "ckptd_errors_total", kind="StorageError") == 1
    assert "process_resident_memory_bytes" in families


def test_inflight_bytes_can_be_read_at_scrape_time(
    endpoint_and_metrics: tuple[MetricsEndpoint, Metrics],
) -> None:
    endpoint, metrics = endpoint_and_metrics
    budget = {"bytes": 123}
    metrics.track_inflight_bytes(lambda: budget["bytes"])
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


def test_per_run_labels_only_when_enabled() -> None:
    labelled = Metrics(make_registry(process_metrics=False), per_run_labels=True)
    plain = Metrics(make_registry(process_metrics=False))
    for metrics in (labelled, plain):
        exercise(metrics)

    def samples(metrics: Metrics, name: str) -> list[Sample]:
        return [s for f in metrics.registry.collect() for s in f.samples if s.name == name]

    ratio = samples(labelled, "ckptd_compression_ratio")
    assert [(s.labels, s.value) for s in ratio] == [({"run": "run-a", "rank": "0"}, 10.0)]
    received = samples(labelled, "ckptd_bytes_received_total")
    assert sorted((s.labels["rank"], s.value) for s in received) == [("0", 4000), ("1", 6000)]
    assert [s.labels for s in samples(plain, "ckptd_compression_ratio")] == [{}]


def test_registries_are_independent_and_the_global_one_is_untouched() -> None:
    first, second = Metrics(make_registry()), Metrics(make_registry())
    first.save_received("r", 0, 100)

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
