"""Errors are one line ``ckptd: error: ...`` with a non-zero exit; the progress bar."""

from __future__ import annotations

import io
from pathlib import Path

from ckptd.daemon.cli.commands import EXIT_UNAVAILABLE
from ckptd.daemon.cli.output import Progress, format_bytes
from cli_support import CliRunner, Store


def _one_error_line(code: int, out: str, err: str) -> str:
    assert (code, out) == (1, "")
    assert err.startswith("ckptd: error: ") and err.count("\n") == 1, err
    return err


def test_unknown_run_names_the_known_ones(cli: CliRunner, source: list[str]) -> None:
    for argv in (["ls", "nope"], ["info", "nope"], ["verify", "nope"],
                 ["rm", "nope", "--yes"], ["export", "nope", "-o", "/tmp/unused.pt"]):
        err = _one_error_line(*cli(*argv, *source))
        assert "'nope'" in err and "alpha" in err, (argv, err)


def test_unknown_step_names_nearby_steps(
    cli: CliRunner, source: list[str], tmp_path: Path
) -> None:
    for argv in (["info", "alpha", "--step", "7"], ["verify", "alpha", "--step", "7"],
                 ["rm", "alpha", "--step", "7", "-y"],
                 ["export", "alpha", "--step", "7", "-o", str(tmp_path / "x.safetensors")]):
        err = _one_error_line(*cli(*argv, *source))
        assert "alpha/rank0/step7 does not exist" in err and "[1, 2, 3]" in err, (argv, err)
    assert not list(tmp_path.glob("*.safetensors"))


def test_invalid_run_name_and_usage_errors(cli: CliRunner, source: list[str]) -> None:
    err = _one_error_line(*cli("ls", "../etc", *source))
    assert "invalid run name '../etc'" in err
    err = _one_error_line(*cli("verify", "--step", "3", *source))
    assert "--rank and --step need RUN" in err


def test_the_target_defaults_to_the_environment(cli: CliRunner, store: Store) -> None:
    err = _one_error_line(*cli("ls"))
    assert "--target" in err and "CKPTD_TARGET" in err and "--storage" in err
    code, out, _ = cli("ls", environ={"CKPTD_TARGET": store.daemon.address})
    assert code == 0 and out.splitlines()[1].startswith("alpha")
    # --storage wins over the environment's target (which is not even reachable here).
    code, out, _ = cli("ls", "--storage", str(store.storage_path),
                       environ={"CKPTD_TARGET": "127.0.0.1:1"})
    assert code == 0 and out.splitlines()[1].startswith("alpha")


def test_unreachable_daemon_and_missing_storage(cli: CliRunner, tmp_path: Path) -> None:
    code, out, err = cli("ls", "--target", "127.0.0.1:1", "--timeout-s", "5")
    assert (code, out) == (EXIT_UNAVAILABLE, "") and err.startswith("ckptd: error: ")
    assert "daemon at 127.0.0.1:1" in err and "no ckptd daemon answered" in err
    missing = tmp_path / "missing"
    err = _one_error_line(*cli("info", "--storage", str(missing)))
    assert f"storage directory {missing} does not exist" in err
    assert not missing.exists()  # never created by a read


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_terminal() -> None:
    tty = _Tty()
    with Progress("restoring", 3 << 20, tty) as progress:
        progress.advance(3 << 20)
        assert tty.getvalue().endswith("restoring [" + "#" * 28 + "] 100% 3.0 MiB/3.0 MiB")
    assert tty.getvalue().endswith("\r\033[K")  # erased when done
    pipe = io.StringIO()
    with Progress("verifying", 2, pipe, unit="steps") as progress:
        progress.advance(2)
    assert pipe.getvalue() == ""
    assert (format_bytes(1023), format_bytes(1536)) == ("1023 B", "1.5 KiB")
