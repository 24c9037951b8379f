"""``CkptdCallback`` against a real daemon: a tiny GPT-2 trains in a trainer process that is
SIGKILLed mid-training, and a new process resumes from ckptd to the uninterrupted weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from client_support import CheckpointerFactory, assert_same_weights, kill_when_signalled
from daemon_harness import InProcessDaemon

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import hf_job
from ckptd.client.hf import CkptdCallback

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.mark.slow
@pytest.mark.parametrize("lossless", [True, False], ids=["exact", "lossy"])
def test_hf_trainer_killed_mid_training_resumes_to_the_uninterrupted_weights(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, tmp_path: Path,
    lossless: bool,
) -> None:  # fmt: skip
    reference = hf_job.train(tmp_path / "reference", [])

    kill_when_signalled(Path(hf_job.__file__),
                        [daemon.address, "hf", str(tmp_path / "run"), str(tmp_path / "stopped"),
                         "exact" if lossless else "lossy"],
                        tmp_path / "stopped", tmp_path / "trainer.log")
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # the callback replaced them

    second = make_checkpointer(daemon.address, "hf",
                               policies=hf_job.EXACT if lossless else None)
    callback = CkptdCallback(second)
    resume = callback.materialize(tmp_path / "resume")
    assert resume is not None and resume.endswith("checkpoint-6")
    resumed = hf_job.train(tmp_path / "run", [callback], resume=resume)

    assert_same_weights(resumed, reference, lossless=lossless)
    # save_total_limit=2; the Trainer saves its last step; the killed trainer's older
    # steps are the resumed callback's to rotate out.
    assert second.steps()[-2:] == [15, 16]


def test_materialize_on_an_empty_run_returns_none(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, tmp_path: Path
) -> None:
    callback = CkptdCallback(make_checkpointer(daemon.address, "hf-empty"))
    assert callback.materialize(tmp_path) is None
