"""``ckptd verify`` and ``ckptd rm``, against a daemon and directly on its storage."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd.daemon.domain import StepKey
from ckptd.daemon.errors import ChainLeasedError
from ckptd.daemon.store.repository import Repository
from cli_support import CliRunner, Store, assert_same_state
from daemon_harness import stored_blob_key


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _steps(cli: CliRunner, source: list[str], run: str) -> dict[str, list[tuple[int, str]]]:
    code, out, err = cli("ls", run, "--json", *source)
    assert code == 0, err
    return {rank: [(s["step"], s["kind"]) for s in steps]
            for rank, steps in json.loads(out)["ranks"].items()}


def test_verify_passes_on_intact_checkpoints(cli: CliRunner, source: list[str]) -> None:
    code, out, _ = cli("verify", *source)
    assert code == 0
    assert out.splitlines()[-1].startswith("verified 8 steps of 3 chains in ")
    assert out.rstrip().endswith("all checksums match")

    code, out, _ = cli("verify", "alpha", "--rank", "1", "--step", "2", *source)
    assert code == 0
    assert "verified 1 steps of 1 chains" in out


def test_verify_reports_every_corrupt_step(
    cli: CliRunner, source: list[str], store: Store
) -> None:
    damaged = stored_blob_key(store.storage_path, "alpha", 0, 2, 0)
    blob = store.storage_path / damaged
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    code, out, err = cli("verify", "alpha", *source)
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert failed[0].startswith("FAILED alpha/rank0/step2: CorruptCheckpointError: ")
    assert f"blob {damaged} " in failed[0] and "checksum" in failed[0]
    # Step 3 is a delta on step 2: restored from storage, it fails too. (A daemon serves
    # its chain's newest step from memory, so there step 3 still verifies.)
    expected_failures = 2 if source[0] == "--storage" else 1
    assert len(failed) == expected_failures
    assert out.splitlines()[-1].endswith(f"{expected_failures} failed")
    assert "Traceback" not in err


def test_rm_step_rebases_its_dependant(
    cli: CliRunner, source: list[str], store: Store, tmp_path: Path
) -> None:
    code, out, _ = cli("rm", "alpha", "--step", "2", "--yes", *source)
    assert (code, out) == (0, "deleted step alpha/rank0/step2: 1 steps\n")
    assert _steps(cli, source, "alpha") == {
        "0": [(1, "base"), (3, "base")],
        "1": [(1, "base"), (2, "delta"), (3, "delta")],
    }
    exported = tmp_path / "s3.pt"
    assert cli("export", "alpha", "--step", "3", "-o", str(exported), *source)[0] == 0
    assert_same_state(torch.load(exported, weights_only=True), store.restored[("alpha", 0, 3)])
    assert cli("verify", *source)[0] == 0


def test_rm_rank_and_run(cli: CliRunner, source: list[str]) -> None:
    code, out, _ = cli("rm", "alpha", "--rank", "1", "-y", *source)
    assert (code, out) == (0, "deleted rank 1 of run 'alpha': 3 steps\n")
    assert sorted(_steps(cli, source, "alpha")) == ["0"]

    code, out, _ = cli("rm", "beta", "--yes", *source)
    assert (code, out) == (0, "deleted run 'beta': 2 steps\n")
    code, out, _ = cli("ls", "--json", *source)
    assert [(r["run"], r["rank"]) for r in json.loads(out)] == [("alpha", 0)]


def test_rm_without_yes_refuses_without_a_terminal(cli: CliRunner, source: list[str]) -> None:
    code, out, err = cli("rm", "beta", *source)  # pytest's stdin is not a terminal
    assert (code, out) == (1, "")
    assert err.startswith("ckptd: error: refusing to delete run 'beta' (2 steps, ranks [0])")
    assert err.rstrip().endswith("without --yes: no terminal to ask on")

    code, _, err = cli("rm", "beta", *source, environ={"CI": "true"})
    assert code == 1 and "(CI is set)" in err
    assert sorted(_steps(cli, source, "beta")) == ["0"]


def test_rm_asks_on_a_terminal(
    cli: CliRunner, source: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    code, out, err = cli("rm", "beta", "--step", "10", *source)
    assert (code, out) == (1, "")
    assert err.startswith("delete step beta/rank0/step10 from ")
    assert "[y/N] ckptd: nothing deleted" in err
    assert ("no daemon may be serving" in err) == (source[0] == "--storage")

    monkeypatch.setattr("sys.stdin", _Terminal("yes\n"))
    assert cli("rm", "beta", "--step", "10", *source)[0] == 0
    assert _steps(cli, source, "beta") == {"0": [(20, "base")]}


def test_rm_on_storage_a_daemon_serves_is_refused(cli: CliRunner, store: Store) -> None:
    # The daemon holds the storage's lock: a direct deletion would pull steps out from
    # under the chains it builds deltas on.
    code, out, err = cli("rm", "alpha", "--step", "2", "--yes", "--storage",
                         str(store.storage_path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "is in use by ckptd serve (pid " in err, err
    assert [s for s, _ in _steps(cli, ["--target", store.daemon.address], "alpha")["0"]] == [
        1, 2, 3]
    # Once the daemon is gone, the same command works.
    store.daemon.stop()
    code, _, err = cli("rm", "alpha", "--step", "2", "--yes", "--storage",
                       str(store.storage_path))
    assert code == 0, err
    steps = _steps(cli, ["--storage", str(store.storage_path)], "alpha")["0"]
    assert [step for step, _ in steps] == [1, 3]


def test_rm_of_several_steps_that_fails_says_which_were_deleted(
    cli: CliRunner, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rank's steps go newest first, one deletion each; the second one fails (its chain's
    # lease lost, a full disk): the output names the step deleted before it, and the error
    # the one that was not.
    store.daemon.stop()
    real_delete = Repository.delete_step

    async def fail_at_step_2(self: Repository, key: StepKey, *args: Any, **kw: Any) -> None:
        if key.step == 2:
            raise ChainLeasedError(f"step {key} was not deleted (lease lost)")
        await real_delete(self, key, *args, **kw)

    monkeypatch.setattr(Repository, "delete_step", fail_at_step_2)
    source = ["--storage", str(store.storage_path)]
    code, out, err = cli("rm", "alpha", "--rank", "0", "--yes", *source)
    assert (code, out) == (1, "")
    first, second = err.splitlines()
    assert first == "ckptd: deleted 1 of 3 steps before the error: alpha/rank0/step3"
    assert second.startswith("ckptd: error: step alpha/rank0/step2 was not deleted"), second
    assert _steps(cli, source, "alpha")["0"] == [(1, "base"), (2, "delta")]
