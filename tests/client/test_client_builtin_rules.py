"""The client's built-in rules follow the optimizer whose state is saved.

Once per save the client looks at the tensor names: Adam's second moment picks the Adam set
(weights b3, ``exp_avg`` lossy-scaled b2, ``exp_avg_sq`` lossy-log b3, step counters exact),
SGD's momentum the SGD set (momentum b2, weights left to the daemon), anything else today's
rules. End to end through a real daemon: what each tensor of a delta was asked for (the
manifest's policy and bits) and what it got (the blob's width and domain).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd.client.policies import (
    ADAM_RULES,
    DEFAULT_RULES,
    SGD_RULES,
    builtin_rules,
    parse_rules,
    resolve,
)
from ckptd.daemon.codec import blob_info
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import Policy
from ckptd.daemon.store.manifest import Manifest
from ckptd.protos.v1 import pb
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon

ADAM_NAMES = ("model/fc.weight", "model/fc.bias", "optim/state/0/step",
              "optim/state/0/exp_avg", "optim/state/0/exp_avg_sq")


def test_the_set_follows_the_optimizer_state_names() -> None:
    assert builtin_rules(ADAM_NAMES) == ("adam", ADAM_RULES)
    amsgrad = (*ADAM_NAMES, "optim/state/0/max_exp_avg_sq")
    assert builtin_rules(amsgrad)[0] == "adam"
    assert builtin_rules(["model/w", "optim/state/0/momentum_buffer"]) == ("sgd", SGD_RULES)
    assert builtin_rules(["model/w", "model/b"]) == ("default", DEFAULT_RULES)
    # exp_avg alone (no second moment) is not Adam: today's rules, not the Adam widths.
    assert builtin_rules(["model/w", "optim/state/0/exp_avg"])[0] == "default"
    # DCP's names: dotted fqns, a shard's with "@" and its offsets.
    dcp = ["model.w@0,0", "optim.state.w.step", "optim.state.w.exp_avg_sq@0,0"]
    assert builtin_rules(dcp)[0] == "adam"
    assert resolve((), "optim.state.w.step", 0, ADAM_RULES) == (pb.POLICY_EXACT, 0)
    assert resolve((), "optim.state.w.exp_avg_sq@8,0", 0, ADAM_RULES) == (
        pb.POLICY_LOSSY_LOG, 3)
    # Non-float tensors skip the built-in lossy rules (exact ones still apply).
    assert resolve((), "rng", 0, ADAM_RULES, is_float=False) == (pb.POLICY_UNSPECIFIED, 0)
    assert resolve((), "optim.state.w.step", 0, ADAM_RULES, is_float=False) == (
        pb.POLICY_EXACT, 0)


def test_adam_set_widths_and_what_bits_overrides() -> None:
    def adam(name: str, bits: int = 0, rules: Any = ()) -> tuple[int, int]:
        return resolve(parse_rules(rules), name, bits, ADAM_RULES)

    assert adam("model/fc.weight") == (pb.POLICY_LOSSY, 3)
    assert adam("model/fc.bias") == (pb.POLICY_LOSSY, 3)
    assert adam("optim/state/0/exp_avg") == (pb.POLICY_LOSSY_SCALED, 2)
    assert adam("optim/state/0/exp_avg_sq") == (pb.POLICY_LOSSY_LOG, 3)
    assert adam("optim/state/0/step") == (pb.POLICY_EXACT, 0)
    # An explicit bits= replaces every built-in width, domains kept; exact stays exact.
    assert adam("optim/state/0/exp_avg", 5) == (pb.POLICY_LOSSY_SCALED, 5)
    assert adam("optim/state/0/exp_avg_sq", 5) == (pb.POLICY_LOSSY_LOG, 5)
    assert adam("model/fc.weight", 5) == (pb.POLICY_LOSSY, 5)
    assert adam("optim/state/0/step", 5) == (pb.POLICY_EXACT, 0)
    # User rules come first; one without a width takes bits= (or the daemon's default).
    assert adam("optim/state/0/exp_avg", 0, [("*exp_avg", "exact")]) == (pb.POLICY_EXACT, 0)
    assert adam("model/fc.weight", 0, [("model/*", "lossy")]) == (pb.POLICY_LOSSY, 0)
    assert adam("model/fc.weight", 6, [("model/*", "lossy")]) == (pb.POLICY_LOSSY, 6)
    assert adam("model/fc.weight", 6, [("model/*", "lossy:2")]) == (pb.POLICY_LOSSY, 2)


def test_sgd_set_fixes_the_momentum_and_leaves_the_weights_to_the_daemon() -> None:
    assert resolve((), "optim/state/0/momentum_buffer", 0, SGD_RULES) == (pb.POLICY_LOSSY, 2)
    assert resolve((), "optim/state/0/momentum_buffer", 4, SGD_RULES) == (pb.POLICY_LOSSY, 4)
    assert resolve((), "model/conv.weight", 0, SGD_RULES) == (pb.POLICY_UNSPECIFIED, 0)


def test_user_rules_match_a_shard_as_its_tensor() -> None:
    # A DCP shard away from the origin is named fqn@offsets: a user rule for the tensor
    # covers every shard of it, as the built-in rules do.
    rules = parse_rules([("optim.state.*.exp_avg_sq", "exact")])
    for name in ("optim.state.w.exp_avg_sq", "optim.state.w.exp_avg_sq@8,0"):
        assert resolve(rules, name, 0, ADAM_RULES) == (pb.POLICY_EXACT, 0), name
    assert resolve((), "optim.state.w.exp_avg_sq@8,0", 0, ADAM_RULES) == (
        pb.POLICY_LOSSY_LOG, 3)


def test_only_a_trailing_offsets_suffix_is_a_shard() -> None:
    # An '@' inside a name is part of it: the second moment keeps its log rule.
    name = "optim/state/emb@v2/exp_avg_sq"
    assert builtin_rules([name])[0] == "adam"
    assert resolve((), name, 0, ADAM_RULES) == (pb.POLICY_LOSSY_LOG, 3)
    assert resolve((), "model/w@v2", 0, ADAM_RULES) == (pb.POLICY_LOSSY, 3)


def test_other_non_negative_state_is_lossy_log_in_every_set() -> None:
    names = ("optim/state/0/square_avg", "optim/state/0/exp_inf", "optim/state/0/sum",
             "optim.state.w.sum", "model/bn.running_var")
    for rules in (ADAM_RULES, SGD_RULES, DEFAULT_RULES):
        for name in names:
            assert resolve((), name, 0, rules) == (pb.POLICY_LOSSY_LOG, 0), (rules, name)
    assert resolve((), "model/bn.running_var", 5, ADAM_RULES) == (pb.POLICY_LOSSY_LOG, 5)


def test_rmsprop_with_momentum_is_not_given_sgd_widths() -> None:
    # RMSprop(momentum=...) holds a momentum_buffer too; SGD's widths were measured for SGD.
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    names = [f"optim/state/{i}/{key}" for i, state in opt.state_dict()["state"].items()
             for key in state]
    assert any(n.endswith("momentum_buffer") for n in names)
    assert builtin_rules(names) == ("default", DEFAULT_RULES)
    assert builtin_rules([n for n in names if "square_avg" not in n])[0] == "sgd"


def test_every_set_keeps_optimizer_step_counters_exact() -> None:
    # The daemon's threshold ships at 1: without a rule RMSprop's or Adagrad's 0-dim float
    # step counter would be stored lossily under AUTO.
    for rules in (ADAM_RULES, SGD_RULES, DEFAULT_RULES):
        for name in ("optim/state/3/step", "optim.state.w.step"):
            assert resolve((), name, 0, rules) == (pb.POLICY_EXACT, 0), (rules, name)


def _train(optimizer: str, steps: int) -> list[dict[str, Any]]:
    """States of a small model after each of ``steps`` optimizer steps (a copy each)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
    make = {"adam": lambda p: torch.optim.Adam(p, lr=1e-2),
            "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
            "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
            "none": None}[optimizer]
    opt = make(model.parameters()) if make else None
    states = []
    for _ in range(steps):
        x = torch.randn(32, 48)
        loss = model(x).square().mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                for param in model.parameters():
                    param.sub_(0.1 * param.grad)  # type: ignore[operator]
                    param.grad = None
        state: dict[str, Any] = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                                 "rng": torch.get_rng_state(), "seen": torch.tensor([32])}
        if opt is not None:
            state["optim"] = _clone(opt.state_dict())
        states.append(state)
    return states


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _delta_tensors(storage: Path, step: int) -> dict[str, tuple[Policy, int, str, int, str]]:
    """Per tensor of ``step``: (policy asked, bits asked, encoding, blob width, domain)."""
    for path in storage.rglob("manifest.json"):
        manifest = Manifest.from_bytes(path.read_bytes(), str(path))
        if manifest.key.step != step:
            continue
        out = {}
        for entry in manifest.tensors:
            info = blob_info((storage / entry.blob_key).read_bytes())
            out[entry.spec.name] = (entry.spec.policy, entry.spec.bits, entry.encoding,
                                    info.bits, info.domain)
        return out
    raise AssertionError(f"no manifest of step {step} under {storage}")


