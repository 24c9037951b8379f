"""A real daemon's metrics endpoint and logs agree with what its clients did.

Saves, restores and refused requests go through the gRPC API; the endpoint is scraped over
HTTP and parsed with prometheus_client's own parser; log lines are read as records
(in-process) and as the JSON lines a ``ckptd serve --log-format json`` writes.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.daemon.config import DaemonConfig, EngineConfig
from ckptd.daemon.engine.stages import SAVE_STAGES
from ckptd.daemon.logs import LOGGER_NAME, split_record
from ckptd.daemon.server.metrics import make_registry, start_metrics_server
from ckptd.protos.v1 import pb
from daemon_harness import InProcessDaemon, SpawnDaemon, start_in_process
from prometheus_client.parser import text_string_to_metric_families

RUN = "observed"
STEPS = 3
# Deltas all the way: step 3's restore reads base + 2 deltas.
CHAINED = EngineConfig(base_interval=1000, max_delta_fraction=100.0)


def states(steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(20_000).astype(np.float32)
    out = []
    for step in range(steps):
        out.append({"w": weight.copy(), "step": np.array([step], dtype=np.int64)})
        weight += 0.01 * rng.standard_normal(weight.size).astype(np.float32)
    return out


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    host, port = address.rsplit(":", 1)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[InProcessDaemon]:
    running = start_in_process(tmp_path / "storage", metrics_listen="127.0.0.1:0",
                               engine=CHAINED)
    try:
        yield running
    finally:
        running.stop()


def test_metrics_count_saves_bytes_restores_and_errors(observed: InProcessDaemon) -> None:
    address = observed.running.metrics_address
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    data = states()
    raw = sum(a.nbytes for a in data[0].values())
    with grpc.insecure_channel(observed.address) as channel:
        client = wire.stub(channel)
        for step, arrays in enumerate(data, start=1):
            wire.save_durable(client, RUN, step, arrays)
        _, restored = wire.restore(client, RUN)
        assert restored["step"].tolist() == [STEPS - 1]
        missing = wire.rpc_error(lambda: wire.restore(client, "no-such-run"))
        assert missing.code() is grpc.StatusCode.NOT_FOUND
        again = wire.rpc_error(lambda: wire.save(client, RUN, 1, data[0]))
        assert again.code() is grpc.StatusCode.ALREADY_EXISTS
        steps = client.ListSteps(pb.ListStepsRequest(run=RUN, rank=0)).steps

    got = scrape(address)

    def sample(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    chain = {"run": RUN, "rank": "0"}
    assert sample("ckptd_saves_total", outcome="received") == STEPS
    assert sample("ckptd_saves_total", outcome="durable") == STEPS
    assert sample("ckptd_saves_total", outcome="failed") == 0
    assert sample("ckptd_bytes_received_total") == STEPS * raw
    assert sample("ckptd_bytes_durable_total") == STEPS * raw
    assert sample("ckptd_bytes_stored_total") == sum(s.stored_bytes for s in steps)
    assert [s.kind for s in steps] == [pb.STEP_KIND_BASE] + [pb.STEP_KIND_DELTA] * 2
    assert sample("ckptd_compression_ratio", **chain) == pytest.approx(
        raw / steps[-1].stored_bytes
    )
    assert sample("ckptd_compression_ratio", **chain) > 1
    assert sample("ckptd_chain_length", **chain) == STEPS
    assert sample("ckptd_encode_seconds_count") == STEPS
    assert sample("ckptd_save_latency_seconds_count") == STEPS
    stage = {name: sample("ckptd_save_stage_seconds_total", stage=name) for name in SAVE_STAGES}
    # One base then deltas: each coding stage ran; every stage is exported, none negative.
    assert stage["encode_exact"] > 0 and stage["encode_delta"] > 0 and stage["write"] > 0
    assert min(stage.values()) >= 0
    assert sample("ckptd_restore_seconds_count") == 1
    assert sample("ckptd_bytes_restored_total") == raw
    assert sample("ckptd_rpc_errors_total", method="Restore", code="NOT_FOUND",
                  error="RunNotFoundError") == 1
    assert sample("ckptd_rpc_errors_total", method="Save", code="ALREADY_EXISTS",
                  error="StepExistsError") == 1
    assert sum(v for (name, _), v in got.items() if name == "ckptd_rpc_errors_total") == 2
    assert sample("ckptd_inflight_bytes") == 0
    assert sample("ckptd_inflight_saves") == 0


def test_chain_gauges_survive_a_restart_and_go_with_the_run(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    first = start_in_process(storage, engine=CHAINED)
    try:
        with grpc.insecure_channel(first.address) as channel:
            for step, arrays in enumerate(states(2), start=1):
                wire.save_durable(wire.stub(channel), RUN, step, arrays)
    finally:
        first.stop()
    assert first.running.metrics_address == ""  # no endpoint unless configured

    second = start_in_process(storage, engine=CHAINED)
    try:
        registry = second.running.metrics.registry
        labels = {"run": RUN, "rank": "0"}
        assert registry.get_sample_value("ckptd_chain_length", labels) == 2
        with grpc.insecure_channel(second.address) as channel:
            wire.stub(channel).DeleteRun(pb.DeleteRunRequest(run=RUN))
        assert registry.get_sample_value("ckptd_chain_length", labels) is None
        assert registry.get_sample_value("ckptd_compression_ratio", labels) is None
    finally:
        second.stop()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_every_line_about_a_save_or_restore_names_run_rank_and_step(
    observed: InProcessDaemon,
) -> None:
    handler = Records()
    logger = logging.getLogger(LOGGER_NAME)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with grpc.insecure_channel(observed.address) as channel:
            client = wire.stub(channel)
            for step, arrays in enumerate(states(2), start=5):
                wire.save_durable(client, RUN, step, arrays, rank=3)
            wire.restore(client, RUN, 5, rank=3)
            wire.rpc_error(lambda: wire.save(client, RUN, 5, states(1)[0], rank=3))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    lines = [split_record(record) for record in handler.records]
    about_steps = [(msg, values) for msg, values in lines
                   if msg.startswith(("save", "encoding save", "restore", "request failed"))]
    messages = [msg for msg, _ in about_steps]
    for expected in ("save accepted", "encoding save", "save durable", "restore served",
                     "request failed"):
        assert expected in messages, messages
    for msg, values in about_steps:
        assert values["run"] == RUN and values["rank"] == 3, (msg, values)
        assert values["step"] in (5, 6), (msg, values)
    (served,) = [values for msg, values in about_steps if msg == "restore served"]
    assert served["prepare_s"] + served["stream_s"] == pytest.approx(served["seconds"], abs=2e-4)
    durable = [values for msg, values in about_steps if msg == "save durable"]
    assert durable and all(f"{stage}_s" in values for values in durable for stage in SAVE_STAGES)
    (refused,) = [values for msg, values in about_steps if msg == "request failed"]
    assert refused["step"] == 5 and refused["error"] == "StepExistsError"


def test_serve_flags_give_json_logs_and_a_metrics_endpoint(
    tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    daemon = spawn_daemon(tmp_path / "storage", "--log-format", "json",
                          env={"CKPTD_METRICS_LISTEN": "127.0.0.1:0"})
    try:
        with grpc.insecure_channel(daemon.address) as channel:
            wire.save_durable(wire.stub(channel), RUN, 1, states(1)[0], rank=2)
        serving = [json.loads(line) for line in daemon.log().splitlines()
                   if line.startswith("{") and '"serving"' in line]
        (line,) = serving
        assert line["address"] == daemon.address
        assert daemon.info["metrics_address"] == line["metrics"]  # the ready file has it too
        got = scrape(line["metrics"])
        assert got[("ckptd_saves_total", (("outcome", "durable"),))] == 1
    finally:
        assert daemon.terminate() == 0
    records = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    assert {"time", "level", "logger", "msg"} <= set(records[0])
    saves = [r for r in records if r["msg"] in ("save accepted", "save durable")]
    assert [r["msg"] for r in saves] == ["save accepted", "save durable"]
    for record in saves:
        assert (record["run"], record["rank"], record["step"]) == (RUN, 2, 1)


def test_settings_parse_and_reject_naming_the_value() -> None:
    config = DaemonConfig.from_env(
        {"CKPTD_STORAGE": "/unused", "CKPTD_METRICS_LISTEN": "[::]:9100"},
        {"log_format": "JSON"},
    )
    assert (config.metrics_address, config.log_format) == (("::", 9100), "json")
    assert DaemonConfig(storage_url="/unused").metrics_address is None
    with pytest.raises(ValueError, match="log_format must be one of text, json, got 'xml'"):
        DaemonConfig.from_settings({"storage": "/unused", "log_format": "xml"})
    with pytest.raises(ValueError, match="metrics listen address '9100'"):
        DaemonConfig.from_settings({"storage": "/unused", "metrics_listen": "9100"})


def test_a_taken_metrics_port_fails_the_start(tmp_path: Path) -> None:
    taken = start_metrics_server(make_registry(process_metrics=False), "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{taken.port}"):
            start_in_process(tmp_path / "storage", metrics_listen=f"127.0.0.1:{taken.port}")
    finally:
        taken.close()
