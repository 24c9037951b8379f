"""``CkptdCheckpointIO`` against a real daemon: Lightning fits in a trainer process that is
SIGKILLed mid-fit, and a new process resumes from "last" to the uninterrupted weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from client_support import CheckpointerFactory, assert_same_weights, kill_when_signalled
from daemon_harness import InProcessDaemon

pytest.importorskip("lightning")
import lightning_job
from ckptd.client.lightning import CkptdCheckpointIO, read_marker

pytestmark = [
    # Lightning's advice on this toy setup (few workers, small batches, logging interval).
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # lightning on torch 2.13
]


@pytest.mark.slow
@pytest.mark.parametrize("lossless", [True, False], ids=["exact", "lossy"])
def test_lightning_killed_mid_fit_resumes_from_last_to_the_uninterrupted_weights(
    daemon: InProcessDaemon,
    make_checkpointer: CheckpointerFactory,
    tmp_path: Path,
    lossless: bool,
) -> None:
    reference = lightning_job.fit(tmp_path / "reference", None)

    root = tmp_path / "run"
    kill_when_signalled(Path(lightning_job.__file__),
                        [daemon.address, "lit", str(root), str(tmp_path / "stopped"),
                         "exact" if lossless else "lossy"],
                        tmp_path / "stopped", tmp_path / "trainer.log")

    last = read_marker(str(root / "ckpts" / "last.ckpt"))
    assert last is not None and last["run"] == "lit"
    second = make_checkpointer(daemon.address, "lit",
                               policies=lightning_job.EXACT if lossless else None)
    io = CkptdCheckpointIO(second)
    assert io.load_checkpoint(root / "ckpts" / "last.ckpt")["global_step"] == 8
    resumed = lightning_job.fit(root, io, resume=True)
    # From last.ckpt at step 8, not from scratch.
    assert resumed.steps_run == 4 * lightning_job.EPOCHS - 8

    assert_same_weights(resumed, reference, lossless=lossless)
    # save_top_k=2 plus last.ckpt: each marker names a live step (the killed trainer's
    # superseded steps are deleted by the resumed one's rotation or left unreferenced).
    markers = {p.name: read_marker(str(p)) for p in (root / "ckpts").iterdir()}
    assert len(markers) == 3 and "last.ckpt" in markers
    assert {m["step"] for m in markers.values() if m} <= set(second.steps())
