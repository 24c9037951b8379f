"""A full /dev/shm never kills the trainer. Staging segments reserve their pages when they
are created, so no room is a ``SharedMemoryFullError`` naming the size and the free space
(never a SIGBUS in the snapshot copy); ``transport="auto"`` then streams over gRPC, and the
daemon refuses a restore segment it cannot fill before it sends anything.

The end-to-end test runs a real daemon and trainer on a private, small tmpfs mounted on
/dev/shm inside their own user and mount namespaces; the host's /dev/shm is never filled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ckptd.client import SharedMemoryFullError
from ckptd.client.shm import ShmBuffer
from ckptd.client.worker import RETRY_EVERY_SAVES
from ckptd.protos import segments
from client_support import client_segments

JOB = Path(__file__).with_name("shm_full_job.py")
SHM_BYTES = 16 << 20
BIG_BYTES = 24_000_000  # a staging buffer that cannot fit in SHM_BYTES
SMALL_BYTES = 1_000_000


def test_a_segment_larger_than_dev_shm_is_refused_before_any_page_is_written() -> None:
    fs = os.statvfs(segments.SHM_ROOT)
    size = fs.f_blocks * fs.f_frsize + 4096  # tmpfs refuses this at once, allocating nothing
    before = client_segments()
    with pytest.raises(SharedMemoryFullError) as caught:
        ShmBuffer(size)
    message = str(caught.value)
    assert f"{size}-byte" in message and "free of" in message and "/dev/shm" in message
    assert "--shm-size" in message and "transport='grpc'" in message
    assert caught.value.details == message
    assert isinstance(caught.value, OSError)  # a SharedMemoryRefusedError: auto streams
    mine = {n for n in client_segments() - before if segments.segment_owner(n) == os.getpid()}
    assert not mine  # unlinked on the way out


def _private_shm_command(tmp_path: Path) -> list[str]:
    unshare = shutil.which("unshare")
    probe = [unshare or "unshare", "--user", "--map-root-user", "--mount", "true"]
    if unshare is None or subprocess.run(probe, capture_output=True, check=False).returncode:
        pytest.skip("needs unprivileged user namespaces (unshare --user --mount) for a "
                    "private /dev/shm")
    job = (f"mount -t tmpfs -o size={SHM_BYTES} tmpfs /dev/shm && exec {sys.executable} "
           f"{JOB} --dir {tmp_path} --big-bytes {BIG_BYTES} --small-bytes {SMALL_BYTES}")
    return [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", job]


@pytest.mark.slow
def test_a_full_dev_shm_streams_or_fails_cleanly_instead_of_killing_the_trainer(
    tmp_path: Path,
) -> None:
    done = subprocess.run(_private_shm_command(tmp_path), capture_output=True, text=True,
                          timeout=300, check=False)
    # Before the fix the first snapshot copy died here with SIGBUS (exit status -7/135).
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stderr[-4000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert (out["auto_transport_before"], out["auto_transport_after"]) == ("shm", "grpc")
    [warning] = out["auto_warnings"]  # one warning, though two saves did not fit
    assert "shared memory is full" in warning and str(SHM_BYTES) in warning
    assert out["auto_restore_same"] and out["auto_restore_zero_copy_same"]
    # One warning for a /dev/shm too small to restore into, though every restore streamed;
    # the daemon was asked for shared memory on the first and the RETRY_EVERY_RESTORES-th
    # after it, not on each (before: one warning and one refused segment per restore).
    [warning] = out["auto_restore_warnings"]
    assert "cannot hold the restored" in warning and "Sizing /dev/shm" in warning
    needed = re.search(r"less than (\d+) bytes free", warning)
    assert needed is not None and int(needed[1]) >= BIG_BYTES  # the step's size
    assert set(out["auto_restore_transports"]) == {"grpc"}
    retry = len(out["auto_restore_asks"]) - 1
    assert out["auto_restore_asks"] == [1] + [0] * (retry - 1) + [1]
    # Room made again (a file in /dev/shm removed): the next restore uses shared memory.
    assert out["room_restores"] == [["grpc", 1, True], ["grpc", 0, True], ["shm", 1, True]]
    [warning] = out["room_warnings"]
    assert "cannot hold the restored" in warning

    # Saves on a /dev/shm full for a while: one warning, a staging segment tried on the
    # RETRY_EVERY_SAVES-th save, and shared memory again once a file there was removed.
    retry = RETRY_EVERY_SAVES
    assert out["save_room"] == ([["grpc", 1]] + [["grpc", 0]] * (retry - 1)
                                + [["grpc", 1], ["shm", 1], ["shm", 0]])
    assert out["save_room_restore_same"]
    [warning] = out["save_room_warnings"]
    assert "shared memory is full" in warning and f"every {retry} saves" in warning
    assert out["save_room_leftover_segments"] == []

    assert out["shm_save"]["error"] == "SharedMemoryFullError"
    assert "--shm-size" in out["shm_save"]["message"]
    assert out["shm_small_transport"] == "shm" and out["shm_small_restore_same"]
    assert out["shm_restore"]["error"] == "SharedMemoryRefusedError"
    assert "No space left" in out["shm_restore"]["message"]
    assert out["leftover_segments"] == []