def _save_two(daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, optimizer: str,
              **kwargs: Any) -> dict[str, tuple[Policy, int, str, int, str]]:
    """Saves a base and a delta of a run trained with ``optimizer``; the delta's tensors."""
    states = _train(optimizer, 2)
    ckpt = make_checkpointer(daemon.address, f"rules-{optimizer}", **kwargs)
    for step, state in enumerate(states):
        ckpt.save(step, state)
    ckpt.wait(timeout_s=60)
    restored = ckpt.restore(1)
    assert set(restored) == set(states[1])
    return _delta_tensors(daemon.storage_path, 1)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_state_gets_the_adam_set(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, optimizer: str
) -> None:
    got = _save_two(daemon, make_checkpointer, optimizer)
    for name in ("model/0.weight", "model/0.bias", "model/2.weight", "model/2.bias"):
        assert got[name] == (Policy.LOSSY, 3, "delta", 3, "linear"), name
    for index in (0, 1, 2, 3):
        state = f"optim/state/{index}"
        assert got[f"{state}/exp_avg"] == (Policy.LOSSY_SCALED, 2, "delta", 2, "scaled")
        assert got[f"{state}/exp_avg_sq"] == (Policy.LOSSY_LOG, 3, "delta", 3, "log")
        assert got[f"{state}/step"][:3] == (Policy.EXACT, 0, "exact")
    # The catch-all lossy rule is for floats: the RNG state (uint8) and an int counter are
    # left to the daemon, which stores them exactly (it refuses to be asked otherwise).
    assert got["rng"][:3] == got["seen"][:3] == (Policy.AUTO, 0, "exact")


