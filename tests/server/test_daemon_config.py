"""Configuration layers (defaults < CKPTD_* env < flags), loop factories and CLI parsing."""

from __future__ import annotations

import asyncio

import pytest
from ckptd.daemon.cli import app as cli
from ckptd.daemon.config import (
    AUTO_BITS,
    SETTINGS,
    DaemonConfig,
    EngineConfig,
    GiB,
    MiB,
    env_name,
    parse_bytes,
)
from ckptd.daemon.server import loops


def test_env_fills_fields_and_flags_win() -> None:
    environ = {
        "CKPTD_STORAGE": "/data/env",
        "CKPTD_BITS": "4",
        "CKPTD_MAX_INFLIGHT_BYTES": "1GiB",
        "CKPTD_LOOP": "asyncio",
        "UNRELATED": "x",
    }
    config = DaemonConfig.from_env(environ, {"bits": "5", "listen": "unix:///run/c.sock"})
    assert config.storage_url == "/data/env"
    assert config.loop == "asyncio"
    assert config.listen == "unix:///run/c.sock"
    assert config.engine.default_bits == 5
    assert config.engine.max_inflight_bytes == GiB


def test_absent_flags_keep_env_values() -> None:
    config = DaemonConfig.from_env({"CKPTD_STORAGE": "s3://b/p"}, {"storage": None, "bits": None})
    assert config.storage_url == "s3://b/p"
    assert config.engine.default_bits == DaemonConfig(storage_url="x").engine.default_bits


def test_every_setting_has_an_env_var_and_a_flag() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", *[f"--{name.replace('_', '-')}=1" for name in SETTINGS]])
    for name in SETTINGS:
        assert getattr(args, name) == "1", name
        assert env_name(name) == "CKPTD_" + name.upper()


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({}, "no storage given"),
        ({"storage": "/d", "bits": "eleven"}, "bits"),
        ({"storage": "/d", "bits": "9"}, "default_bits must be in 1..8, got 9"),
        ({"storage": "/d", "loop": "trio"}, "'trio'"),
        ({"storage": "/d", "max_inflight_bytes": "lots"}, "max_inflight_bytes"),
        ({"storage": "/d", "max_chunk_bytes": "8MiB"}, "must exceed max_chunk_bytes"),
        ({"storage": "/d", "colour": "blue"}, "colour"),
        ({"storage": "/d", "coder": "rans"}, "coder must be 'zstd' or 'huffman', got 'rans'"),
        ({"storage": "/d", "representative": "median"}, "'median'"),
        ({"storage": "/d", "max_delta_fraction": "-1"}, "max_delta_fraction must be >= 0"),
        ({"storage": "/d", "min_lossy_elements": "0"}, "min_lossy_elements must be >= 1"),
    ],
)
def test_bad_settings_name_the_problem(settings: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError) as info:
        DaemonConfig.from_settings(settings)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", MiB), ("512MiB", 512 * MiB), ("2GiB", 2 * GiB), ("1.5GB", 1_500_000_000)],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_cli_reports_config_errors_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve"], environ={}) == 2
    assert "no storage given" in capsys.readouterr().err


def test_loop_factories_make_the_loop_they_name() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert loops.loop_factory("auto") is uvloop.new_event_loop
    assert loops.loop_factory("uvloop") is uvloop.new_event_loop
    assert loops.loop_factory("asyncio") is asyncio.new_event_loop
    with pytest.raises(ValueError, match="'trio'"):
        loops.loop_factory("trio")


def test_run_leaves_the_global_policy_alone() -> None:
    policy = asyncio.get_event_loop_policy()

    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loops.run(loop_type(), "uvloop").startswith("uvloop")
    assert loops.run(loop_type(), "asyncio").startswith("asyncio")
    assert asyncio.get_event_loop_policy() is policy


def test_bits_auto_selects_the_adaptive_width() -> None:
    config = DaemonConfig.from_env({"CKPTD_STORAGE": "/d", "CKPTD_AUTO_BITS_MAX_ERROR": "0.3"},
                                   {"bits": "Auto"})
    assert (config.engine.default_bits, config.engine.auto_bits_max_error) == (AUTO_BITS, 0.3)
    with pytest.raises(ValueError, match="auto_bits_max_error must be in"):
        DaemonConfig.from_env({"CKPTD_STORAGE": "/d"}, {"auto_bits_max_error": "1.5"})


def test_auto_bits_relative_to_is_a_setting() -> None:
    """The state-relative budget of bits="auto" is opt-in: flag, environment and settings
    file alike; anything but delta/state is refused naming the value."""
    assert EngineConfig().auto_bits_relative_to == "delta"
    config = DaemonConfig.from_env({"CKPTD_STORAGE": "/d"}, {"auto_bits_relative_to": "State"})
    assert config.engine.auto_bits_relative_to == "state"
    with pytest.raises(ValueError, match=r"auto_bits_relative_to must be .* got 'tensor'"):
        DaemonConfig.from_env({"CKPTD_STORAGE": "/d", "CKPTD_AUTO_BITS_RELATIVE_TO": "tensor"},
                              {})


def test_buckets_per_octave_is_a_setting() -> None:
    """Finer buckets ship on (2 per octave; 1 is LC-Checkpoint's octaves); flag and
    environment alike; anything but 1, 2, 4 is refused naming the value."""
    assert EngineConfig().buckets_per_octave == 2
    config = DaemonConfig.from_env({"CKPTD_STORAGE": "/d", "CKPTD_BUCKETS_PER_OCTAVE": "1"}, {})
    assert config.engine.buckets_per_octave == 1
    with pytest.raises(ValueError, match=r"buckets_per_octave must be 1, 2 or 4, got 3"):
        DaemonConfig.from_env({"CKPTD_STORAGE": "/d"}, {"buckets_per_octave": "3"})
