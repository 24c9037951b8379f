"""A user's lossy rule applies to floating-point tensors only, as the built-in rules do.

``policies=[("*", "lossy:3")]`` (the README's style) used to send RNG states, integer
buffers and masks to the daemon as lossy, which refuses them, so every such save failed.
A glob now means "the float tensors it matches" and the rest stay exact; a rule naming a
non-float tensor by its exact name is refused at ``save()`` with the tensor and the rule.
End to end through a real daemon: what each tensor of a delta was stored as, and what the
restore gives back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd.client import InvalidCheckpointError
from ckptd.client.policies import ADAM_RULES, parse_rules, resolve
from ckptd.daemon.domain import Policy
from ckptd.daemon.store.manifest import Manifest
from ckptd.protos.v1 import pb
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon


def _state(seed: int) -> dict[str, Any]:
    """A training state after ``seed`` small steps: the floats move a little per step."""
    weights = torch.Generator().manual_seed(0)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return {
        "model": {"fc.weight": torch.randn(64, 32, generator=weights)
                  + 0.01 * seed * torch.randn(64, 32, generator=generator),
                  "fc.bias": torch.randn(64, generator=weights)
                  + 0.01 * seed * torch.randn(64, generator=generator),
                  "bn.num_batches_tracked": torch.tensor(100 + seed, dtype=torch.int64)},
        "mask": torch.rand(256, generator=generator) > 0.5,
        "seen": torch.arange(seed, seed + 40, dtype=torch.int64) * (1 << 40),
        "rng": torch.get_rng_state(),
    }


def _policies_of(storage: Path, step: int) -> dict[str, tuple[Policy, str]]:
    """Per tensor of ``step``'s manifest: the policy asked and the encoding stored."""
    for path in storage.rglob("manifest.json"):
        manifest = Manifest.from_bytes(path.read_bytes(), str(path))
        if manifest.key.step == step:
            return {e.spec.name: (e.spec.policy, e.encoding) for e in manifest.tensors}
    raise AssertionError(f"no manifest of step {step} under {storage}")


@pytest.mark.parametrize("spec", ["lossy:3", "lossy-log:2", "lossy-scaled", "lossy"])
def test_a_lossy_glob_stores_the_non_float_tensors_it_matches_exactly(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, spec: str,
) -> None:
    ckpt = make_checkpointer(daemon.address, f"glob-{spec.replace(':', '-')}",
                             policies=[("*", spec)])
    states = [_state(1), _state(2)]
    for step, state in enumerate(states):
        ckpt.save(step, state)
    ckpt.wait(timeout_s=60)  # before the fix: the daemon refused the save (FAILED)

    restored = ckpt.restore(1)
    want = states[1]
    for name in ("mask", "seen", "rng"):
        assert restored[name].dtype == want[name].dtype, name
        assert torch.equal(restored[name], want[name]), name
    counter = restored["model"]["bn.num_batches_tracked"]
    assert torch.equal(counter, want["model"]["bn.num_batches_tracked"])
    for name in ("fc.weight", "fc.bias"):
        assert torch.allclose(restored["model"][name], want["model"][name],
                              rtol=0.5, atol=0.05), name
    # The floats of the delta were coded lossily under the user's rule; the rest exactly.
    stored = _policies_of(daemon.storage_path, 1)
    lossy = Policy(spec.partition(":")[0])
    assert stored["model/fc.weight"] == (lossy, "delta")
    for name in ("mask", "seen", "rng", "model/bn.num_batches_tracked"):
        assert stored[name] == (Policy.AUTO, "exact"), name


def test_a_lossy_rule_naming_a_non_float_tensor_is_refused_at_save(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
) -> None:
    ckpt = make_checkpointer(daemon.address, "named-mask", policies=[("mask", "lossy:3")])
    with pytest.raises(InvalidCheckpointError) as caught:
        ckpt.save(0, _state(1))
    message = str(caught.value)
    assert "('mask', 'lossy:3')" in message and "'mask'" in message
    assert "not a floating-point tensor" in message and "'exact' or 'auto'" in message
    assert ckpt.steps() == []
    # The same name given a possible spec, or a float tensor named the same way, saves.
    fine = make_checkpointer(daemon.address, "named-ok",
                             policies=[("mask", "exact"), ("model/fc.weight", "lossy:3")])
    fine.save(0, _state(1))
    fine.wait(timeout_s=60)
    assert fine.steps() == [0]


def test_resolve_skips_lossy_user_rules_for_non_floats_and_keeps_the_rest() -> None:
    rules = parse_rules([("optim/*/step", "lossy:2"), ("*", "lossy-log:4")])
    # A glob skips a non-float: the next rule, then the built-in set, decides.
    assert resolve(rules, "rng", 0, ADAM_RULES, is_float=False) == (pb.POLICY_UNSPECIFIED, 0)
    assert resolve(rules, "optim/0/step", 0, ADAM_RULES, is_float=False) == (
        pb.POLICY_EXACT, 0)
    assert resolve(rules, "rng", 0, ADAM_RULES) == (pb.POLICY_LOSSY_LOG, 4)
    # 'auto' and 'exact' rules apply to any dtype; a named shard counts as named.
    assert resolve(parse_rules([("rng", "auto")]), "rng", 3, is_float=False) == (
        pb.POLICY_UNSPECIFIED, 3)
    with pytest.raises(InvalidCheckpointError, match="names tensor 'idx@8'"):
        resolve(parse_rules([("idx", "lossy-scaled")]), "idx@8", 0, is_float=False)
    assert resolve(parse_rules([("id?", "lossy")]), "idx", 0, is_float=False) == (
        pb.POLICY_UNSPECIFIED, 0)