def test_explicit_bits_override_the_adam_widths_and_keep_the_domains(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    got = _save_two(daemon, make_checkpointer, "adamw", bits=5)
    assert got["model/0.weight"] == (Policy.LOSSY, 5, "delta", 5, "linear")
    assert got["optim/state/0/exp_avg"] == (Policy.LOSSY_SCALED, 5, "delta", 5, "scaled")
    assert got["optim/state/0/exp_avg_sq"] == (Policy.LOSSY_LOG, 5, "delta", 5, "log")
    assert got["optim/state/0/step"][:3] == (Policy.EXACT, 0, "exact")


def test_a_user_rule_wins_over_the_adam_set(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    got = _save_two(daemon, make_checkpointer, "adamw",
                    policies=[("*exp_avg", "exact"), ("model/2.*", "lossy:6")])
    assert got["optim/state/0/exp_avg"][:3] == (Policy.EXACT, 0, "exact")
    assert got["model/2.weight"] == (Policy.LOSSY, 6, "delta", 6, "linear")
    assert got["model/0.weight"] == (Policy.LOSSY, 3, "delta", 3, "linear")  # built-in
    assert got["optim/state/0/exp_avg_sq"] == (Policy.LOSSY_LOG, 3, "delta", 3, "log")


def test_sgd_momentum_gets_the_sgd_set(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    got = _save_two(daemon, make_checkpointer, "sgd-momentum")
    shipped = EngineConfig().default_bits
    for index in (0, 1, 2, 3):
        assert got[f"optim/state/{index}/momentum_buffer"] == (
            Policy.LOSSY, 2, "delta", 2, "linear")
    # The weights (biases of 3 and 40 elements too) are the daemon's: AUTO at its width.
    for name in ("model/0.weight", "model/0.bias", "model/2.weight", "model/2.bias"):
        assert got[name] == (Policy.AUTO, 0, "delta", shipped, "linear"), name


@pytest.mark.parametrize("optimizer", ["sgd", "none"])
def test_a_state_without_optimizer_moments_is_left_to_the_daemon(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, optimizer: str
) -> None:
    got = _save_two(daemon, make_checkpointer, optimizer)
    shipped = EngineConfig().default_bits
    model = {k: v for k, v in got.items() if k.startswith("model/")}
    assert set(model) == {"model/0.weight", "model/0.bias", "model/2.weight", "model/2.bias"}
    assert set(model.values()) == {(Policy.AUTO, 0, "delta", shipped, "linear")}
    assert not any(k.startswith("optim/state/") for k in got)
